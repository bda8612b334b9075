"""ADE20K semantic segmentation data: ``<root>/images/<split>/*.jpg`` with ``<root>/annotations/<split>/*.png``.

Annotations hold 0 for "other"/unlabelled and 1..150 for the classes; samples come back reduced the way
:func:`vil.dense.reduce_ade20k_labels` does it (0 -> 255 ignore, k -> k - 1), as int64 label maps.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vil.dense.upernet import reduce_ade20k_labels

from .shards import DataError

__all__ = ["ADE20K_NUM_CLASSES", "ADE20K_SPLITS", "ADE20KDataset"]

ADE20K_NUM_CLASSES = 150
ADE20K_SPLITS = ("training", "validation")
IGNORE_INDEX = 255

# transform(image, label, generator) -> (image, label); image is PIL RGB, label int64 [H, W] (reduced).
SegTransform = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _mix(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (no Python hash randomisation)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class ADE20KDataset(Dataset):
    """Map-style ADE20K split: item ``i`` is ``(image, label)``.

    Without a transform, ``image`` is a PIL RGB image and ``label`` an int64 tensor [H, W] with values 0..149 or 255.
    With a transform (see :mod:`vil.data.seg_transforms`), it is called as ``transform(image, label, generator)``
    and its result is returned. ``generator`` is ``None`` (torch's global RNG, seeded per worker by the DataLoader)
    unless ``seed`` is given: then each sample gets its own generator seeded from (seed, epoch, index), so the
    augmentation of a sample does not depend on worker count or order; call :meth:`set_epoch` every epoch.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        transform: SegTransform | None = None,
        seed: int | None = None,
    ) -> None:
        if split not in ADE20K_SPLITS:
            raise ValueError(f"split must be one of {ADE20K_SPLITS}, got {split!r}")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(
                f"ADE20K root not found: {root}. Expected {root}/images/{split}/*.jpg and "
                f"{root}/annotations/{split}/*.png (the ADEChallengeData2016 layout)."
            )
        self.root, self.split, self.transform, self.seed = root, split, transform, seed
        self.epoch = 0
        self.image_dir = os.path.join(root, "images", split)
        self.label_dir = os.path.join(root, "annotations", split)
        for kind, directory in (("image", self.image_dir), ("annotation", self.label_dir)):
            if not os.path.isdir(directory):
                raise DataError(
                    f"ADE20K {kind} directory missing: {directory}. Expected {root}/images/{split}/*.jpg and "
                    f"{root}/annotations/{split}/*.png; point root at the ADEChallengeData2016 folder."
                )
        stems = sorted(os.path.splitext(n)[0] for n in os.listdir(self.image_dir) if n.lower().endswith(".jpg"))
        if not stems:
            raise DataError(f"No .jpg images in {self.image_dir}.")
        annotations = {os.path.splitext(n)[0] for n in os.listdir(self.label_dir) if n.lower().endswith(".png")}
        missing = [s for s in stems if s not in annotations]
        if missing:
            first = missing[0]
            raise DataError(
                f"{len(missing)} of {len(stems)} images in {self.image_dir} have no annotation, e.g. "
                f"{self._image_path(first)} has no {self._label_path(first)}; add the missing .png files or remove "
                f"those images from {self.image_dir}."
            )
        self.stems = stems

    def _image_path(self, stem: str) -> str:
        return os.path.join(self.image_dir, stem + ".jpg")

    def _label_path(self, stem: str) -> str:
        return os.path.join(self.label_dir, stem + ".png")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.stems)

    def _load(self, path: str, modes: tuple[str, ...]) -> Image.Image:
        """Fully decoded image in one of ``modes`` (converted to the first otherwise)."""
        # load() decodes everything, so truncated or corrupt files fail here, naming the file.
        try:
            with Image.open(path) as img:
                img.load()
                return img.copy() if img.mode in modes else img.convert(modes[0])
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"Cannot decode {path} ({type(exc).__name__}: {exc}); re-extract it from the ADE20K archive or "
                f"remove it together with its image/annotation pair."
            ) from exc

    def load_pair(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        """Decoded (PIL RGB image, reduced int64 label [H, W]) of sample ``index``, before any transform."""
        stem = self.stems[index]
        image_path, label_path = self._image_path(stem), self._label_path(stem)
        image = self._load(image_path, ("RGB",))
        # Palette PNGs keep their indices (np.array of a "P" image gives the index map).
        label_img = self._load(label_path, ("L", "P"))
        if image.size != label_img.size:
            raise DataError(
                f"Size mismatch: {image_path} is {image.size[0]}x{image.size[1]} (WxH) but {label_path} is "
                f"{label_img.size[0]}x{label_img.size[1]}; the annotation must have the image's size."
            )
        raw = torch.from_numpy(np.array(label_img, dtype=np.uint8, copy=True))
        if int(raw.max()) > ADE20K_NUM_CLASSES:
            raise DataError(
                f"{label_path} holds label {int(raw.max())} > {ADE20K_NUM_CLASSES}; ADE20K annotations use 0 "
                f"(unlabelled) and 1..{ADE20K_NUM_CLASSES}."
            )
        return image, reduce_ade20k_labels(raw, IGNORE_INDEX)

    def __getitem__(self, index: int):
        image, label = self.load_pair(index)
        if self.transform is None:
            return image, label
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, index))
        return self.transform(image, label, generator)
