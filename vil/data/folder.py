"""ImageFolder trees (``<root>/<split>/<class>/<image>``): scanning and a loader with the same contract as shards.

:class:`FolderStream` yields the same batches as :class:`~vil.data.shards.ShardStream` (images, targets, ids,
health) with the same guarantees: a seeded per-epoch permutation split across ranks, exactly ``num_batches`` per rank,
batch ``n`` built by worker ``n % num_workers``, resumable part-way into an epoch, corrupt files skipped and counted.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .shards import DataError, DataHealth, DecodeFn, _mix_seed

__all__ = ["FOLDER_EXTENSIONS", "FolderIndex", "FolderStream", "scan_image_folder"]

FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff")


@dataclass
class FolderIndex:
    root: str
    classes: list[str]
    # Paths relative to root, and their labels (index into classes).
    files: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_samples(self) -> int:
        return len(self.files)


def scan_image_folder(root: str, classes: list[str] | None = None) -> FolderIndex:
    """All images under ``root/<class>/`` (recursively), classes sorted by name unless given."""
    if not os.path.isdir(root):
        raise DataError(f"ImageFolder root not found: {root}. Expected {root}/<class name>/<image files>.")
    if classes is None:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-directories; expected {root}/<class name>/<image files>.")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        if not os.path.isdir(class_dir):
            raise DataError(f"Class directory {class_dir} is missing (classes must match between splits).")
        found = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(FOLDER_EXTENSIONS):
                    found.append(os.path.relpath(os.path.join(dirpath, fn), root))
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"No images ({', '.join(FOLDER_EXTENSIONS)}) under {root}/<class>/.")
    return FolderIndex(root, classes, files, labels)


class FolderStream(IterableDataset):
    """Batches from an ImageFolder index for one rank; use with ``DataLoader(batch_size=None)``."""

    def __init__(
        self,
        index: FolderIndex,
        decode: DecodeFn,
        batch_size: int,
        *,
        train: bool,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_bad_fraction: float = 0.001,
    ):
        super().__init__()
        self.index, self.decode, self.batch_size, self.train = index, decode, batch_size, train
        self.num_batches, self.seed, self.rank, self.world_size = num_batches, seed, rank, world_size
        self.max_bad_fraction = max_bad_fraction
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _raw(self, i: int) -> dict:
        rel = self.index.files[i]
        with open(os.path.join(self.index.root, rel), "rb") as f:
            data = f.read()
        ext = os.path.splitext(rel)[1].lower().lstrip(".")
        ext = {"jpeg": "jpg", "tif": "png", "tiff": "png", "bmp": "png", "ppm": "png"}.get(ext, ext)
        return {
            "__key__": rel,
            "__url__": os.path.join(self.index.root, rel),
            ext: data,
            "cls": str(self.index.labels[i]).encode(),
        }

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.train:
            # The DataLoader asks worker 0 first; renumbering makes worker 0 the one that owns batch start_batch.
            worker = (worker + self.start_batch) % num_workers
        order = list(range(len(self.index)))
        if self.train:
            random.Random(_mix_seed("folder", self.seed, self.epoch)).shuffle(order)
        mine = order[self.rank :: self.world_size]
        if self.train:
            num_batches = self.num_batches
            if num_batches * self.batch_size > len(mine):
                raise DataError(
                    f"{num_batches} batches of {self.batch_size} need more than the {len(mine)} images "
                    f"of rank {self.rank}."
                )
        else:
            num_batches = -(-len(mine) // self.batch_size)
        quota = max(1, len(range(worker, num_batches, num_workers)) * self.batch_size)
        health = DataHealth(self.max_bad_fraction * quota, f"{quota} images (this worker's share of the epoch)", worker)
        start = self.start_batch if self.train else 0
        for n in range(worker, num_batches, num_workers):
            if n < start:
                continue
            items, ids = [], []
            for i in mine[n * self.batch_size : (n + 1) * self.batch_size]:
                raw = {"__key__": self.index.files[i], "__url__": os.path.join(self.index.root, self.index.files[i])}
                try:
                    raw = self._raw(i)
                    seed = _mix_seed("aug", self.seed, self.epoch, raw["__key__"]) if self.train else None
                    items.append(self.decode(raw, seed))
                    ids.append(i)
                except DataError:
                    raise
                except Exception as exc:
                    health.bad_sample(raw["__key__"], raw["__url__"], exc)
            if not items:
                raise DataError(f"Every image of a batch was unreadable (last: {raw['__url__']}).")
            fill = 0
            while self.train and len(items) < self.batch_size:
                items.append(items[fill])
                ids.append(ids[fill])
                fill += 1
            images = torch.stack([x for x, _ in items])
            targets = torch.tensor([y for _, y in items], dtype=torch.int64)
            yield images, targets, torch.tensor(ids, dtype=torch.int32), health.as_tensor()
