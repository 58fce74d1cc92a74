"""bench/gpu_check.sh on a machine without CUDA: the rows that need no GPU run (small), the others are named
as skipped, and the table is printed."""
import subprocess

from conftest import REPO, cpu_env


def test_gpu_check_runs_on_cpu_and_says_what_it_skipped(tmp_path):
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--out", str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO, timeout=900, env=cpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| check | result | notes |" in out and "no CUDA device" in out
    assert "skipped (no CUDA device): GPU training rates, batched CUDA decode, torch_knn on CUDA" in out
    rows = [line for line in out.splitlines() if line.startswith("| data path")]
    assert len(rows) == 3 and "1.00 decodes per image" in rows[2]  # MixNN's reads through the epoch cache
    assert "2.00 decodes per image" in rows[1]  # ... and without it: the refresh pass and the training pass
    for method in ("mixnn", "dividemix"):
        line = next(line for line in out.splitlines() if line.startswith(f"| {method}, clothing1m preset"))
        assert "failed" not in line and "waiting for data" in line, line
