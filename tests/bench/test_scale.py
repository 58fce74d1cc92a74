"""bench/scale.py's tables-only simulation runs the real per-epoch table operations on 2 gloo ranks."""
import subprocess
import sys

from conftest import REPO


def test_tables_only_simulation_prints_both_storage_modes(tmp_path):
    result = subprocess.run([sys.executable, "bench/scale.py", "--tables-only", "--tables-n", "6000",
                             "--tables-classes", "40", "--tables-dense-n", "3000", "--work", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 6,000 |") or line.startswith("| 3,000 |")]
    assert len(rows) == 2 and "top-10" in rows[0] and "dense fp16" in rows[1]
    cells = [float(c.strip(" *")) for c in rows[0].split("|")[4:-1]]
    assert len(cells) == 12 and all(c >= 0 for c in cells)  # seconds, MB and RSS, all measured
    assert not list((tmp_path / "tables").glob("*.pt"))  # the simulated checkpoint is removed
