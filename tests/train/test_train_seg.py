"""ViL + UperNet training and evaluation (train/train_seg.py, train/evaluate_seg.py) on a synthetic ADE20K tree, CPU.

The tree's labels are a function of the image (coloured rectangles on a background, a strip of unlabelled pixels), so
a pipeline that keeps images and labels aligned fits it within a few iterations. These are pipeline tests: they say
nothing about how well the model learns real data.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vil.data import DataError
from vil.training import CheckpointError, ConfigError, load_checkpoint, read_metrics
from vil.training.checkpoint import FORMAT
from vil.training.segmentation import (
    MULTI_SCALE_RATIOS,
    SEG_FORMAT,
    IterationBatchSampler,
    build_segmentation_model,
    build_segmentation_optimizer,
    build_segmentation_scheduler,
    load_segmentation_config,
    rank_batch_size,
    segmentation_param_groups,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CI_RECIPE = os.path.join(REPO, "configs", "ade20k_tiny_ci.yaml")
ITERATIONS = 30


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "train", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_seg = load_script("train_seg")
evaluate_seg = load_script("evaluate_seg")

# Raw ADE20K labels 1..3 (reduced to classes 0..2) and their colours; 0 (unlabelled) is grey.
COLOURS = np.array([(128, 128, 128), (40, 40, 40), (220, 40, 40), (40, 80, 220)], dtype=np.int16)


def write_sample(root, split: str, stem: str, rng: np.random.Generator, height: int = 48, width: int = 72) -> None:
    label = np.ones((height, width), dtype=np.uint8)
    for raw_class in (2, 3):
        rect_h, rect_w = rng.integers(12, 30), rng.integers(12, 40)
        top, left = rng.integers(0, height - rect_h), rng.integers(0, width - rect_w)
        label[top : top + rect_h, left : left + rect_w] = raw_class
    label[:2] = 0
    image = COLOURS[label] + rng.integers(-20, 21, size=(height, width, 3))
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"{stem}.jpg", quality=95)
    Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{stem}.png")


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split, count in (("training", 8), ("validation", 3)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            write_sample(root, split, f"ADE_{split}_{i:08d}", rng)
    return root


def overrides(out, name: str, root) -> list[str]:
    return [f"run.output_dir={out}", f"run.name={name}", f"data.root={root}"]


def train(out, name: str, root, *extra: str, resume: bool = False) -> dict:
    argv = ["--config", CI_RECIPE, *overrides(out, name, root), *extra]
    return train_seg.main(argv + (["--resume"] if resume else []))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, ade_root):
    """The CI recipe run to its end once: (run dir, results)."""
    out = tmp_path_factory.mktemp("runs")
    results = train(out, "reference", ade_root)
    return out / "reference", results


def assert_same_state(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"model.{name} differs"
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"optimizer state {key} differs"
    assert a["scheduler"] == b["scheduler"]


def test_training_run_fits_synthetic_data_and_writes_metrics(reference_run):
    run_dir, results = reference_run
    rows = read_metrics(str(run_dir / "metrics.jsonl"))
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(5, ITERATIONS + 1, 5))
    assert train_rows[-1]["loss"] < 0.9 * train_rows[0]["loss"], [r["loss"] for r in train_rows]
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 for r in train_rows)
    assert [r["step"] for r in eval_rows] == [15, ITERATIONS]
    for row in eval_rows:
        assert all(0.0 <= row[key] <= 1.0 for key in ("mIoU", "mAcc", "aAcc"))
    # Colours determine the classes: an aligned pipeline separates them well after 30 iterations.
    assert results["mIoU"] == eval_rows[-1]["mIoU"] > 0.6

    with open(run_dir / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert {"step", "loss", "lr", "images_per_s", "mIoU", "mAcc", "aAcc"} <= set(csv_rows[0])
    assert len(csv_rows) == len(rows) and float(csv_rows[-1]["mIoU"]) == pytest.approx(results["mIoU"])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tb"))
    assert (run_dir / "config.yaml").stat().st_size > 0 and (run_dir / "results.json").is_file()

    ckpt = load_checkpoint(str(run_dir / "checkpoints" / "last.pt"))
    assert ckpt["format"] == SEG_FORMAT and ckpt["iteration"] == ITERATIONS and len(ckpt["rng"]) == 1
    assert {"model", "optimizer", "scheduler", "scaler", "config"} <= set(ckpt)


def test_evaluation_single_scale_and_multi_scale_flip(reference_run, capsys):
    run_dir, results = reference_run
    checkpoint = str(run_dir / "checkpoints" / "last.pt")
    single = evaluate_seg.main(["--checkpoint", checkpoint])
    assert "mIoU" in capsys.readouterr().out
    # The same single-scale sliding-window evaluation as during training.
    assert single["mIoU"] == pytest.approx(results["mIoU"]) and single["images"] == 3
    assert (run_dir / "eval_ss.json").is_file()

    multi = evaluate_seg.main(["--checkpoint", checkpoint, "--multi-scale"])
    assert multi["ratios"] == list(MULTI_SCALE_RATIOS) and multi["flip"] is True
    assert 0.0 <= multi["mIoU"] <= 1.0 and len(multi["IoU"]) == 3
    assert (run_dir / "eval_ms_flip.json").is_file()


def test_stopped_and_resumed_run_ends_at_the_same_weights(tmp_path, ade_root, reference_run):
    reference = load_checkpoint(str(reference_run[0] / "checkpoints" / "last.pt"))
    train(tmp_path, "stopped", ade_root, f"train.max_iterations={ITERATIONS // 2}")
    ckpt_path = str(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert load_checkpoint(ckpt_path)["iteration"] == ITERATIONS // 2
    train(tmp_path, "stopped", ade_root, resume=True)
    assert_same_state(reference, load_checkpoint(ckpt_path))
    # The metrics read as one run: every record once.
    steps = [(r["kind"], r["step"]) for r in read_metrics(str(tmp_path / "stopped" / "metrics.jsonl"))]
    assert steps == [(r["kind"], r["step"]) for r in read_metrics(str(reference_run[0] / "metrics.jsonl"))]


def test_killed_and_resumed_run_ends_at_the_same_weights(tmp_path, ade_root, reference_run):
    reference = load_checkpoint(str(reference_run[0] / "checkpoints" / "last.pt"))
    cmd = [sys.executable, os.path.join(REPO, "train", "train_seg.py"), "--config", CI_RECIPE]
    proc = subprocess.Popen(
        cmd + overrides(tmp_path, "killed", ade_root), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt_path = str(tmp_path / "killed" / "checkpoints" / "last.pt")
    # SIGKILL as soon as the first periodic checkpoint (iteration 10) is in place.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not os.path.exists(ckpt_path):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt_path)["iteration"]
    assert 10 <= killed_at < ITERATIONS, "the run must be killed between its first checkpoint and its end"
    train(tmp_path, "killed", ade_root, resume=True)
    assert_same_state(reference, load_checkpoint(ckpt_path))


def test_ddp_two_ranks_gloo_then_resume_on_one_process(tmp_path, ade_root):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(REPO, "train", "train_seg.py"), "--config", CI_RECIPE, *overrides(tmp_path, "ddp", ade_root)]
    proc = subprocess.run(
        cmd + ["train.max_iterations=20"], capture_output=True, text=True, timeout=300, cwd=REPO, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s) on cpu | global batch 4 = 2 x 2" in proc.stdout
    ckpt_path = str(tmp_path / "ddp" / "checkpoints" / "last.pt")
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["iteration"] == 20 and len(ckpt["rng"]) == 2
    # Both ranks' evaluation shares (2 + 1 of the 3 validation images) are counted once.
    assert "(3 images)" in proc.stdout

    with pytest.warns(UserWarning, match="written by 2 rank"):
        results = train(tmp_path, "ddp", ade_root, resume=True)
    assert results["iteration"] == ITERATIONS and 0.0 <= results["mIoU"] <= 1.0
    steps = [r["step"] for r in read_metrics(str(tmp_path / "ddp" / "metrics.jsonl")) if r["kind"] == "train"]
    assert steps == list(range(5, ITERATIONS + 1, 5))


def test_iteration_sampler_does_not_depend_on_ranks_and_resumes():
    def batches(start: int, rank: int = 0, world_size: int = 1) -> list[list[tuple[int, int]]]:
        return list(IterationBatchSampler(10, 4, start, 7, seed=3, rank=rank, world_size=world_size))

    single = batches(0)
    assert len(single) == 7 and all(len(b) == 4 for b in single)
    stream = [sample for batch in single for sample in batch]
    # Each pass over the data is a permutation of it; passes differ.
    for data_pass in (0, 1):
        assert sorted(i for p, i in stream if p == data_pass) == list(range(10))
    assert [i for p, i in stream if p == 0] != [i for p, i in stream if p == 1]
    two_ranks = [a + b for a, b in zip(batches(0, 0, 2), batches(0, 1, 2), strict=True)]
    assert two_ranks == single
    assert batches(3) == single[3:]
    with pytest.raises(ConfigError, match="multiple of 3"):
        IterationBatchSampler(10, 4, 0, 7, seed=3, rank=0, world_size=3)


def test_layer_decay_groups_and_schedule(ade_root):
    cfg = load_segmentation_config(CI_RECIPE, [f"data.root={ade_root}"])
    model = build_segmentation_model(cfg)
    groups = segmentation_param_groups(model, weight_decay=0.05, layer_decay=0.65)
    where = {id(p): g for g in groups for p in g["params"]}
    assert len(where) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    params = dict(model.named_parameters())

    def group(name: str) -> tuple[float, float]:
        found = where[id(params[name])]
        return found["lr_scale"], found["weight_decay"]

    # 4 sub-blocks = 2 layers of pairs; stem 0, pairs 1 and 2, neck and heads 3.
    assert group("backbone.model.pos_embed") == (pytest.approx(0.65**3), 0.0)
    assert group("backbone.model.patch_embed.proj.weight") == (pytest.approx(0.65**3), 0.05)
    assert group("backbone.model.blocks.1.layer.proj_up.weight") == (pytest.approx(0.65**2), 0.05)
    assert group("backbone.model.blocks.3.layer.proj_up.bias") == (pytest.approx(0.65), 0.0)
    assert group("decode_head.classifier.weight") == (1.0, 0.05)
    assert group("neck.up4.1.weight") == (1.0, 0.0)

    optimizer = build_segmentation_optimizer(cfg, model)
    scheduler = build_segmentation_scheduler(cfg, optimizer)
    # One schedule for all groups, times each group's scale: after the warm-up, the cosine over all iterations.
    warmup, total, lr = cfg["sched"]["warmup_iterations"], cfg["train"]["iterations"], cfg["optim"]["lr"]
    scheduler.step_update(warmup)
    cosine = lr * 0.5 * (1 + math.cos(math.pi * warmup / total))
    for param_group in optimizer.param_groups:
        assert param_group["lr"] == pytest.approx(cosine * param_group["lr_scale"])
    scheduler.step_update(cfg["train"]["iterations"])
    assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(cfg["sched"]["min_lr"])
    # Linear drop-path schedule: none in the first sub-block, drop_path_rate in the last.
    blocks = model.backbone.model.blocks
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)
    assert blocks[-1].drop_path.drop_prob == pytest.approx(cfg["model"]["drop_path_rate"])


def test_backbone_starts_from_a_classification_checkpoint(tmp_path):
    import vil  # noqa: F401  (registers the ViL models in timm)

    classifier = timm.create_model("vil_tiny", patch_size=8, embed_dim=32, depth=4, img_size=32, num_classes=10)
    path = str(tmp_path / "classifier.pt")
    torch.save({"format": FORMAT, "step": 100, "model": classifier.state_dict()}, path)
    cfg = load_segmentation_config(CI_RECIPE, ["data.root=/x", f"model.init_checkpoint={path}"])
    backbone = build_segmentation_model(cfg).backbone.model.state_dict()
    trained = classifier.state_dict()
    blocks = [k for k in backbone if k.startswith("blocks.")]
    assert blocks and all(torch.equal(backbone[k], trained[k]) for k in blocks)
    # The 4x4 position grid of the 32 px classifier is resampled to the 8x8 grid of the 64 px crops.
    assert backbone["pos_embed"].shape == (1, 8, 8, 32)
    assert torch.equal(backbone["patch_embed.proj.weight"], trained["patch_embed.proj.weight"])

    wider = timm.create_model("vil_tiny", patch_size=8, embed_dim=48, depth=4, img_size=32, num_classes=10)
    torch.save({"state_dict": wider.state_dict()}, tmp_path / "wider.th")
    wrong = load_segmentation_config(CI_RECIPE, ["data.root=/x", f"model.init_checkpoint={tmp_path / 'wider.th'}"])
    with pytest.raises(ConfigError, match=r"wider\.th.*does not match the model"):
        build_segmentation_model(wrong)
    missing = load_segmentation_config(CI_RECIPE, ["data.root=/x", "model.init_checkpoint=/nowhere/vil2.th"])
    with pytest.raises(CheckpointError, match="/nowhere/vil2.th not found"):
        build_segmentation_model(missing)


@pytest.mark.parametrize("size, channels, drop_path", [("tiny", 192, 0.0), ("small", 384, 0.05), ("base", 384, 0.1)])
def test_ade20k_recipes_match_the_spec(size, channels, drop_path):
    cfg = load_segmentation_config(os.path.join(REPO, "configs", f"vil_{size}_ade20k_upernet.yaml"))
    model, train_cfg = cfg["model"], cfg["train"]
    assert model["name"] == f"vil_{size}" and model["channels"] == channels
    assert model["drop_path_rate"] == drop_path and model["drop_path_decay"] and model["init_checkpoint"]
    assert model["out_indices"] == [7, 11, 15, 23] and model["aux_loss_weight"] == 0.4
    assert model["pool_scales"] == [1, 2, 3, 6]
    assert (train_cfg["iterations"], train_cfg["batch_size"], train_cfg["amp"]) == (160000, 16, "bf16")
    assert cfg["optim"]["opt"] == "adamw" and cfg["optim"]["lr"] == 5e-4 and cfg["optim"]["weight_decay"] == 0.05
    assert cfg["optim"]["layer_decay"] == 0.65 and cfg["sched"]["warmup_iterations"] == 1500
    assert cfg["data"]["crop_size"] == [512, 512] and cfg["data"]["scale"] == [2048, 512]
    assert cfg["data"]["ratio_range"] == [0.5, 2.0] and cfg["data"]["hflip"] == 0.5 and cfg["data"]["photometric"]
    assert cfg["eval"]["window"] == [512, 512] and cfg["eval"]["stride"] == [341, 341]
    # The global batch is kept on any number of GPUs that divides it.
    assert [rank_batch_size(16, world) for world in (1, 2, 8)] == [16, 8, 2]
    assert MULTI_SCALE_RATIOS == (0.75, 1.0, 1.25, 1.5, 1.75)


def test_bad_inputs_name_the_problem_and_the_fix(tmp_path, ade_root):
    with pytest.raises(DataError, match=r"ADE20K root not found: .*nowhere.*images/training"):
        train(tmp_path, "bad", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.root is not set"):
        train_seg.main(["--config", CI_RECIPE, f"run.output_dir={tmp_path}", "data.root=null"])
    with pytest.raises(ConfigError, match="Unknown config key 'train.iteration'.*Did you mean 'iterations'"):
        train(tmp_path, "bad", ade_root, "train.iteration=5")
    with pytest.raises(ConfigError, match="does not split evenly over 3 ranks"):
        rank_batch_size(16, 3)

    partial = tmp_path / "partial"
    shutil.copytree(ade_root, partial)
    missing = partial / "annotations" / "training" / "ADE_training_00000003.png"
    missing.unlink()
    with pytest.raises(DataError, match=rf"1 of 8 images .* has no {missing}; add the missing .png"):
        train(tmp_path, "bad", partial)

    classifier_ckpt = tmp_path / "classifier.pt"
    torch.save({"format": FORMAT, "model": {}}, classifier_ckpt)
    with pytest.raises(CheckpointError, match="not a train/train_seg.py checkpoint"):
        evaluate_seg.main(["--checkpoint", str(classifier_ckpt)])

    # On the command line: exit status 2 and one line that names the problem, no traceback.
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train", "train_seg.py"), "--config", CI_RECIPE,
         *overrides(tmp_path, "cli", tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: ADE20K root not found")
    assert "Traceback" not in proc.stderr
