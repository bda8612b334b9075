"""The pieces a training script assembles, built from timm's factories: model, optimiser, schedule, mixup, eval."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_init_weights
from .config import ConfigError
from .distributed import all_reduce_sum

__all__ = [
    "BatchPlan",
    "autocast",
    "build_mixup",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "optimizer_step",
    "plan_batches",
    "wrap_for_training",
]


@dataclass
class BatchPlan:
    """How the recipe's global batch is split: ``global_batch = micro_batch * accum_steps * world_size``."""

    global_batch: int
    micro_batch: int
    accum_steps: int
    world_size: int
    steps_per_epoch: int
    lr: float


def plan_batches(cfg: dict, world_size: int, num_samples: int) -> BatchPlan:
    """Global batch and lr from the recipe, whatever the number of ranks; the rest becomes gradient accumulation."""
    global_batch = cfg["train"]["batch_size"]
    micro = cfg["train"]["micro_batch_size"] or global_batch // world_size
    if micro <= 0 or global_batch % (micro * world_size):
        raise ConfigError(
            f"train.batch_size={global_batch} (global) cannot be split into {world_size} ranks x micro batches of "
            f"{micro}: pick train.micro_batch_size so that batch_size is a multiple of micro_batch_size x {world_size}."
        )
    steps = num_samples // global_batch
    if steps == 0:
        raise ConfigError(
            f"The training split has {num_samples} samples, fewer than one global batch "
            f"(train.batch_size={global_batch})."
        )
    lr = cfg["optim"]["lr"] * global_batch / cfg["optim"]["lr_base_batch"]
    return BatchPlan(global_batch, micro, global_batch // (micro * world_size), world_size, steps, lr)


def build_model(cfg: dict) -> nn.Module:
    """``timm.create_model`` with the recipe's resolution, channels, classes and drop path; optional init weights."""
    # Importing vil registers its models with timm.
    import vil  # noqa: F401

    kwargs = dict(cfg["model"]["kwargs"])
    kwargs.setdefault("img_size", cfg["data"]["img_size"])
    kwargs.setdefault("in_chans", cfg["data"]["in_chans"])
    kwargs.setdefault("num_classes", cfg["data"]["num_classes"])
    kwargs.setdefault("drop_path_rate", cfg["model"]["drop_path_rate"])
    name = cfg["model"]["name"]
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name} rejected its arguments {kwargs}: {exc}. Fix model.kwargs.") from exc
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"model.name={name!r} is not registered in timm ({exc}).") from exc
        raise
    if cfg["model"]["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    if cfg["model"]["init_checkpoint"]:
        load_init_weights(model, cfg["model"]["init_checkpoint"], from_ema=cfg["model"]["init_from_ema"])
    return model


def build_optimizer(cfg: dict, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimiser factory: no weight decay on biases, norms and ``model.no_weight_decay()`` (position embedding);
    optional layer-wise lr decay through ``model.group_matcher``."""
    optim = cfg["optim"]
    return create_optimizer_v2(
        model,
        opt=optim["opt"],
        lr=lr,
        weight_decay=optim["weight_decay"],
        betas=tuple(optim["betas"]),
        eps=optim["eps"],
        layer_decay=optim["layer_decay"],
        filter_bias_and_bn=True,
    )


def build_scheduler(cfg: dict, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step schedule (linear warm-up, then cosine to ``min_lr``); drive it with ``step_update(global_step)``."""
    sched = cfg["sched"]
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=sched["name"],
        num_epochs=cfg["train"]["epochs"],
        warmup_epochs=sched["warmup_epochs"],
        warmup_lr=sched["warmup_lr"],
        min_lr=sched["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def build_mixup(cfg: dict, micro_batch: int) -> tuple[Mixup | None, nn.Module]:
    """(Mixup/CutMix or None, the training loss): soft-target cross-entropy with mixing, plain CE without."""
    aug = cfg["aug"]
    if aug["mixup"] > 0 or aug["cutmix"] > 0:
        if micro_batch % 2:
            raise ConfigError(
                f"Mixup/CutMix mixes pairs within a batch and needs an even per-rank batch, got {micro_batch}; "
                f"change train.batch_size or train.micro_batch_size."
            )
        mixup = Mixup(
            mixup_alpha=aug["mixup"],
            cutmix_alpha=aug["cutmix"],
            prob=aug["mixup_prob"],
            switch_prob=aug["mixup_switch_prob"],
            mode="batch",
            label_smoothing=aug["label_smoothing"],
            num_classes=cfg["data"]["num_classes"],
        )
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=aug["label_smoothing"])


def wrap_for_training(model: nn.Module, compile_model: bool, ddp: bool, device: torch.device):
    """(compiled, trained): the model torch.compile'd if asked (what evaluation runs), and that one wrapped in
    DistributedDataParallel under torchrun (what the training step runs). Checkpoints keep saving the unwrapped one."""
    compiled = torch.compile(model) if compile_model else model
    if not ddp:
        return compiled, compiled
    return compiled, DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, model: nn.Module,
                   clip: float | None) -> torch.Tensor | None:
    """One optimiser step after the backward: unscale and clip the gradients' global norm when `clip` is set
    (returns that norm, else None), step through the loss scaler, clear the gradients."""
    grad_norm = None
    if clip is not None:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    amp: str = "none",
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    """Top-1 / top-5 accuracy (%) and loss over the loader, summed over all ranks.

    ``progress`` prints a line every 30 s (this rank's images so far and the rate) for long evaluations.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct1, correct5, count = 0.0, 0.0, 0.0, 0.0
    start = last = time.monotonic()
    for i, (images, targets, _, _) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=-1).sum().item()
        count += targets.numel()
        if progress and time.monotonic() - last > 30:
            last = time.monotonic()
            print(f"  evaluating: {int(count)} images on this rank, {count / (last - start):,.0f} img/s", flush=True)
    model.train(was_training)
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    if count == 0:
        raise RuntimeError("The evaluation split produced no samples; check data.val_split.")
    return {
        "loss": loss_sum / count,
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "count": int(count),
    }
