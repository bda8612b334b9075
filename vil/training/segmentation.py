"""Semantic segmentation pieces of train/train_seg.py and train/evaluate_seg.py (the spec's ADE20K recipe).

Unlike classification, a segmentation run counts iterations: ``train.iterations`` optimizer steps of a global batch of
``train.batch_size`` crops, whatever the number of ranks. The data of an iteration is fixed by the seed and the
iteration alone (:class:`IterationBatchSampler` and the dataset's per-sample augmentation seeds), so a resumed run
reads exactly what the uninterrupted run would have read.

A checkpoint is a ``torch.load(weights_only=True)``-safe dict::

    format, iteration, model, optimizer, scheduler, scaler, rng (one entry per rank), data, config
"""

from __future__ import annotations

import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from vil.data.ade20k import ADE20K_SPLITS, ADE20KDataset
from vil.data.seg_transforms import SegTrainTransform, keep_ratio_size, normalize, to_tensors
from vil.dense import SegmentationMeter, ViLUperNet

from .checkpoint import CheckpointError
from .config import DEFAULTS, ConfigError, apply_overrides, load_config
from .distributed import all_reduce_sum
from .engine import autocast
from .metrics import MetricsLogger

__all__ = [
    "MULTI_SCALE_RATIOS",
    "SEG_DEFAULTS",
    "SEG_FORMAT",
    "IterationBatchSampler",
    "OriginalSizeTransform",
    "PassSeededDataset",
    "SegmentationMetricsLogger",
    "apply_segmentation_overrides",
    "build_eval_loader",
    "build_segmentation_model",
    "build_segmentation_optimizer",
    "build_segmentation_scheduler",
    "build_train_loader",
    "evaluate_segmentation",
    "load_segmentation_config",
    "predict_segmentation",
    "rank_batch_size",
    "segmentation_param_groups",
    "validate_segmentation",
]

SEG_FORMAT = "vil.training.segmentation/1"

# The spec's multi-scale test: keep-ratio resizes to (2048, 512) x each ratio, each also mirrored.
MULTI_SCALE_RATIOS = (0.75, 1.0, 1.25, 1.5, 1.75)

# Defaults follow the spec's ADE20K UperNet recipe for ViL-T; the per-size recipes override what differs.
SEG_DEFAULTS: dict = {
    "run": copy.deepcopy(DEFAULTS["run"]),  # the classification recipes' run section: name, output_dir, seed
    "model": {
        "name": "vil_tiny",
        # Extra backbone kwargs for timm.create_model (embed_dim, depth, patch_size, mlstm_backend, ...).
        "kwargs": {},
        # Sub-blocks whose outputs feed the 4 pyramid levels.
        "out_indices": [7, 11, 15, 23],
        # UperNet width; null: min(D, 384), i.e. 192 for ViL-T and 384 for ViL-S/B.
        "channels": None,
        "aux_channels": 256,
        "aux_loss_weight": 0.4,
        "dropout": 0.1,
        "pool_scales": [1, 2, 3, 6],
        "drop_path_rate": 0.0,
        # Drop path grows linearly from 0 at the first sub-block to drop_path_rate at the last.
        "drop_path_decay": True,
        # Backbone initialisation: a train/train.py checkpoint or one of the authors' released .th files.
        "init_checkpoint": None,
        # SyncBatchNorm in the neck and heads under DDP on CUDA (a few images per GPU are too few for BatchNorm).
        "sync_bn": True,
        "grad_checkpointing": False,
    },
    "data": {
        # The ADEChallengeData2016 folder: images/{training,validation}/*.jpg, annotations/{training,validation}/*.png.
        "root": None,
        "train_split": "training",
        "val_split": "validation",
        "num_classes": 150,
        # Keep-ratio resize target (long, short edge) of training (times a random ratio) and of evaluation.
        "scale": [2048, 512],
        "ratio_range": [0.5, 2.0],
        "crop_size": [512, 512],
        "cat_max_ratio": 0.75,
        "hflip": 0.5,
        # mmseg's photometric distortion (brightness, contrast, saturation, hue).
        "photometric": True,
        "num_workers": 8,
    },
    "train": {
        "iterations": 160000,
        # Global batch (all ranks); every rank gets batch_size / world_size crops.
        "batch_size": 16,
        # bf16 | fp16 | none
        "amp": "bf16",
        "compile": False,
        # Max gradient norm; null disables clipping.
        "clip_grad": None,
        # auto picks cuda when available.
        "device": "auto",
        "log_interval": 50,
        # Evaluate every this many iterations and after the last; 0 disables evaluation during training.
        "eval_interval": 16000,
        # Write checkpoints/last.pt every this many iterations and after the last.
        "checkpoint_interval": 2000,
        # Stop after this many iterations in this process (a checkpoint is written first); null: run to the end.
        "max_iterations": None,
    },
    "optim": {
        "opt": "adamw",
        "lr": 5.0e-4,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "eps": 1.0e-8,
        # Layer-wise lr decay over the backbone (a pair of sub-blocks is one layer); null disables it.
        "layer_decay": 0.65,
    },
    "sched": {
        # Linear warm-up from warmup_lr, then cosine to min_lr at train.iterations.
        "warmup_iterations": 1500,
        "warmup_lr": 1.0e-6,
        "min_lr": 0.0,
    },
    "eval": {
        # Sliding-window inference.
        "window": [512, 512],
        "stride": [341, 341],
        # Resize ratios of data.scale averaged at test time, and whether mirrored images are added.
        "ratios": [1.0],
        "flip": False,
    },
}


def apply_segmentation_overrides(cfg: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` overrides checked against :data:`SEG_DEFAULTS`."""
    return apply_overrides(cfg, overrides, SEG_DEFAULTS)


def load_segmentation_config(path: str | None, overrides: list[str] = ()) -> dict:
    """Defaults, then each file of the ``_base_`` chain, then the overrides; ``run.name`` defaults to the file stem."""
    return load_config(path, overrides, SEG_DEFAULTS, validate_segmentation, default_name="seg")


def _check_pair(cfg: dict, section: str, key: str) -> None:
    value = cfg[section][key]
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"{section}.{key}={value}: expected two positive integers such as [512, 512].")


def validate_segmentation(cfg: dict) -> None:
    """Cross-key checks that a single type check cannot do."""
    if cfg["train"]["amp"] not in ("bf16", "fp16", "none"):
        raise ConfigError(f"train.amp={cfg['train']['amp']!r}: choose one of bf16, fp16, none.")
    if cfg["data"]["root"] is None:
        raise ConfigError(
            "data.root is not set: pass data.root=/path/to/ADEChallengeData2016 (the folder holding images/ and "
            "annotations/)."
        )
    for split in ("train_split", "val_split"):
        if cfg["data"][split] not in ADE20K_SPLITS:
            raise ConfigError(f"data.{split}={cfg['data'][split]!r}: choose one of {', '.join(ADE20K_SPLITS)}.")
    for section, key in (("data", "scale"), ("data", "crop_size"), ("eval", "window"), ("eval", "stride")):
        _check_pair(cfg, section, key)
    ratio_range = cfg["data"]["ratio_range"]
    if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
        raise ConfigError(f"data.ratio_range={ratio_range}: expected [low, high] with 0 < low <= high.")
    if not cfg["eval"]["ratios"] or not all(r > 0 for r in cfg["eval"]["ratios"]):
        raise ConfigError(f"eval.ratios={cfg['eval']['ratios']}: expected positive resize ratios such as [1.0].")
    train = cfg["train"]
    for key in ("iterations", "batch_size", "log_interval", "checkpoint_interval"):
        if train[key] <= 0:
            raise ConfigError(f"train.{key}={train[key]} must be positive.")
    if not 0 <= cfg["sched"]["warmup_iterations"] <= train["iterations"]:
        raise ConfigError(
            f"sched.warmup_iterations={cfg['sched']['warmup_iterations']} must lie in 0..train.iterations "
            f"({train['iterations']})."
        )


def rank_batch_size(global_batch: int, world_size: int) -> int:
    """The per-rank batch that keeps the recipe's global batch."""
    if global_batch % world_size:
        raise ConfigError(
            f"train.batch_size={global_batch} (the global batch) does not split evenly over {world_size} ranks: set "
            f"train.batch_size to a multiple of {world_size}, or use a number of GPUs that divides {global_batch}."
        )
    return global_batch // world_size


class IterationBatchSampler(Sampler):
    """This rank's part of the global batches of iterations ``start .. stop - 1``, as lists of ``(pass, index)``.

    The global sample stream is a concatenation of seeded random permutations of the dataset, one per pass over it.
    Iteration ``i`` takes the stream's samples ``i * B .. (i + 1) * B - 1`` (B the global batch) and rank ``r`` the
    ``r``-th slice of ``B / world_size`` of them: what an iteration reads does not depend on the number of ranks,
    and a run resumed at iteration ``i`` reads on as the uninterrupted run did.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        start: int,
        stop: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"IterationBatchSampler needs a non-empty dataset, got num_samples={num_samples}")
        self.num_samples, self.global_batch, self.start, self.stop = num_samples, global_batch, start, stop
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rank_batch = rank_batch_size(global_batch, world_size)
        self._pass, self._order = -1, None

    def _permutation(self, data_pass: int) -> np.ndarray:
        if data_pass != self._pass:
            self._order = np.random.default_rng([self.seed, data_pass]).permutation(self.num_samples)
            self._pass = data_pass
        return self._order

    def __iter__(self):
        for iteration in range(self.start, self.stop):
            first = iteration * self.global_batch + self.rank * self.rank_batch
            batch = []
            for position in range(first, first + self.rank_batch):
                data_pass, offset = divmod(position, self.num_samples)
                batch.append((data_pass, int(self._permutation(data_pass)[offset])))
            yield batch

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class PassSeededDataset(Dataset):
    """``dataset[(pass, index)]``: sample ``index`` augmented as in pass ``pass`` over the data (the ADE20K dataset
    seeds each sample's augmentation from (seed, pass, index))."""

    def __init__(self, dataset: ADE20KDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        data_pass, index = key
        # A loader worker prepares one sample at a time, so setting the pass on its copy of the dataset is safe.
        self.dataset.set_epoch(data_pass)
        return self.dataset[index]


class OriginalSizeTransform:
    """Evaluation input: the normalised image at its original size, and the label unchanged; the resize to the test
    scale(s) happens on the device, in :func:`predict_segmentation`."""

    def __call__(
        self, image: Image.Image | torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = to_tensors(image, label)
        return normalize(image), label


def _loader_generator(seed: int) -> torch.Generator:
    # A private generator keeps the loader from drawing on the global torch RNG (which resume restores exactly).
    return torch.Generator().manual_seed(seed)


def build_train_loader(
    cfg: dict, start_iteration: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False
) -> DataLoader:
    """Batches ``(images [b, 3, h, w], labels [b, h, w])`` of this rank for iterations ``start_iteration ..
    train.iterations - 1`` (b = train.batch_size / world_size, h x w = data.crop_size)."""
    data, seed = cfg["data"], cfg["run"]["seed"]
    transform = SegTrainTransform(
        scale=tuple(data["scale"]),
        ratio_range=tuple(data["ratio_range"]),
        crop_size=tuple(data["crop_size"]),
        cat_max_ratio=data["cat_max_ratio"],
        flip_prob=data["hflip"],
        photometric=data["photometric"],
    )
    dataset = ADE20KDataset(data["root"], data["train_split"], transform, seed=seed)
    sampler = IterationBatchSampler(
        len(dataset), cfg["train"]["batch_size"], start_iteration, cfg["train"]["iterations"], seed, rank, world_size
    )
    workers = data["num_workers"]
    return DataLoader(
        PassSeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=_loader_generator(seed),
        prefetch_factor=4 if workers > 0 else None,
    )


def build_eval_loader(cfg: dict, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """This rank's share (every world_size-th image) of the validation split, one original-size image per batch."""
    data = cfg["data"]
    dataset = ADE20KDataset(data["root"], data["val_split"], OriginalSizeTransform())
    return DataLoader(
        Subset(dataset, range(rank, len(dataset), world_size)),
        batch_size=1,
        num_workers=data["num_workers"],
        pin_memory=pin_memory,
        generator=_loader_generator(cfg["run"]["seed"]),
    )


def build_segmentation_model(cfg: dict, init_weights: bool = True) -> ViLUperNet:
    """ViL + UperNet of the recipe; with ``init_weights``, the backbone starts from ``model.init_checkpoint`` when set
    (pass False when all weights come from a segmentation checkpoint next).

    The initial weights go through the ViL model's own loader (``VisionLSTM.load_pretrained``): a train/train.py
    checkpoint or one of the authors' .th files, any key spelling, the position embedding resampled to the crop size.
    """
    # Importing vil registers its models with timm.
    import vil  # noqa: F401

    spec = cfg["model"]
    backbone_kwargs = dict(spec["kwargs"])
    init = spec["init_checkpoint"] if init_weights else None
    if init:
        if not os.path.isfile(init):
            raise CheckpointError(
                f"model.init_checkpoint={init} not found. Download the authors' ImageNet-1K weights (e.g. "
                f"vil2_tiny16_e800_in1k.th from https://ml.jku.at/research/vision_lstm/download/), or point it at a "
                f"train/train.py checkpoint; model.init_checkpoint=null trains the backbone from scratch."
            )
        backbone_kwargs["pretrained_cfg_overlay"] = {"file": os.path.abspath(init)}
    try:
        model = ViLUperNet(
            spec["name"],
            num_classes=cfg["data"]["num_classes"],
            img_size=tuple(cfg["data"]["crop_size"]),
            out_indices=tuple(spec["out_indices"]),
            channels=spec["channels"],
            aux_channels=spec["aux_channels"],
            aux_loss_weight=spec["aux_loss_weight"],
            dropout=spec["dropout"],
            pool_scales=tuple(spec["pool_scales"]),
            drop_path_rate=spec["drop_path_rate"],
            pretrained=bool(init),
            drop_path_decay=spec["drop_path_decay"],
            **backbone_kwargs,
        )
    except (TypeError, ValueError) as exc:
        weights = f" with the weights of {init}" if init else ""
        raise ConfigError(f"Cannot build {spec['name']}{weights}: {exc}. Fix model.* in the recipe.") from exc
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"model.name={spec['name']!r} is not registered in timm ({exc}).") from exc
        raise
    if spec["grad_checkpointing"]:
        model.backbone.model.set_grad_checkpointing(True)
    return model


def segmentation_param_groups(model: ViLUperNet, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay over the backbone (BEiT's rule, as timm does it).

    Layer ids: patch and position embedding 0, sub-blocks 2j and 2j+1 share 1 + j (the backbone's group_matcher),
    neck and heads L = 1 + the last pair; a parameter of layer l gets lr_scale = layer_decay ** (L - l).
    No weight decay on biases, norms and the position embedding.
    """
    backbone = model.backbone.model
    prefix = "backbone.model."
    matcher = backbone.group_matcher()
    no_decay = backbone.no_weight_decay()
    backbone_layers = [matcher(name)[0] for name, _ in backbone.named_parameters()]
    top = 1 + int(max(layer for layer in backbone_layers if math.isfinite(layer)))
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = top
        if name.startswith(prefix):
            backbone_layer = matcher(name[len(prefix) :])[0]
            layer = int(backbone_layer) if math.isfinite(backbone_layer) else top
        decay = param.ndim > 1 and name.removeprefix(prefix) not in no_decay
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": 1.0 if layer_decay is None else layer_decay ** (top - layer),
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_segmentation_optimizer(cfg: dict, model: ViLUperNet) -> torch.optim.Optimizer:
    optim = cfg["optim"]
    groups = segmentation_param_groups(model, optim["weight_decay"], optim["layer_decay"])
    return create_optimizer_v2(
        groups,
        opt=optim["opt"],
        lr=optim["lr"],
        weight_decay=optim["weight_decay"],
        betas=tuple(optim["betas"]),
        eps=optim["eps"],
    )


def build_segmentation_scheduler(cfg: dict, optimizer: torch.optim.Optimizer) -> CosineLRScheduler:
    """Per-iteration schedule (linear warm-up, then cosine to ``min_lr``); drive it with ``step_update(iteration)``.
    Each group's lr is the schedule's value times its ``lr_scale`` (layer decay)."""
    sched = cfg["sched"]
    return CosineLRScheduler(
        optimizer,
        t_initial=cfg["train"]["iterations"],
        lr_min=sched["min_lr"],
        warmup_t=sched["warmup_iterations"],
        warmup_lr_init=sched["warmup_lr"],
        t_in_epochs=False,
    )


def predict_segmentation(
    model: ViLUperNet,
    images: torch.Tensor,
    scale: tuple[int, int] = (2048, 512),
    ratios: tuple[float, ...] = (1.0,),
    flip: bool = False,
    window: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    amp: str = "none",
) -> torch.Tensor:
    """Class probabilities [B, K, H, W] for normalised images [B, 3, H, W] at their original size (mmseg's test).

    For each ratio, the images are resized keeping their aspect ratio to ``scale`` x ratio (short side 512 x ratio
    for most ADE20K images), sliding-window logits are computed, resized back to H x W and turned into probabilities;
    with ``flip``, the mirrored images are added. The probabilities of all these views are averaged.
    """
    height, width = images.shape[-2:]
    total = None
    views = 0
    for ratio in ratios:
        size = keep_ratio_size(height, width, (scale[0] * ratio, scale[1] * ratio))
        resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            with autocast(images.device, amp):
                logits = model.slide_inference(resized.flip(-1) if mirrored else resized, window, stride)
            logits = logits.float().flip(-1) if mirrored else logits.float()
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probabilities = logits.softmax(dim=1)  # [B, K, H, W]
            total = probabilities if total is None else total + probabilities
            views += 1
    return total / views


def _finite_or_none(values: torch.Tensor) -> list[float | None]:
    # JSON has no NaN: a class absent from both prediction and ground truth has no IoU.
    return [v if math.isfinite(v) else None for v in values.tolist()]


@torch.no_grad()
def evaluate_segmentation(
    model: ViLUperNet,
    loader: DataLoader,
    cfg: dict,
    device: torch.device,
    ratios: tuple[float, ...] | None = None,
    flip: bool | None = None,
    progress: bool = False,
) -> dict:
    """mIoU, mAcc, aAcc (fractions in 0..1), per-class IoU / Acc and the image count over all ranks' loaders.

    Test-time views default to the recipe's ``eval.ratios`` / ``eval.flip``. ``progress`` prints a line every 30 s.
    """
    ratios = tuple(cfg["eval"]["ratios"] if ratios is None else ratios)
    flip = cfg["eval"]["flip"] if flip is None else flip
    was_training = model.training
    model.eval()
    meter = SegmentationMeter(cfg["data"]["num_classes"], device=device)
    count = 0
    start = last = time.monotonic()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        probabilities = predict_segmentation(
            model,
            images,
            scale=tuple(cfg["data"]["scale"]),
            ratios=ratios,
            flip=flip,
            window=tuple(cfg["eval"]["window"]),
            stride=tuple(cfg["eval"]["stride"]),
            amp=cfg["train"]["amp"],
        )
        meter.update(probabilities.argmax(dim=1), labels)
        count += images.shape[0]
        if progress and time.monotonic() - last > 30:
            last = time.monotonic()
            print(f"  evaluating: {count} images on this rank, {count / (last - start):.1f} img/s", flush=True)
    model.train(was_training)
    meter.all_reduce()
    total = int(all_reduce_sum([float(count)], device)[0])
    if total == 0:
        raise RuntimeError(f"The evaluation split {cfg['data']['val_split']} produced no images.")
    result = meter.compute()
    return {
        "mIoU": result["mIoU"],
        "mAcc": result["mAcc"],
        "aAcc": result["aAcc"],
        "IoU": _finite_or_none(result["IoU"]),
        "Acc": _finite_or_none(result["Acc"]),
        "images": total,
        "ratios": list(ratios),
        "flip": flip,
    }


SEG_CSV_COLUMNS = ["kind", "step", "loss", "lr", "grad_norm", "images_per_s", "mIoU", "mAcc", "aAcc", "time"]


class SegmentationMetricsLogger(MetricsLogger):
    """:class:`MetricsLogger` (metrics.jsonl, TensorBoard, resume truncation) whose metrics.csv has the segmentation
    columns; ``step`` is the iteration."""

    def __init__(self, run_dir: str, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True):
        super().__init__(run_dir, enabled, resume_step, tensorboard, csv_columns=SEG_CSV_COLUMNS)
