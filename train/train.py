"""Train a ViL (or any timm) classifier from a YAML recipe.

Usage:
    # one process (CPU or one GPU)
    python train/train.py --config configs/mnist_vil_tiny.yaml
    # command-line overrides: dotted keys, YAML values
    python train/train.py --config configs/vil_tiny_in1k_pt192.yaml data.root=/data/imagenet-wds train.epochs=400
    # one node, 8 GPUs (DDP); the global batch and lr stay those of the recipe
    torchrun --nproc_per_node 8 train/train.py --config configs/vil_tiny_in1k_pt192.yaml data.root=/data/in1k-wds
    # several nodes: the usual rendezvous flags
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host0:29500 \
        train/train.py --config configs/vil_small_in1k_pt192.yaml data.root=/data/in1k-wds
    # continue an interrupted run from <run dir>/checkpoints/last.pt (or name a checkpoint)
    python train/train.py --config configs/mnist_vil_tiny.yaml --resume
    # fine-tune from a pre-training checkpoint or the authors' released file
    python train/train.py --config configs/vil_tiny_in1k_ft224.yaml model.init_checkpoint=vil2_tiny16_e800_in1k.th

Outputs under <run.output_dir>/<run.name>/: config.yaml, metrics.jsonl, metrics.csv, tb/ (TensorBoard),
checkpoints/last.pt (every train.checkpoint_interval steps and at each epoch end), curves.png, results.json,
data/rank<r>.jsonl (per-rank data log: steps, shards read, bad samples).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import warnings

import torch
from timm.utils import ModelEmaV3

from vil.data import DataError, build_loader, open_split, prepare_data
from vil.training import (
    CheckpointError,
    MetricsLogger,
    ProgressMeter,
    all_gather_objects,
    all_reduce_sum,
    autocast,
    barrier,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    capture_rng,
    config_to_yaml,
    evaluate,
    load_config,
    optimizer_step,
    plan_batches,
    plot_curves,
    restore_rng,
    run_cli,
    save_atomic,
    shutdown,
    start_run,
    training_arg_parser,
    wrap_for_training,
)
from vil.training.checkpoint import FORMAT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = training_arg_parser(__doc__, "configs/mnist_vil_tiny.yaml", "train.epochs=10 optim.lr=5e-4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    dist, log, run_dir, ckpt_path, resume_from, ckpt = start_run(cfg, args.resume, FORMAT, "train/train.py")
    device, is_main = dist.device, dist.is_main
    seed = cfg["run"]["seed"]

    # Data: prepared once per node, then every rank opens the same splits.
    if dist.local_rank == 0:
        prepare_data(cfg)
    barrier()
    train_source = open_split(cfg, train=True)
    classes = getattr(train_source, "classes", None)
    val_source = open_split(cfg, train=False, classes=classes)
    plan = plan_batches(cfg, dist.world_size, train_source.num_samples)
    micro_per_epoch = plan.steps_per_epoch * plan.accum_steps
    train_loader = build_loader(
        cfg,
        train_source,
        train=True,
        batch_size=plan.micro_batch,
        num_batches=micro_per_epoch,
        rank=dist.rank,
        world_size=dist.world_size,
        pin_memory=device.type == "cuda",
    )
    val_loader = build_loader(
        cfg,
        val_source,
        train=False,
        batch_size=plan.micro_batch,
        rank=dist.rank,
        world_size=dist.world_size,
        pin_memory=device.type == "cuda",
    )

    # Model, optimiser, schedule, loss: timm's factories with the recipe's settings.
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(cfg, model, plan.lr)
    scheduler = build_scheduler(cfg, optimizer, plan.steps_per_epoch)
    amp = cfg["train"]["amp"]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    ema = None
    if cfg["ema"]["enabled"]:
        ema = ModelEmaV3(model, decay=cfg["ema"]["decay"], use_warmup=cfg["ema"]["warmup"])
    mixup, criterion = build_mixup(cfg, plan.micro_batch)
    geometry = {
        "world_size": dist.world_size,
        "micro_batch": plan.micro_batch,
        "accum_steps": plan.accum_steps,
        "num_workers": cfg["data"]["num_workers"],
        "steps_per_epoch": plan.steps_per_epoch,
        "num_samples": train_source.num_samples,
        "seed": seed,
    }

    step, start_epoch, start_step_in_epoch, best_top1 = 0, 0, 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            if not ckpt["ema"]:
                raise CheckpointError(
                    f"{resume_from} has no EMA weights but ema.enabled=true; resume with ema.enabled=false."
                )
            ema.module.load_state_dict(ckpt["ema"])
        step, start_epoch, start_step_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        best_top1 = ckpt.get("best_top1")
        if ckpt["data"]["steps_per_epoch"] != plan.steps_per_epoch:
            raise CheckpointError(
                f"{resume_from} was written with {ckpt['data']['steps_per_epoch']} steps per epoch, this run has "
                f"{plan.steps_per_epoch}: resume with the same train.batch_size and training data."
            )
        changed = {k: (ckpt["data"][k], v) for k, v in geometry.items() if ckpt["data"].get(k) != v}
        if changed:
            warnings.warn(
                f"Resuming with a different data geometry {changed}: the data order will differ from the "
                f"uninterrupted run from here on.",
                stacklevel=1,
            )
        if len(ckpt["rng"]) == dist.world_size:
            restore_rng(ckpt["rng"][dist.rank])
        log(
            f"resumed from {resume_from}: step {step}, epoch {start_epoch + 1}, step {start_step_in_epoch} of the epoch"
        )

    raw_model = model
    eval_model, model = wrap_for_training(raw_model, cfg["train"]["compile"], dist.enabled, device)

    logger = MetricsLogger(run_dir, enabled=is_main, resume_step=step if ckpt is not None else None)
    if is_main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(config_to_yaml(cfg))
    data_log_dir = os.path.join(run_dir, "data")
    os.makedirs(data_log_dir, exist_ok=True)
    epochs = cfg["train"]["epochs"]
    total_steps = epochs * plan.steps_per_epoch
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(
        f"{cfg['model']['name']}: {n_params / 1e6:.2f} M parameters | {dist.world_size} rank(s) on {device.type} | "
        f"global batch {plan.global_batch} = {dist.world_size} x {plan.micro_batch} x {plan.accum_steps} accumulation "
        f"| lr {plan.lr:.3e} | {train_source.num_samples} training images, {plan.steps_per_epoch} steps/epoch, "
        f"{epochs} epochs | run dir {run_dir}"
    )

    def save_checkpoint(epoch: int, step_in_epoch: int) -> None:
        # Every rank's RNG state goes into rank 0's file (a collective: all ranks call this at the same step).
        rng_states = all_gather_objects(capture_rng())
        if not is_main:
            return
        save_atomic(
            {
                "format": FORMAT,
                "step": step,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                # The EMA weights as a plain model state dict (loads into the model as it is).
                "ema": ema.module.state_dict() if ema is not None else {},
                "rng": rng_states,
                "data": geometry,
                "config": cfg,
                "best_top1": best_top1,
            },
            ckpt_path,
        )

    def run_eval(epoch: int) -> dict:
        nonlocal best_top1
        result = evaluate(eval_model, val_loader, device, amp, progress=is_main)
        record = {"epoch": epoch + 1, "top1": result["top1"], "top5": result["top5"], "loss": result["loss"]}
        text = (
            f"eval epoch {epoch + 1}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
            f"({result['count']} images)"
        )
        if ema is not None and cfg["ema"]["eval"]:
            ema_result = evaluate(ema.module, val_loader, device, amp, progress=is_main)
            record.update(ema_top1=ema_result["top1"], ema_top5=ema_result["top5"])
            text += f"  EMA top-1 {ema_result['top1']:.2f}%"
        best_top1 = max(best_top1 or 0.0, result["top1"])
        logger.log("eval", step, **record)
        log(text)
        return record

    progress = ProgressMeter(total_steps, step)
    log_interval, ckpt_interval = cfg["train"]["log_interval"], cfg["train"]["checkpoint_interval"]
    max_steps = cfg["train"]["max_steps"]
    clip = cfg["train"]["clip_grad"]
    steps_this_process, last_eval, stopped_early = 0, None, False
    loss_sum, loss_count = 0.0, 0
    model.train()
    for epoch in range(start_epoch, epochs):
        first = start_step_in_epoch if epoch == start_epoch else 0
        train_loader.dataset.set_position(epoch, first * plan.accum_steps)
        batches = iter(train_loader)
        shards_read: set[int] = set()
        health: dict[int, list[int]] = {}
        for step_in_epoch in range(first, plan.steps_per_epoch):
            scheduler.step_update(step)
            for micro in range(plan.accum_steps):
                try:
                    images, targets, shard_ids, worker_health = next(batches)
                except StopIteration:
                    raise DataError(
                        f"The training loader ended early at step {step_in_epoch} of epoch {epoch + 1}."
                    ) from None
                shards_read.update(shard_ids.tolist())
                health[int(worker_health[0])] = worker_health[1:].tolist()
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                # Gradients are all-reduced once per optimizer step, on the last micro batch.
                sync = micro == plan.accum_steps - 1 or not dist.enabled
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast(device, amp):
                        loss = criterion(model(images), targets)
                    scaler.scale(loss / plan.accum_steps).backward()
                # Kept on the device: reading it every step would stall a GPU.
                loss_sum = loss_sum + loss.detach().float()
                loss_count += 1
            grad_norm = optimizer_step(optimizer, scaler, raw_model, clip)
            if ema is not None:
                ema.update(raw_model, step=step)
            step += 1
            steps_this_process += 1

            if step % log_interval == 0 or step == total_steps:
                mean_loss = all_reduce_sum([float(loss_sum) / max(loss_count, 1)], device)[0] / dist.world_size
                loss_sum, loss_count = 0.0, 0
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"Loss is {mean_loss} at step {step}. Lower optim.lr, keep train.clip_grad, use train.amp=bf16 "
                        f"rather than fp16, then --resume from the last checkpoint."
                    )
                lr = max(group["lr"] for group in optimizer.param_groups)
                rate = progress.rate(step, plan.global_batch)
                if is_main:
                    progress.line(epoch, epochs, step, mean_loss, lr, rate)
                logger.log(
                    "train",
                    step,
                    epoch=epoch + 1,
                    loss=mean_loss,
                    lr=lr,
                    images_per_s=rate,
                    grad_norm=None if grad_norm is None else float(grad_norm),
                    corrupt=sum(h[0] for h in health.values()),
                    truncated=sum(h[1] for h in health.values()),
                )
            end_of_epoch = step_in_epoch + 1 == plan.steps_per_epoch
            stop_now = max_steps is not None and steps_this_process >= max_steps
            if not end_of_epoch and (stop_now or (ckpt_interval and step % ckpt_interval == 0)):
                save_checkpoint(epoch, step_in_epoch + 1)
            if stop_now and not end_of_epoch:
                stopped_early = True
                break

        bad = [sum(h[i] for h in health.values()) for i in range(3)]
        with open(os.path.join(data_log_dir, f"rank{dist.rank}.jsonl"), "a") as f:
            f.write(
                json.dumps(
                    {
                        "epoch": epoch + 1,
                        "rank": dist.rank,
                        "world_size": dist.world_size,
                        "first_step": first,
                        "steps": step_in_epoch + 1 - first,
                        "micro_batches": (step_in_epoch + 1 - first) * plan.accum_steps,
                        "shards": sorted(shards_read),
                        "corrupt": bad[0],
                        "truncated": bad[1],
                        "lost": bad[2],
                        "complete": not stopped_early,
                    }
                )
                + "\n"
            )
        if bad[0] or bad[1]:
            warnings.warn(
                f"rank {dist.rank} epoch {epoch + 1}: skipped {bad[0]} corrupt samples and {bad[1]} truncated "
                f"shards ({bad[2]} samples lost); see the warnings above for the files.",
                stacklevel=1,
            )
        if stopped_early:
            log(f"stopped after {steps_this_process} steps (train.max_steps); continue with --resume")
            break
        interval = cfg["train"]["eval_interval"]
        if interval and ((epoch + 1) % interval == 0 or epoch + 1 == epochs):
            last_eval = run_eval(epoch)
        save_checkpoint(epoch + 1, 0)
        if max_steps is not None and steps_this_process >= max_steps and epoch + 1 < epochs:
            stopped_early = True
            log(f"stopped after {steps_this_process} steps (train.max_steps); continue with --resume")
            break

    results = {"step": step, "run_dir": run_dir, "checkpoint": ckpt_path}
    if last_eval is not None:
        results.update(last_eval)
    if is_main:
        png = plot_curves(logger.jsonl_path, os.path.join(run_dir, "curves.png"))
        if not stopped_early:
            with open(os.path.join(run_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
            if last_eval is not None:
                log(f"held-out accuracy: top-1 {last_eval['top1']:.2f}%  top-5 {last_eval['top5']:.2f}%")
        log(f"checkpoint {ckpt_path}" + (f" | curves {png}" if png else ""))
    logger.close()
    shutdown()
    return results


if __name__ == "__main__":
    run_cli(main)
