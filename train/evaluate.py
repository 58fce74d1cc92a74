"""Standalone evaluation of a run's checkpoint on one or more prepared splits.

    accelerate launch train/evaluate.py --run RUN_DIR [--checkpoint best|last|PATH] \
        --split SHARDS/<split> [--split ...] [--batch-size 256] [--workers 4]

Top-1 / top-5 on 1..N processes (CPU or GPU), a table on stdout and `RUN_DIR/eval.json`. Images get the
run's eval preprocessing: resize the shorter side (256 for 224 crops, 256 for WebVision's 227) and
centre-crop - the standard ImageNet protocol, so ILSVRC12 numbers compare with published ones.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "train"

import torch
from accelerate import Accelerator

from data.atomic import atomic_write_text
from data.reader import ShardDataset
from data.shards import ShardError, read_manifest, verify_split
from data.transforms import EvalTransform, get_preset

from .checkpoint import find_checkpoint, load_checkpoint
from .config import UserError, config_of_checkpoint
from .dataset import decode_size
from .loop import evaluate
from .methods import create_run_model


def evaluate_checkpoint(run: Path, checkpoint: str, splits: list[Path], accelerator, batch_size: int,
                        workers: int) -> dict:
    """{split path: {top1, top5, evaluated, skipped}} for the checkpoint's model."""
    if not Path(run).is_dir():
        raise UserError(f"--run {run}: no such run folder")
    state = load_checkpoint(find_checkpoint(run, checkpoint))
    cfg = config_of_checkpoint(state)
    preset = get_preset(cfg.dataset, cfg.image_size or None)
    draft = decode_size(cfg, preset)  # as the run decoded its eval splits
    num_classes = state["targets"]["num_classes"]
    model = create_run_model(cfg, num_classes, 1 if preset.mode == "L" else 3)
    model.load_state_dict(state["model"])
    model = accelerator.prepare(model)
    results = {}
    for split in splits:
        try:
            manifest = read_manifest(split.parent)
            if split.name not in manifest["splits"]:
                raise UserError(f"--split {split}: {split.parent} has no split {split.name!r} (it has "
                                f"{', '.join(manifest['splits'])})")
            if manifest["num_classes"] != num_classes:
                raise UserError(f"--split {split}: {manifest['num_classes']} classes, the model has {num_classes}")
            table = verify_split(split, manifest["splits"][split.name], num_classes)
            ds = ShardDataset(split, EvalTransform(preset=preset, normalise=False), preset.mode, table=table)
            ds.draft_size = draft
        except ShardError as e:
            raise UserError(str(e)) from None
        results[str(split)] = evaluate(model, ds, accelerator, batch_size, workers)
        results[str(split)]["epoch"] = state["epoch"] - 1
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--split", required=True, action="append", type=Path)
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if torch.cuda.is_available() else "no")
    try:
        results = evaluate_checkpoint(args.run, args.checkpoint, args.split, accelerator, args.batch_size,
                                      args.workers)
    except UserError as e:
        if accelerator.is_main_process:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if accelerator.is_main_process:
        print("| split | top-1 | top-5 | evaluated | skipped |\n|---|---|---|---|---|")
        for split, r in results.items():
            print(f"| {split} | {r['top1']:.2f} | {r['top5']:.2f} | {r['evaluated']} | {r['skipped']} |")
        atomic_write_text(args.run / "eval.json", json.dumps({"checkpoint": args.checkpoint, "results": results},
                                                             indent=1) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tear the process group down before exit (gloo aborts otherwise, at times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
