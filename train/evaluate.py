"""Evaluate a checkpoint on the held-out split: top-1 / top-5, and a PNG of the run's training curves.

Usage:
    # a checkpoint written by train/train.py carries its config
    python train/evaluate.py --checkpoint runs/mnist_vil_tiny/checkpoints/last.pt
    # the EMA weights instead of the raw ones
    python train/evaluate.py --checkpoint runs/vil_tiny_in1k_pt192/checkpoints/last.pt --ema
    # the authors' released weights (or any state dict): give the recipe, and the data location if it differs
    python train/evaluate.py --checkpoint vil2_tiny16_e800_in1k.th --config configs/vil_tiny_in1k_ft224.yaml \
        data.root=/data/imagenet-wds
    # several GPUs
    torchrun --nproc_per_node 8 train/evaluate.py --checkpoint runs/vil_base_in1k_ft224/checkpoints/last.pt

Writes <run dir>/eval.json and <run dir>/curves.png (from metrics.jsonl) when the checkpoint sits in a run directory.
"""

from __future__ import annotations

import argparse
import json
import os

from vil.data import build_loader, open_split, prepare_data
from vil.training import (
    CheckpointError,
    ConfigError,
    apply_overrides,
    barrier,
    build_model,
    evaluate,
    init_distributed,
    load_checkpoint,
    load_config,
    load_init_weights,
    plot_curves,
    run_cli,
    shutdown,
)
from vil.training.checkpoint import FORMAT
from vil.training.config import validate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="train/train.py checkpoint, or released weights")
    parser.add_argument("--config", default=None, help="YAML recipe (default: the config stored in the checkpoint)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="per-rank evaluation batch (default: the recipe's)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.root=/data/in1k-wds")
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint)
    ours = ckpt.get("format") == FORMAT
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    elif ours:
        cfg = apply_overrides(ckpt["config"], args.overrides)
        validate(cfg)
    else:
        raise ConfigError(f"{args.checkpoint} carries no config: pass the recipe with --config configs/<recipe>.yaml.")
    # The weights come from the checkpoint, not from the recipe's fine-tuning initialisation.
    cfg["model"]["init_checkpoint"] = None

    dist = init_distributed(cfg["train"]["device"])
    log = print if dist.is_main else (lambda *a, **k: None)
    if dist.local_rank == 0:
        prepare_data(cfg)
    barrier()
    source = open_split(cfg, train=False)
    batch = args.batch_size or max(1, cfg["train"]["micro_batch_size"] or cfg["train"]["batch_size"] // dist.world_size)
    loader = build_loader(
        cfg,
        source,
        train=False,
        batch_size=batch,
        rank=dist.rank,
        world_size=dist.world_size,
        pin_memory=dist.device.type == "cuda",
    )

    model = build_model(cfg)
    if ours:
        if args.ema and not ckpt.get("ema"):
            raise CheckpointError(f"{args.checkpoint} has no EMA weights (the run had ema.enabled=false); drop --ema.")
        model.load_state_dict(ckpt["ema"] if args.ema else ckpt["model"])
    else:
        load_init_weights(model, args.checkpoint, from_ema=args.ema)
    model.to(dist.device)
    result = evaluate(model, loader, dist.device, cfg["train"]["amp"], progress=dist.is_main)
    log(
        f"{args.checkpoint}{' (EMA)' if args.ema else ''}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"loss {result['loss']:.4f}  on {result['count']} held-out images ({cfg['data']['val_split']})"
    )

    result.update(checkpoint=os.path.abspath(args.checkpoint), ema=args.ema, step=ckpt.get("step"))
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint)))
    if dist.is_main and ours and os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
        png = plot_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "curves.png"))
        if png:
            log(f"training curves: {png}")
    shutdown()
    return result


if __name__ == "__main__":
    run_cli(main, oom_hint="lower --batch-size")
