"""Convert an ImageFolder tree into webdataset shards with an ``_info.json`` (the entry point is train/make_shards.py).

Images are stored as they are (JPEG/PNG/WebP bytes, no re-encoding; other formats become PNG) together with a
``.cls`` label, in a seeded random order so that each shard mixes classes. With ``verify`` every image is decoded
first; corrupt ones are skipped with a warning and counted, and past ``max_bad_fraction`` the conversion stops.
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
import time
import warnings
from multiprocessing import get_context

from PIL import Image

from .folder import scan_image_folder
from .shards import AtomicShardWriter, DataError, write_info

__all__ = ["convert_image_folder"]

_KEEP = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def _load(args: tuple[str, bool]) -> tuple[str, bytes | None, str]:
    """(extension, bytes, error) for one file; runs in pool workers."""
    path, verify = args
    ext = _KEEP.get(os.path.splitext(path)[1].lower())
    try:
        with open(path, "rb") as f:
            data = f.read()
        if verify or ext is None:
            img = Image.open(io.BytesIO(data))
            img.load()
            if ext is None:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
        return ext, data, ""
    except Exception as exc:
        return ext or "", None, f"{type(exc).__name__}: {exc}"


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def convert_image_folder(
    src: str,
    out: str,
    splits: tuple[str, ...] = ("train", "validation"),
    prefix: str = "data",
    shard_size: int = 1000,
    seed: int = 0,
    verify: bool = True,
    max_bad_fraction: float = 0.001,
    workers: int = 0,
    log=sys.stderr,
) -> dict:
    """Write ``out/{prefix}-{split}-NNNN.tar`` and ``out/_info.json``; returns {split: (filenames, lengths)}."""
    if shard_size <= 0:
        raise DataError(f"shard size must be positive, got {shard_size}.")
    classes = None
    written = {}
    os.makedirs(out, exist_ok=True)
    pool = get_context("fork").Pool(workers) if workers > 0 else None
    try:
        for split in splits:
            index = scan_image_folder(os.path.join(src, split), classes=classes)
            classes = index.classes
            order = list(range(len(index)))
            random.Random(seed).shuffle(order)
            paths = [(os.path.join(index.root, index.files[i]), verify) for i in order]
            results = pool.imap(_load, paths, chunksize=32) if pool else map(_load, paths)
            bad, budget = 0, max_bad_fraction * len(order)
            start = last = time.monotonic()
            with AtomicShardWriter(out, prefix, split, shard_size) as writer:
                for n, (i, (ext, data, error)) in enumerate(zip(order, results), 1):
                    rel = index.files[i]
                    if data is None:
                        bad += 1
                        warnings.warn(
                            f"Skipping unreadable image {os.path.join(index.root, rel)}: {error}", stacklevel=2
                        )
                        if bad > budget:
                            raise DataError(
                                f"{bad} unreadable images in {index.root} exceed max_bad_fraction={max_bad_fraction}; "
                                f"last: {os.path.join(index.root, rel)} ({error}). Fix or remove it, or raise "
                                f"--max-bad-fraction."
                            )
                        continue
                    key = f"{n:08d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(rel)[0])
                    writer.write(key, {ext: data, "cls": str(index.labels[i]).encode()})
                    now = time.monotonic()
                    if log is not None and (now - last > 2.0 or n == len(order)):
                        rate = n / max(now - start, 1e-9)
                        print(
                            f"{split}: {n}/{len(order)} images  {rate:.0f} images/s  "
                            f"ETA {_fmt_eta((len(order) - n) / rate)}  skipped {bad}",
                            file=log,
                            flush=True,
                        )
                        last = now
            written[split] = writer.close()
            if log is not None:
                print(
                    f"{split}: {sum(written[split][1])} samples in {len(written[split][0])} shards, {bad} skipped",
                    file=log,
                )
    finally:
        if pool is not None:
            pool.terminate()
    write_info(out, prefix, written, classes=classes, source=os.path.abspath(src))
    return written
