"""Train ViL + UperNet for semantic segmentation on ADE20K from a YAML recipe (iteration-based).

Usage:
    # one process (CPU or one GPU); the backbone starts from the authors' ImageNet-1K weights named in the recipe
    python train/train_seg.py --config configs/vil_tiny_ade20k_upernet.yaml data.root=/data/ADEChallengeData2016
    # one node, 8 GPUs (DDP, SyncBatchNorm); the global batch (16) and lr stay those of the recipe
    torchrun --nproc_per_node 8 train/train_seg.py --config configs/vil_small_ade20k_upernet.yaml \
        data.root=/data/ADEChallengeData2016 model.init_checkpoint=vil2_small16_e400_in1k.th
    # continue an interrupted run from <run dir>/checkpoints/last.pt (or name a checkpoint)
    torchrun --nproc_per_node 8 train/train_seg.py --config configs/vil_small_ade20k_upernet.yaml \
        data.root=/data/ADEChallengeData2016 --resume
    # evaluate the result, single scale and multi-scale + flip
    python train/evaluate_seg.py --checkpoint runs/vil_small_ade20k_upernet/checkpoints/last.pt --multi-scale

Outputs under <run.output_dir>/<run.name>/: config.yaml, metrics.jsonl and metrics.csv (training loss, lr, images/s;
validation mIoU / mAcc / aAcc as fractions), tb/ (TensorBoard), checkpoints/last.pt (every
train.checkpoint_interval iterations and at the end), results.json (the last validation result).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings

import torch

from vil.training import (
    ConfigError,
    ProgressMeter,
    all_gather_objects,
    all_reduce_sum,
    autocast,
    capture_rng,
    config_to_yaml,
    format_eta,
    optimizer_step,
    restore_rng,
    run_cli,
    save_atomic,
    shutdown,
    start_run,
    training_arg_parser,
    wrap_for_training,
)
from vil.training.segmentation import (
    SEG_FORMAT,
    SegmentationMetricsLogger,
    build_eval_loader,
    build_segmentation_model,
    build_segmentation_optimizer,
    build_segmentation_scheduler,
    build_train_loader,
    evaluate_segmentation,
    load_segmentation_config,
    rank_batch_size,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = training_arg_parser(
        __doc__, "configs/vil_tiny_ade20k_upernet.yaml", "data.root=/data/ade train.iterations=80000"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_segmentation_config(args.config, args.overrides)
    dist, log, run_dir, ckpt_path, resume_from, ckpt = start_run(cfg, args.resume, SEG_FORMAT, "train/train_seg.py")
    device, is_main = dist.device, dist.is_main
    seed = cfg["run"]["seed"]

    global_batch = cfg["train"]["batch_size"]
    per_rank = rank_batch_size(global_batch, dist.world_size)
    sync_bn = cfg["model"]["sync_bn"] and dist.enabled and device.type == "cuda"
    if per_rank < 2 and not sync_bn:
        raise ConfigError(
            f"{per_rank} image per rank: the BatchNorm layers of the neck and heads need at least 2 per rank in "
            f"training (or SyncBatchNorm across GPUs, model.sync_bn=true under torchrun on CUDA); raise "
            f"train.batch_size or use fewer ranks."
        )

    # Data first: a missing folder or annotation fails before the model is built.
    start_iteration = ckpt["iteration"] if ckpt is not None else 0
    pin_memory = device.type == "cuda"
    train_loader = build_train_loader(cfg, start_iteration, dist.rank, dist.world_size, pin_memory)
    eval_interval = cfg["train"]["eval_interval"]
    val_loader = build_eval_loader(cfg, dist.rank, dist.world_size, pin_memory) if eval_interval else None
    num_samples = len(train_loader.dataset)

    # A resumed run takes every weight from its checkpoint, not from model.init_checkpoint.
    model = build_segmentation_model(cfg, init_weights=ckpt is None)
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    optimizer = build_segmentation_optimizer(cfg, model)
    scheduler = build_segmentation_scheduler(cfg, optimizer)
    amp = cfg["train"]["amp"]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    # What fixes the data order (the number of ranks does not).
    data_order = {"global_batch": global_batch, "num_samples": num_samples, "seed": seed}

    iteration = start_iteration
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        changed = {k: (ckpt["data"].get(k), v) for k, v in data_order.items() if ckpt["data"].get(k) != v}
        if changed:
            warnings.warn(
                f"Resuming with another data setup {changed} (checkpoint, now): the data order differs from the "
                f"uninterrupted run from here on.",
                stacklevel=1,
            )
        if len(ckpt["rng"]) == dist.world_size:
            restore_rng(ckpt["rng"][dist.rank])
        else:
            warnings.warn(
                f"{resume_from} was written by {len(ckpt['rng'])} rank(s), this run has {dist.world_size}: the data "
                f"order is kept, the drop-path and dropout random streams start afresh.",
                stacklevel=1,
            )
        log(f"resumed from {resume_from}: iteration {iteration}")

    raw_model = model
    _, model = wrap_for_training(raw_model, cfg["train"]["compile"], dist.enabled, device)

    logger = SegmentationMetricsLogger(run_dir, enabled=is_main, resume_step=iteration if ckpt is not None else None)
    if is_main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(config_to_yaml(cfg))
    total = cfg["train"]["iterations"]
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(
        f"{cfg['model']['name']} + UperNet: {n_params / 1e6:.2f} M parameters | {dist.world_size} rank(s) on "
        f"{device.type} | global batch {global_batch} = {dist.world_size} x {per_rank} | lr {cfg['optim']['lr']:.3e}, "
        f"layer decay {cfg['optim']['layer_decay']} | {num_samples} training images, {total} "
        f"iterations | run dir {run_dir}"
    )

    def save_checkpoint() -> None:
        # Every rank's RNG state goes into rank 0's file (a collective: all ranks call this at the same iteration).
        rng_states = all_gather_objects(capture_rng())
        if not is_main:
            return
        save_atomic(
            {
                "format": SEG_FORMAT,
                "iteration": iteration,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": rng_states,
                "data": data_order,
                "config": cfg,
            },
            ckpt_path,
        )

    def run_eval() -> dict:
        result = evaluate_segmentation(raw_model, val_loader, cfg, device, progress=is_main)
        record = {"mIoU": result["mIoU"], "mAcc": result["mAcc"], "aAcc": result["aAcc"]}
        logger.log("eval", iteration, **record)
        log(
            f"eval iteration {iteration}: mIoU {100 * result['mIoU']:.2f}  mAcc {100 * result['mAcc']:.2f}  "
            f"aAcc {100 * result['aAcc']:.2f}  ({result['images']} images)"
        )
        return record

    progress = ProgressMeter(total, iteration)
    log_interval, ckpt_interval = cfg["train"]["log_interval"], cfg["train"]["checkpoint_interval"]
    max_iterations, clip = cfg["train"]["max_iterations"], cfg["train"]["clip_grad"]
    last_eval = None
    loss_sum, loss_count = 0.0, 0
    model.train()
    for iterations_this_process, (images, labels) in enumerate(train_loader, start=1):
        scheduler.step_update(iteration)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits, aux_logits = model(images)
        # The losses in float32, whatever the autocast dtype of the logits.
        loss = raw_model.loss(logits.float(), aux_logits.float(), labels)
        scaler.scale(loss).backward()
        grad_norm = optimizer_step(optimizer, scaler, raw_model, clip)
        iteration += 1
        # Kept on the device: reading it every iteration would stall a GPU.
        loss_sum = loss_sum + loss.detach()
        loss_count += 1

        if iteration % log_interval == 0 or iteration == total:
            mean_loss = all_reduce_sum([float(loss_sum) / loss_count], device)[0] / dist.world_size
            loss_sum, loss_count = 0.0, 0
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"Loss is {mean_loss} at iteration {iteration}. Lower optim.lr, set train.clip_grad=1.0, use "
                    f"train.amp=bf16 rather than fp16, then --resume from the last checkpoint."
                )
            # The heads' lr (layer decay scales the backbone's down).
            lr = max(group["lr"] for group in optimizer.param_groups)
            rate = progress.rate(iteration, global_batch)
            log(
                f"iteration {iteration}/{total}  loss {mean_loss:.4f}  lr {lr:.3e}  {rate:,.1f} img/s  "
                f"ETA {format_eta(progress.eta(iteration))}",
                flush=True,
            )
            logger.log(
                "train",
                iteration,
                loss=mean_loss,
                lr=lr,
                images_per_s=rate,
                grad_norm=None if grad_norm is None else float(grad_norm),
            )
        if eval_interval and (iteration % eval_interval == 0 or iteration == total):
            last_eval = run_eval()
        stop_now = max_iterations is not None and iterations_this_process >= max_iterations
        if iteration == total or stop_now or iteration % ckpt_interval == 0:
            save_checkpoint()
        if stop_now and iteration < total:
            log(f"stopped after {iterations_this_process} iterations (train.max_iterations); continue with --resume")
            break

    results = {"iteration": iteration, "run_dir": run_dir, "checkpoint": ckpt_path}
    if last_eval is not None:
        results.update(last_eval)
    # A run resumed at its end trains nothing and keeps the results.json written when it got there.
    if is_main and iteration == total and iteration > start_iteration:
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        if last_eval is not None:
            log(f"validation: mIoU {100 * last_eval['mIoU']:.2f}  mAcc {100 * last_eval['mAcc']:.2f}")
    log(f"checkpoint {ckpt_path}")
    logger.close()
    shutdown()
    return results


if __name__ == "__main__":
    run_cli(main)
