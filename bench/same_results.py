"""Fingerprints of short digits runs, to show a refactoring changed no result.

For each method, a few epochs on digits on 1 and on 2 CPU ranks; the fingerprint of a run is the SHA-256 of
its summary.csv without the timing and memory columns (and the empty `stopped_at` column older versions wrote), and of its final weights (last.pt's model). Run it on
the code before a change (`--out before.json`) and after it (`--compare before.json`): it prints one row per
run and exits 1 when any fingerprint differs.

    python bench/same_results.py --out /tmp/before.json
    python bench/same_results.py --compare /tmp/before.json
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ce", "mixnn", "selectmix", "select-correct", "confident-learning", "dividemix")
# a few epochs through warm-up, E_s and a refresh; the cross-validation stage kept short
ARGS = ["--epochs", "4", "--warmup_epochs", "1", "--correction_epoch", "2", "--progress", "false",
        "--eval_every", "2", "--cv_folds", "2", "--cv_epochs", "1"]
TIMING = ("time_", "epoch_seconds", "train_seconds", "data_wait_seconds", "images_per_second", "peak_rss",
          "train_seconds_total")


CONTROL = ("stopped_at",)  # where a preempted pass stopped: a control value, not a metric (empty in a full run)
# how the images were read (decodes, cache reads): the data path's work, which caches change, not a result
CONTROL += ("images_decoded", "images_from_cache", "decodes_per_trained_image")


def is_timing(column: str) -> bool:
    return column.startswith(TIMING) or column.endswith("_seconds") or column in CONTROL


def summary_digest(path: Path) -> str:
    """SHA-256 of summary.csv restricted to its non-timing columns (in file order)."""
    rows = list(csv.DictReader(path.open()))
    keep = [c for c in rows[0] if not is_timing(c)] if rows else []
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(keep)
    for row in rows:
        writer.writerow([row[c] for c in keep])
    return hashlib.sha256(out.getvalue().encode()).hexdigest()


def weights_digest(path: Path) -> str:
    """SHA-256 of the checkpoint's model tensors (names and bytes, in name order)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(method: str, ranks: int, data: Path, out: Path) -> dict:
    """One short run; its two fingerprints."""
    name = f"{method}-{ranks}"
    if ranks == 1:
        cmd = [sys.executable, "train/main.py"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch/accelerate/cpu2.yaml"), "train/main.py"]
    cmd += ["--data", str(data), "--output", str(out), "--run_name", name, "--method", method, *ARGS]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    run_dir = out / name
    return {"summary": summary_digest(run_dir / "summary.csv"), "weights": weights_digest(run_dir / "last.pt")}


def prepare_digits(root: Path) -> Path:
    """The digits set at 40% symmetric noise with a 10% noisy val split (what command 1 trains on)."""
    data = root / "digits"
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out", str(data), "--noise", "symmetric:0.4",
                    "--val-fraction", "0.1", "--seed", "0"], cwd=REPO, check=True, capture_output=True)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="write the fingerprints to this JSON file")
    p.add_argument("--compare", default="", help="compare with the fingerprints in this JSON file")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ranks", default="1,2")
    args = p.parse_args(argv)
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_digits(Path(tmp))
        for method in args.methods.split(","):
            for ranks in map(int, args.ranks.split(",")):
                found[f"{method}-{ranks}"] = run(method, ranks, data, Path(tmp) / "runs")
                print(f"{method:20s} {ranks} rank(s)  summary {found[f'{method}-{ranks}']['summary'][:12]}  "
                      f"weights {found[f'{method}-{ranks}']['weights'][:12]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(found, indent=1))
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    differ = [k for k in found if before.get(k) != found[k]]
    print("| run | summary.csv | weights |\n|---|---|---|")
    for k in found:
        old = before.get(k, {})
        print(f"| {k} | {'equal' if old.get('summary') == found[k]['summary'] else 'DIFFERENT'} | "
              f"{'equal' if old.get('weights') == found[k]['weights'] else 'DIFFERENT'} |")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
