"""Image decoding and timm transforms for the recipes (RandomResizedCrop, flip, 3-Augment, colour jitter)."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from PIL import Image
from timm.data import create_transform

from .shards import IMAGE_KEYS, DataError, seeded_rng

__all__ = ["DecodeSample", "build_transform", "decode_image"]


def build_transform(cfg: dict, train: bool) -> Callable:
    """timm's ImageNet transform for ``cfg`` (the ``data`` and ``aug`` sections of a run config)."""
    data, aug = cfg["data"], cfg["aug"]
    common = {
        "input_size": (data["in_chans"], data["img_size"], data["img_size"]),
        "interpolation": data["interpolation"],
        "mean": tuple(data["mean"]),
        "std": tuple(data["std"]),
    }
    if not train:
        return create_transform(**common, is_training=False, crop_pct=data["eval_crop_pct"])
    return create_transform(
        **common,
        is_training=True,
        scale=tuple(aug["scale"]),
        ratio=tuple(aug["ratio"]),
        hflip=aug["hflip"],
        auto_augment=aug["auto_augment"],
        color_jitter=aug["color_jitter"],
        re_prob=aug["re_prob"],
    )


def decode_image(data: bytes, in_chans: int) -> Image.Image:
    """Fully decode image bytes (so truncated files fail here, not later) into RGB or greyscale."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB" if in_chans == 3 else "L")


class DecodeSample:
    """Raw webdataset sample -> (image tensor, label); seeds the augmentation when given a seed."""

    def __init__(self, transform: Callable, in_chans: int, num_classes: int):
        self.transform, self.in_chans, self.num_classes = transform, in_chans, num_classes

    def __call__(self, raw: dict, aug_seed: int | None) -> tuple[torch.Tensor, int]:
        ext = next((k for k in IMAGE_KEYS if k in raw), None)
        if ext is None:
            raise ValueError(f"no image (.{', .'.join(IMAGE_KEYS)}) in sample, keys: {sorted(raw)}")
        if "cls" not in raw:
            raise ValueError(f"no .cls label in sample, keys: {sorted(raw)}")
        label = int(raw["cls"].decode().strip())
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"Label {label} of sample '{raw['__key__']}' in {raw['__url__']} is outside 0..{self.num_classes - 1}; "
                f"set data.num_classes to the dataset's class count."
            )
        img = decode_image(raw[ext], self.in_chans)
        if aug_seed is None:
            return self.transform(img), label
        with seeded_rng(aug_seed):
            return self.transform(img), label
