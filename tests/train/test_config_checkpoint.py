"""Recipes (YAML + overrides + _base_), checkpoint files (atomic, weights_only) and RNG capture."""

from __future__ import annotations

import argparse
import glob
import os
import random

import numpy as np
import pytest
import torch

from vil.training import (
    ConfigError,
    capture_rng,
    load_checkpoint,
    load_config,
    plan_batches,
    restore_rng,
    save_atomic,
)
from vil.training.segmentation import load_segmentation_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")


def test_every_recipe_loads():
    files = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
    assert len(files) >= 7
    for path in files:
        # The ADE20K segmentation recipes have their own schema (train/train_seg.py).
        if "ade20k" in os.path.basename(path):
            load_segmentation_config(path)
        else:
            load_config(path)


@pytest.mark.parametrize("size, epochs, drop_path", [("tiny", 800, 0.0), ("small", 400, 0.05), ("base", 400, 0.2)])
def test_imagenet_pretraining_recipes_match_the_paper(size, epochs, drop_path):
    cfg = load_config(os.path.join(CONFIGS, f"vil_{size}_in1k_pt192.yaml"), ["data.root=/x"])
    assert cfg["model"]["name"] == f"vil_{size}" and cfg["model"]["drop_path_rate"] == drop_path
    assert cfg["train"]["epochs"] == epochs and cfg["data"]["img_size"] == 192
    assert cfg["train"]["batch_size"] == 2048 and cfg["train"]["clip_grad"] == 1.0 and cfg["train"]["amp"] == "bf16"
    assert cfg["aug"]["auto_augment"] == "3a" and cfg["aug"]["color_jitter"] == 0.3
    assert (cfg["aug"]["mixup"], cfg["aug"]["cutmix"], cfg["aug"]["label_smoothing"]) == (0.8, 1.0, 0.0)
    assert cfg["sched"]["warmup_epochs"] == 5 and cfg["sched"]["min_lr"] == 1e-6
    assert cfg["optim"]["weight_decay"] == 0.05 and not cfg["ema"]["enabled"]
    # lr 1e-3 x batch / 1024 = 2e-3, whatever the number of ranks; the per-rank batch adapts.
    for world in (1, 8, 16):
        plan = plan_batches(cfg, world, 1_281_167)
        assert plan.lr == pytest.approx(2e-3) and plan.global_batch == 2048 and plan.micro_batch * world == 2048
        assert plan.steps_per_epoch == 625


@pytest.mark.parametrize("size, epochs, warmup", [("tiny", 20, 5), ("small", 20, 5), ("base", 5, 1)])
def test_imagenet_finetuning_recipes_match_the_paper(size, epochs, warmup):
    cfg = load_config(os.path.join(CONFIGS, f"vil_{size}_in1k_ft224.yaml"), ["data.root=/x"])
    assert cfg["data"]["img_size"] == 224 and cfg["train"]["batch_size"] == 1024
    assert cfg["train"]["epochs"] == epochs and cfg["sched"]["warmup_epochs"] == warmup
    assert cfg["train"]["clip_grad"] is None and cfg["model"]["init_checkpoint"]
    assert plan_batches(cfg, 4, 1_281_167).lr == pytest.approx(1e-5)


def test_overrides_types_and_errors(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {root: /data, img_size: 64}\ntrain: {epochs: 3}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ntrain: {batch_size: 32}\n")
    cfg = load_config(str(child), ["optim.lr=1e-3", "train.clip_grad=null", "aug.scale=[0.5, 1.0]"])
    assert cfg["data"]["img_size"] == 64 and cfg["train"]["epochs"] == 3 and cfg["train"]["batch_size"] == 32
    # YAML reads "1e-3" as text; the number is still accepted.
    assert cfg["optim"]["lr"] == 1e-3 and cfg["train"]["clip_grad"] is None and cfg["aug"]["scale"] == [0.5, 1.0]
    assert cfg["run"]["name"] == "child"
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        load_config(str(child), ["train.epoch=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(str(child), ["train.epochs=many"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(str(child), ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="choose one of"):
        load_config(str(child), ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="batch_size"):
        plan_batches(load_config(str(child), ["train.batch_size=30"]), 4, 1000)


def test_atomic_checkpoint_is_weights_only_loadable(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = str(tmp_path / "ck" / "last.pt")
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": [capture_rng()],
        "step": 7,
        "config": {"a": [1, 2.5, "x", None]},
    }
    save_atomic(state, path)
    assert os.listdir(tmp_path / "ck") == ["last.pt"]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["weight"], model.weight)
    # Overwriting keeps a complete file at every moment (no partial file under the final name).
    save_atomic({**state, "step": 8}, path)
    assert load_checkpoint(path)["step"] == 8
    # Pickled objects are refused by weights_only loading, with the file named.
    torch.save({"obj": argparse.Namespace(a=1)}, str(tmp_path / "bad.pt"))
    with pytest.raises(Exception, match="bad.pt"):
        load_checkpoint(str(tmp_path / "bad.pt"))


def test_rng_capture_restore_roundtrip(tmp_path):
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    save_atomic({"rng": state}, str(tmp_path / "r.pt"))
    restore_rng(load_checkpoint(str(tmp_path / "r.pt"))["rng"])
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]
