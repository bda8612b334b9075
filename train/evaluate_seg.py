"""Evaluate a train/train_seg.py checkpoint on the ADE20K validation split: mIoU, mAcc, aAcc.

Usage:
    # single scale: keep-ratio resize to (2048, 512), sliding window 512 with stride 341 (the recipe's eval section)
    python train/evaluate_seg.py --checkpoint runs/vil_tiny_ade20k_upernet/checkpoints/last.pt
    # multi-scale (0.75, 1.0, 1.25, 1.5, 1.75 x (2048, 512)) + flip, the spec's second number
    python train/evaluate_seg.py --checkpoint runs/vil_tiny_ade20k_upernet/checkpoints/last.pt --multi-scale
    # several GPUs, data in another place than at training time
    torchrun --nproc_per_node 8 train/evaluate_seg.py --checkpoint runs/vil_tiny_ade20k_upernet/checkpoints/last.pt \
        --multi-scale data.root=/data/ADEChallengeData2016

The checkpoint carries its recipe; overrides (or --config) change it. Writes mIoU, mAcc, aAcc (fractions in 0..1),
the per-class IoU and accuracy (null for a class with no pixel) to --output, by default
<run dir>/eval_ss.json or <run dir>/eval_ms_flip.json.
"""

from __future__ import annotations

import argparse
import json
import os

from vil.training import CheckpointError, init_distributed, load_checkpoint, run_cli, shutdown
from vil.training.segmentation import (
    MULTI_SCALE_RATIOS,
    SEG_FORMAT,
    apply_segmentation_overrides,
    build_eval_loader,
    build_segmentation_model,
    evaluate_segmentation,
    load_segmentation_config,
    validate_segmentation,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a train/train_seg.py checkpoint")
    parser.add_argument("--config", default=None, help="YAML recipe (default: the config stored in the checkpoint)")
    parser.add_argument(
        "--multi-scale",
        action="store_true",
        help=f"average over the resize ratios {', '.join(map(str, MULTI_SCALE_RATIOS))} and their mirror images",
    )
    parser.add_argument("--output", default=None, help="result JSON (default: eval_ss.json / eval_ms_flip.json)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.root=/data/ADEChallengeData2016")
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.get("format") != SEG_FORMAT:
        raise CheckpointError(
            f"{args.checkpoint} is not a train/train_seg.py checkpoint (format {ckpt.get('format')!r}); for a "
            f"classifier use train/evaluate.py."
        )
    if args.config is not None:
        cfg = load_segmentation_config(args.config, args.overrides)
    else:
        cfg = apply_segmentation_overrides(ckpt["config"], args.overrides)
        validate_segmentation(cfg)
    ratios, flip = (
        (MULTI_SCALE_RATIOS, True) if args.multi_scale else (tuple(cfg["eval"]["ratios"]), cfg["eval"]["flip"])
    )

    dist = init_distributed(cfg["train"]["device"])
    log = print if dist.is_main else (lambda *a, **k: None)
    loader = build_eval_loader(cfg, dist.rank, dist.world_size, pin_memory=dist.device.type == "cuda")
    model = build_segmentation_model(cfg, init_weights=False)
    model.load_state_dict(ckpt["model"])
    model.to(dist.device)
    result = evaluate_segmentation(model, loader, cfg, dist.device, ratios=ratios, flip=flip, progress=dist.is_main)
    views = f"ratios {', '.join(map(str, ratios))}" + (" + flip" if flip else "")
    log(
        f"{args.checkpoint} (iteration {ckpt['iteration']}): mIoU {100 * result['mIoU']:.2f}  "
        f"mAcc {100 * result['mAcc']:.2f}  aAcc {100 * result['aAcc']:.2f}  on {result['images']} images "
        f"({cfg['data']['val_split']}; {views})"
    )

    result.update(checkpoint=os.path.abspath(args.checkpoint), iteration=ckpt["iteration"])
    output = args.output
    if output is None:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint)))
        name = f"eval_{'ms' if len(ratios) > 1 else 'ss'}{'_flip' if flip else ''}.json"
        output = os.path.join(run_dir, name)
    if dist.is_main:
        with open(output, "w") as f:
            json.dump(result, f, indent=1)
        log(f"results: {output}")
    shutdown()
    return result


if __name__ == "__main__":
    run_cli(main, oom_hint="lower --batch-size")
