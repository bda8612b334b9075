"""Build the train / eval loaders of a run config (``data`` and ``aug`` sections) for one rank."""

from __future__ import annotations

import os
import warnings

import torch
from torch.utils.data import DataLoader

from .folder import FolderIndex, FolderStream, scan_image_folder
from .mnist import prepare_mnist5k
from .shards import DataError, ShardSet, ShardStream, resolve_shards
from .transforms import DecodeSample, build_transform

__all__ = ["build_loader", "open_split", "prepare_data"]


def prepare_data(cfg: dict) -> None:
    """One-time preparation (writing the MNIST shards); call on one process per node before :func:`open_split`."""
    if cfg["data"]["format"] == "mnist5k":
        prepare_mnist5k(cfg["data"]["root"], holdout_per_class=cfg["data"]["holdout_per_class"])


def open_split(cfg: dict, train: bool, classes: list[str] | None = None) -> ShardSet | FolderIndex:
    """Locate the training or evaluation split; raises :class:`DataError` naming what is missing."""
    data = cfg["data"]
    split = data["train_split"] if train else data["val_split"]
    if data["format"] == "folder":
        return scan_image_folder(os.path.join(data["root"], split), classes=classes)
    source = resolve_shards(data["root"], split)
    if source.num_samples <= 0:
        raise DataError(
            f"The number of samples of '{split}' is unknown (no _info.json entry); append it to the pattern, "
            f"e.g. data.{'train' if train else 'val'}_split='{split}|<num_samples>'."
        )
    return source


def build_loader(
    cfg: dict,
    source: ShardSet | FolderIndex,
    *,
    train: bool,
    batch_size: int,
    num_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of ready batches ``(images, targets, ids, health)`` for this rank.

    Training loaders give exactly ``num_batches`` batches per epoch; call ``loader.dataset.set_position(epoch,
    start_batch)`` before iterating each epoch.
    """
    data = cfg["data"]
    decode = DecodeSample(build_transform(cfg, train), data["in_chans"], data["num_classes"])
    seed = cfg["run"]["seed"]
    num_workers = data["num_workers"] if num_workers is None else num_workers
    if isinstance(source, FolderIndex):
        dataset = FolderStream(
            source,
            decode,
            batch_size,
            train=train,
            num_batches=num_batches,
            seed=seed,
            rank=rank,
            world_size=world_size,
            max_bad_fraction=data["max_bad_fraction"],
        )
    else:
        readers = world_size * max(1, num_workers)
        if train and len(source) < readers and rank == 0:
            warnings.warn(
                f"{len(source)} shards for {world_size} ranks x {max(1, num_workers)} loader workers: every worker "
                f"reads every shard and keeps its share of the samples. Use at least {readers} shards for large data.",
                stacklevel=2,
            )
        dataset = ShardStream(
            source,
            decode,
            batch_size,
            train=train,
            num_batches=num_batches,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=data["shuffle_buffer"],
            shuffle_initial=data["shuffle_initial"],
            max_bad_fraction=data["max_bad_fraction"],
        )
    # A private generator keeps the loader from drawing on the global torch RNG (which resume restores exactly).
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
