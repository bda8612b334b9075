"""ImageFolder training through train/train.py, fine-tuning initialisation, layer-wise lr decay and weight decay."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vil.training import build_model, build_optimizer, load_checkpoint, load_config
from vil.training.checkpoint import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MNIST_RECIPE = os.path.join(REPO, "configs", "mnist_vil_tiny.yaml")
SMALL = "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2}"


def make_tree(root: str, per_class: int = 16) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for label, name in enumerate(("dark", "bright")):
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                pixels = (rng.integers(0, 60, (30, 40, 3)) + 180 * label).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.jpg"))


def folder_overrides(tmp_path, img_size: int = 32) -> list[str]:
    return [
        f"run.output_dir={tmp_path}", "data.format=folder", f"data.root={tmp_path / 'tree'}", "data.num_classes=2",
        "data.in_chans=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", f"data.img_size={img_size}",
        "train.batch_size=8", "train.epochs=2", "data.num_workers=1", "train.log_interval=2", SMALL,
    ]  # fmt: skip


def test_image_folder_run_then_finetune_init(tmp_path):
    make_tree(str(tmp_path / "tree"))
    cmd = [sys.executable, os.path.join(REPO, "train", "train.py"), "--config", MNIST_RECIPE,
           "run.name=folder", *folder_overrides(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy: top-1" in proc.stdout and "32 training images, 4 steps/epoch" in proc.stdout
    ckpt_path = str(tmp_path / "folder" / "checkpoints" / "last.pt")
    pretrained = load_checkpoint(ckpt_path)["model"]

    # Fine-tuning at a higher resolution with another classifier: the trunk loads, the position-embedding grid is
    # resampled, the head of the wrong size is left at its initialisation.
    cfg = load_config(
        MNIST_RECIPE,
        [*folder_overrides(tmp_path, img_size=48), "data.num_classes=5", f"model.init_checkpoint={ckpt_path}"],
    )
    with pytest.warns(UserWarning, match="head"):
        model = build_model(cfg)
    state = model.state_dict()
    trunk = [k for k in pretrained if not k.startswith("head") and "pos_embed" not in k]
    assert trunk and all(torch.equal(state[k], pretrained[k]) for k in trunk)
    pos = next(k for k in state if "pos_embed" in k)
    assert state[pos].shape[1:3] == (6, 6) and pretrained[pos].shape[1:3] == (4, 4)
    assert state[pos].std() > 0

    cfg["model"]["init_checkpoint"] = str(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing.pt"):
        build_model(cfg)


def test_optimizer_groups_weight_decay_and_layer_decay():
    cfg = load_config(
        os.path.join(REPO, "configs", "vil_tiny_in1k_pt192.yaml"),
        ["data.root=/x", "model.kwargs={embed_dim: 32, depth: 4}"],
    )
    model = build_model(cfg)
    plain = build_optimizer(cfg, model, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in plain.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in plain.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "pos_embed" in no_decay or any("pos_embed" in n for n in no_decay)
    assert all(not n.endswith(".bias") for n in decay)
    assert all(p.ndim > 1 for n, p in model.named_parameters() if n in decay)
    assert any(n.endswith(".bias") for n in no_decay) and decay

    cfg["optim"]["layer_decay"] = 0.65
    layered = build_optimizer(cfg, model, 1e-3)
    scales = sorted({g["lr_scale"] for g in layered.param_groups})
    # Stem, two pairs of sub-blocks, head: several distinct lr scales, the largest 1.0 (the head).
    assert len(scales) >= 3 and scales[-1] == pytest.approx(1.0) and scales[0] < 0.65
