"""ImageFolder trees (loader and conversion to shards) and the offline MNIST shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vil.data import (
    DataError,
    DecodeSample,
    FolderStream,
    ShardStream,
    build_transform,
    iter_shard,
    load_mnist5k,
    prepare_mnist5k,
    resolve_shards,
    scan_image_folder,
)
from vil.training import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_tree(root: str, per_class: int = 6, corrupt: str | None = None) -> None:
    """root/{train,validation}/{cat,dog}/ with JPEG and PNG files whose brightness encodes the class."""
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for label, name in enumerate(("cat", "dog")):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                pixels = (rng.integers(0, 40, (20, 24, 3)) + 200 * label).astype(np.uint8)
                ext = "JPEG" if i % 2 else "png"
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{name}_{i}.{ext}"))
    if corrupt:
        with open(os.path.join(root, corrupt), "wb") as f:
            f.write(b"\xff\xd8 truncated jpeg")


def folder_cfg(root: str) -> dict:
    return load_config(
        None,
        [
            f"data.root={root}",
            "data.format=folder",
            "data.num_classes=2",
            "data.img_size=16",
            "aug.auto_augment=null",
        ],
    )


def test_scan_image_folder_and_errors(tmp_path):
    make_tree(str(tmp_path))
    index = scan_image_folder(str(tmp_path / "train"))
    assert index.classes == ["cat", "dog"] and len(index) == 12 and index.labels.count(1) == 6
    with pytest.raises(DataError, match="not found"):
        scan_image_folder(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(DataError, match="No images"):
        scan_image_folder(str(tmp_path / "empty"))


def test_folder_stream_skips_corrupt_files(tmp_path):
    make_tree(str(tmp_path), corrupt="train/dog/dog_bad.jpg")
    cfg = folder_cfg(str(tmp_path))
    index = scan_image_folder(str(tmp_path / "train"))
    decode = DecodeSample(build_transform(cfg, train=True), 3, 2)
    stream = FolderStream(index, decode, 4, train=True, num_batches=3, max_bad_fraction=0.2)
    stream.set_position(0)
    with pytest.warns(RuntimeWarning, match="dog_bad.jpg"):
        batches = list(DataLoader(stream, batch_size=None, num_workers=0))
    assert len(batches) == 3 and all(b[0].shape == (4, 3, 16, 16) for b in batches)
    assert batches[-1][3].tolist()[1] <= 1
    strict = FolderStream(index, decode, 13, train=True, num_batches=1, max_bad_fraction=0.0)
    with pytest.raises(DataError, match="dog_bad.jpg"), pytest.warns(RuntimeWarning):
        list(DataLoader(strict, batch_size=None, num_workers=0))


def test_convert_image_folder_cli(tmp_path):
    src, out = tmp_path / "tree", tmp_path / "shards"
    make_tree(str(src), corrupt="train/cat/cat_bad.jpg")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train", "make_shards.py"),
            "folder",
            "--src",
            str(src),
            "--out",
            str(out),
            "--prefix",
            "pets",
            "--shard-size",
            "5",
            "--max-bad-fraction",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cat_bad.jpg" in proc.stderr
    info = json.loads((out / "_info.json").read_text())
    assert info["classes"] == ["cat", "dog"]
    assert info["splits"]["train"]["num_samples"] == 12 and info["splits"]["train"]["shard_lengths"] == [5, 5, 2]
    assert info["splits"]["validation"]["num_samples"] == 12
    # Original bytes are kept (JPEG stays JPEG) and labels match the class directories.
    samples = [s for url in resolve_shards(str(out), "train").urls for s in iter_shard(url)]
    assert {k for s in samples for k in s if not k.startswith("__")} == {"jpg", "png", "cls"}
    for s in samples:
        assert int(s["cls"]) == (1 if "dog" in s["__key__"] else 0)
    # A strict conversion stops and names the file.
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train", "make_shards.py"),
            "folder",
            "--src",
            str(src),
            "--out",
            str(tmp_path / "strict"),
            "--max-bad-fraction",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "cat_bad.jpg" in proc.stderr and "error:" in proc.stderr


def test_mnist5k_shards_hold_out_fixed_digits(tmp_path):
    root = str(tmp_path / "mnist")
    prepare_mnist5k(root, holdout_per_class=50)
    images, labels = load_mnist5k()
    train = [s for url in resolve_shards(root, "train").urls for s in iter_shard(url)]
    val = [s for url in resolve_shards(root, "validation").urls for s in iter_shard(url)]
    assert len(train) == 4500 and len(val) == 500 and len(resolve_shards(root, "train")) >= 4
    train_ids = {int(s["__key__"].split("_")[1]) for s in train}
    val_ids = {int(s["__key__"].split("_")[1]) for s in val}
    assert not train_ids & val_ids
    assert np.bincount(labels[sorted(val_ids)], minlength=10).tolist() == [50] * 10
    # The stored digits are the real ones, losslessly.
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.format=mnist5k",
            "data.in_chans=1",
            "data.mean=[0.0]",
            "data.std=[1.0]",
            "data.img_size=28",
            "data.num_classes=10",
        ],
    )
    stream = ShardStream(
        resolve_shards(root, "validation"), DecodeSample(build_transform(cfg, False), 1, 10), 500, train=False
    )
    x, y, _, _ = next(iter(stream))
    first = int(val[0]["__key__"].split("_")[1])
    assert torch.allclose(x[0, 0], torch.from_numpy(images[first]).float() / 255, atol=1e-6)
    assert int(y[0]) == labels[first]
    # A second call reuses the shards; another held-out size is refused rather than silently mixed up.
    prepare_mnist5k(root, holdout_per_class=50)
    with pytest.raises(DataError, match="held-out"):
        prepare_mnist5k(root, holdout_per_class=20)
