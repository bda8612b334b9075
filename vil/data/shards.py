"""Webdataset shards: locating them (``_info.json`` or brace patterns), writing them atomically, and streaming them.

A shard is a tar file of samples that share a basename: an image (``.jpg``/``.jpeg``/``.png``/``.webp``) and an
integer label as text (``.cls``). ``_info.json`` follows the layout timm's webdataset reader uses:
``{"name": ..., "splits": {"train": {"name", "num_samples", "filenames", "shard_lengths"}}}``.

:class:`ShardStream` is the loader-side reader. For training it gives every rank exactly ``num_batches`` batches per
epoch (so every rank does the same number of steps), shuffles shards per epoch with a seed, splits them across ranks
and loader workers, shuffles samples in a seeded buffer and can start part-way into an epoch (resume). Each image's
augmentation is seeded from (seed, epoch, sample key), so the data a step sees does not depend on when the run was
interrupted. Corrupt images and truncated shards are skipped with a warning and counted; past
``max_bad_fraction`` of the epoch's samples the run stops with an error naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = [
    "IMAGE_KEYS",
    "AtomicShardWriter",
    "DataError",
    "ShardSet",
    "ShardStream",
    "assign_shards",
    "iter_shard",
    "read_info",
    "resolve_shards",
    "write_info",
]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
INFO_NAME = "_info.json"


class DataError(RuntimeError):
    """Bad input data: missing shards, corrupt images past the allowed fraction, labels out of range."""


def _is_url(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def _join(root: str, name: str) -> str:
    if _is_url(name) or os.path.isabs(name):
        return name
    return root.rstrip("/") + "/" + name


def _open(url: str):
    if _is_url(url):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(url, "rb")


def read_info(root: str) -> dict | None:
    """The ``_info.json`` under ``root`` (a directory or URL prefix), or None when there is none."""
    url = _join(root, INFO_NAME)
    if not _is_url(url) and not os.path.isfile(url):
        return None
    try:
        with _open(url) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        if not _is_url(url):
            raise DataError(f"{url} is not valid JSON ({exc}); re-create it with train/make_shards.py.") from exc
        return None


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_info(out_dir: str, name: str, splits: dict[str, tuple[list[str], list[int]]], **extra: object) -> str:
    """Write ``_info.json`` for ``splits``: {split: (shard file names, samples per shard)}; ``extra`` keys go on top."""
    info: dict = {"name": name, **extra, "splits": {}}
    for split, (filenames, lengths) in splits.items():
        info["splits"][split] = {
            "name": split,
            "num_samples": int(sum(lengths)),
            "filenames": list(filenames),
            "shard_lengths": [int(n) for n in lengths],
        }
    path = os.path.join(out_dir, INFO_NAME)
    _write_atomic(path, (json.dumps(info, indent=1) + "\n").encode())
    return path


@dataclass
class ShardSet:
    """The shards of one split: full URLs or paths, samples per shard (when known) and the total."""

    urls: list[str]
    lengths: list[int] | None
    num_samples: int
    name: str

    def __len__(self) -> int:
        return len(self.urls)


def resolve_shards(root: str, split: str) -> ShardSet:
    """Find the shards of ``split`` under ``root``.

    ``split`` is a split name of ``root/_info.json`` or a brace pattern (``name-{0000..0063}.tar``), optionally
    followed by ``|num_samples``; a pattern's sizes are looked up in ``_info.json`` when it lists those files.
    """
    import braceexpand

    info = read_info(root)
    is_pattern = ".tar" in split or "{" in split
    if not is_pattern:
        if info is None:
            raise DataError(
                f"No {INFO_NAME} under '{root}' to look up split '{split}'. Convert the data with "
                f"`python train/make_shards.py folder --src <ImageFolder root> --out {root}`, or give the shards as a "
                f"brace pattern with the sample count, e.g. data.train_split='name-{{0000..0099}}.tar|128000'."
            )
        splits = info.get("splits", {})
        if split not in splits:
            raise DataError(
                f"Split '{split}' is not in {_join(root, INFO_NAME)} (it has: {', '.join(splits) or 'none'})."
            )
        entry = splits[split]
        urls = [_join(root, f) for f in entry["filenames"]]
        lengths = [int(n) for n in entry["shard_lengths"]] if entry.get("shard_lengths") else None
        num = int(entry["num_samples"])
        shard_set = ShardSet(urls, lengths, num, split)
    else:
        pattern, _, count = split.partition("|")
        names = list(braceexpand.braceexpand(pattern))
        urls = [_join(root, n) for n in names]
        known = {}
        for entry in (info or {}).get("splits", {}).values():
            known.update(zip(entry.get("filenames", []), entry.get("shard_lengths", [])))
        lengths = [int(known[n]) for n in names] if all(n in known for n in names) else None
        if count:
            num = int(count)
        elif lengths is not None:
            num = sum(lengths)
        else:
            num = 0
        shard_set = ShardSet(urls, lengths, num, pattern)
    missing = [u for u in shard_set.urls if not _is_url(u) and not os.path.isfile(u)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(shard_set.urls)} shards of '{split}' are missing, first: {missing[0]}. "
            f"Check data.root='{root}' or re-create the shards with train/make_shards.py."
        )
    if not shard_set.urls:
        raise DataError(f"Split '{split}' under '{root}' names no shards.")
    return shard_set


class AtomicShardWriter:
    """Write samples into numbered tar shards of at most ``max_count`` samples; each shard appears atomically.

    Files are ``{prefix}-{split}-{index:04d}.tar``. A shard is written under a temporary name, fsync'ed and renamed,
    so an interrupted conversion never leaves a half-written shard under the final name.
    """

    def __init__(self, out_dir: str, prefix: str, split: str, max_count: int):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.split, self.max_count = out_dir, prefix, split, max_count
        self.filenames: list[str] = []
        self.lengths: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp = ""
        self._count = 0

    def _next_shard(self) -> None:
        self._finish_shard()
        name = f"{self.prefix}-{self.split}-{len(self.filenames):04d}.tar"
        self.filenames.append(name)
        self.lengths.append(0)
        self._tmp = os.path.join(self.out_dir, f".{name}.tmp.{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, os.path.join(self.out_dir, self.filenames[-1]))
        self._tar = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: ``files`` maps extensions (``jpg``, ``cls``) to bytes; all share the basename ``key``."""
        if self._tar is None or self.lengths[-1] >= self.max_count:
            self._next_shard()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            # A fixed mtime keeps shards byte-identical between conversions of the same data.
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self.lengths[-1] += 1

    def close(self) -> tuple[list[str], list[int]]:
        self._finish_shard()
        return self.filenames, self.lengths

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            self._file.close()
            os.remove(self._tmp)


def _split_key(name: str) -> tuple[str, str]:
    """``dir/n0001_12.jpg`` -> (``dir/n0001_12``, ``jpg``): the key is everything before the first dot of the base."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_shard(url: str) -> Iterator[dict]:
    """Raw samples of one shard: dicts of ``__key__``, ``__url__`` and extension -> bytes.

    Raises whatever reading the tar raises (a truncated shard raises part-way, after its complete samples).
    """
    with _open(url) as stream:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        sample: dict | None = None
        for member in tar:
            if not member.isreg():
                continue
            key, ext = _split_key(member.name)
            if key.startswith("__") or not ext:
                continue
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"unexpected end of data in {member.name}")
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
            # Streaming tar mode keeps every member header otherwise.
            tar.members = []
        if sample is not None:
            yield sample


def _mix_seed(*parts: object) -> int:
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@contextmanager
def seeded_rng(seed: int):
    """Seed python, numpy and torch (CPU) RNGs for one sample's augmentation; restore the caller's state after."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def assign_shards(
    num_shards: int, *, epoch: int, seed: int, rank: int, world_size: int, worker: int, num_workers: int, shuffle: bool
) -> tuple[list[int], int, int]:
    """Which shards one loader worker of one rank reads in ``epoch``.

    Returns (shard indices in reading order, slot, num_slots). With at least ``world_size * num_workers`` shards every
    worker gets its own shards (num_slots 1). With fewer, every worker reads all shards and keeps sample i when
    ``i % num_slots == slot`` (disjoint, but each shard is read num_slots times: fine for small data only).
    """
    order = list(range(num_shards))
    if shuffle:
        random.Random(_mix_seed("shards", seed, epoch)).shuffle(order)
    if num_shards >= world_size * num_workers:
        return order[rank::world_size][worker::num_workers], 0, 1
    return order, rank * num_workers + worker, world_size * num_workers


class DataHealth:
    """Counts corrupt samples and truncated shards of one loader worker and stops the run past the budget."""

    max_warnings = 20

    def __init__(self, max_bad: float, budget_desc: str, worker: int = 0):
        self.max_bad, self.budget_desc, self.worker = max_bad, budget_desc, worker
        self.corrupt = 0
        self.truncated = 0
        self.lost = 0
        self._warned = 0

    def _warn(self, message: str) -> None:
        self._warned += 1
        if self._warned <= self.max_warnings:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        elif self._warned == self.max_warnings + 1:
            warnings.warn(
                "Further bad-data warnings of this loader worker are counted but not printed.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _check(self, where: str) -> None:
        bad = self.corrupt + self.lost
        if bad > self.max_bad:
            raise DataError(
                f"Too much bad data: {self.corrupt} corrupt samples and {self.truncated} truncated shards "
                f"({self.lost} samples lost) exceed data.max_bad_fraction of {self.budget_desc}. "
                f"Last bad file: {where}. "
                f"Repair or re-create that file (train/make_shards.py), or raise data.max_bad_fraction."
            )

    def bad_sample(self, key: str, url: str, exc: BaseException) -> None:
        self.corrupt += 1
        self._warn(f"Skipping corrupt sample '{key}' in {url}: {type(exc).__name__}: {exc}")
        self._check(f"{url} (sample '{key}')")

    def truncated_shard(self, url: str, read: int, expected: int | None, lost: int, exc: BaseException) -> None:
        self.truncated += 1
        self.lost += lost
        self._warn(
            f"Shard {url} is truncated or unreadable after {read} samples"
            f"{f' of {expected}' if expected is not None else ''}: {type(exc).__name__}: {exc}. Skipping the rest."
        )
        self._check(url)

    def as_tensor(self) -> torch.Tensor:
        """[worker, corrupt samples, truncated shards, samples lost to truncation] (running counts of the epoch)."""
        return torch.tensor([self.worker, self.corrupt, self.truncated, self.lost], dtype=torch.int64)


DecodeFn = Callable[[dict, int | None], tuple[torch.Tensor, int]]


class ShardStream(IterableDataset):
    """Batches from webdataset shards for one rank; use with ``DataLoader(batch_size=None)``.

    Each item is ``(images [B, C, H, W], targets [B], shard_ids [B], health [4])`` where ``health`` holds the worker
    id and its running counts of corrupt samples, truncated shards and samples lost to truncation this epoch.

    Training (``train=True``): exactly ``num_batches`` full batches per epoch on every rank; shards reshuffled per
    epoch; a worker whose shards run out before its quota reads them again in a new order. Call
    :meth:`set_position` before creating each epoch's iterator. Evaluation: every sample once, in order, the last
    batch possibly short.

    ``decode(raw_sample, aug_seed)`` turns a raw sample into (image tensor, label); ``aug_seed`` is None for eval.
    """

    def __init__(
        self,
        shards: ShardSet,
        decode: DecodeFn,
        batch_size: int,
        *,
        train: bool,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 5000,
        shuffle_initial: int = 1000,
        max_bad_fraction: float = 0.001,
    ):
        super().__init__()
        if train and not num_batches:
            raise ValueError("A training ShardStream needs num_batches (batches per rank per epoch).")
        self.shards, self.decode, self.batch_size, self.train = shards, decode, batch_size, train
        self.num_batches = num_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.max_bad_fraction = max_bad_fraction
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Start the next iterator at batch ``start_batch`` of ``epoch`` (batches of this rank, from 0)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _raw_samples(
        self, shard_ids: list[int], slot: int, num_slots: int, health: DataHealth
    ) -> Iterator[tuple[int, dict]]:
        index = 0
        for sid in shard_ids:
            url = self.shards.urls[sid]
            expected = self.shards.lengths[sid] if self.shards.lengths is not None else None
            read = 0
            try:
                for sample in iter_shard(url):
                    read += 1
                    if index % num_slots == slot:
                        yield sid, sample
                    index += 1
                # A tar cut at a member boundary reads as a short but valid archive: only its length tells.
                if expected is not None and read < expected:
                    raise EOFError(f"{read} samples, _info.json says {expected}")
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                # This worker's share of the samples the truncation cost (at least one, when the length is unknown).
                lost = max(1, -(-(expected - read) // num_slots)) if expected is not None else 1
                health.truncated_shard(url, read, expected, lost, exc)

    def _shuffled(self, samples: Iterator, rng: random.Random) -> Iterator:
        """Seeded shuffle buffer: fills to ``shuffle_initial`` before the first sample, then grows to its full size."""
        buf: list = []
        samples = iter(samples)
        for item in samples:
            buf.append(item)
            if len(buf) < self.shuffle_buffer:
                extra = next(samples, None)
                if extra is not None:
                    buf.append(extra)
            if len(buf) >= min(self.shuffle_initial, self.shuffle_buffer):
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _decode(self, sid: int, raw: dict, health: DataHealth) -> tuple[torch.Tensor, int] | None:
        aug_seed = _mix_seed("aug", self.seed, self.epoch, raw["__key__"]) if self.train else None
        try:
            return self.decode(raw, aug_seed)
        except DataError:
            raise
        except Exception as exc:
            health.bad_sample(raw["__key__"], raw["__url__"], exc)
            return None

    def _batch(self, items: list, shard_ids: list[int], health: DataHealth):
        images = torch.stack([x for x, _ in items])
        targets = torch.tensor([y for _, y in items], dtype=torch.int64)
        return images, targets, torch.tensor(shard_ids, dtype=torch.int32), health.as_tensor()

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.train:
            # The DataLoader asks worker 0 first; renumbering makes worker 0 the one that owns batch start_batch.
            worker = (worker + self.start_batch) % num_workers
        shard_ids, slot, num_slots = assign_shards(
            len(self.shards),
            epoch=self.epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            shuffle=self.train,
        )
        if self.train:
            yield from self._iter_train(shard_ids, slot, num_slots, worker, num_workers)
        else:
            yield from self._iter_eval(shard_ids, slot, num_slots, worker)

    def _iter_eval(self, shard_ids: list[int], slot: int, num_slots: int, worker: int):
        per_worker = max(1, self.shards.num_samples // max(1, self.world_size))
        health = DataHealth(self.max_bad_fraction * per_worker, f"{per_worker} samples of this rank", worker)
        items, sids = [], []
        for sid, raw in self._raw_samples(shard_ids, slot, num_slots, health):
            out = self._decode(sid, raw, health)
            if out is None:
                continue
            items.append(out)
            sids.append(sid)
            if len(items) == self.batch_size:
                yield self._batch(items, sids, health)
                items, sids = [], []
        if items:
            yield self._batch(items, sids, health)

    def _iter_train(self, shard_ids: list[int], slot: int, num_slots: int, worker: int, num_workers: int):
        # Workers hand batches to the DataLoader round-robin: batch n of this rank comes from worker n % num_workers.
        my_batches = len(range(worker, self.num_batches, num_workers))
        skip_batches = len(range(worker, min(self.start_batch, self.num_batches), num_workers))
        quota = my_batches * self.batch_size
        if my_batches == 0:
            return
        health = DataHealth(
            self.max_bad_fraction * quota, f"{quota} samples (this worker's share of the epoch)", worker
        )
        rng = random.Random(_mix_seed("buffer", self.seed, self.epoch, self.rank, worker))

        def endless() -> Iterator[tuple[int, dict]]:
            # Each pass over this worker's shards is shuffled and drained on its own, so a sample is repeated only
            # once all of them were used (a worker whose shards hold fewer samples than its quota).
            epoch_pass = 0
            while True:
                order = list(shard_ids)
                if epoch_pass > 0:
                    random.Random(_mix_seed("pass", self.seed, self.epoch, self.rank, worker, epoch_pass)).shuffle(
                        order
                    )
                produced = False
                for item in self._shuffled(self._raw_samples(order, slot, num_slots, health), rng):
                    produced = True
                    yield item
                if not produced:
                    raise DataError(
                        f"Rank {self.rank} worker {worker} found no readable samples in its shards "
                        f"({', '.join(self.shards.urls[i] for i in order[:3])}...). Check the shards."
                    )
                epoch_pass += 1

        stream = endless()
        # Resume: drop the raw samples of batches this worker already produced, without decoding them.
        for _ in range(skip_batches * self.batch_size):
            next(stream)
        for _ in range(my_batches - skip_batches):
            raws = [next(stream) for _ in range(self.batch_size)]
            items, sids = [], []
            for sid, raw in raws:
                out = self._decode(sid, raw, health)
                if out is not None:
                    items.append(out)
                    sids.append(sid)
            if not items:
                raise DataError(f"Every sample of a batch was corrupt (last from {raws[-1][1]['__url__']}).")
            # Keep the batch full (and its position in the epoch fixed) by repeating good samples of the same batch.
            fill = 0
            while len(items) < self.batch_size:
                items.append(items[fill])
                sids.append(sids[fill])
                fill += 1
            yield self._batch(items, sids, health)
