"""Real training runs on the offline MNIST digits: learning, exact resume after a kill, DDP over gloo with 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vil.data import prepare_mnist5k
from vil.training import build_model, load_checkpoint, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "train", "train.py")
EVALUATE = os.path.join(REPO, "train", "evaluate.py")

# A ViL small enough for a few seconds per run, with every source of randomness switched on: drop path (torch RNG),
# Mixup/CutMix (numpy RNG), augmentation (per-sample seeds), shuffling (loader workers), EMA.
TINY = [
    "model.kwargs={patch_size: 4, embed_dim: 32, depth: 2}",
    "model.drop_path_rate=0.1",
    "aug.mixup=0.8",
    "aug.cutmix=1.0",
    "ema.enabled=true",
    "ema.decay=0.9",
    "train.batch_size=32",
    "train.log_interval=1",
    "data.num_workers=2",
    "data.shuffle_buffer=200",
    "data.shuffle_initial=50",
    "data.val_split=mnist5k-validation-0000.tar",
]


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> str:
    return prepare_mnist5k(str(tmp_path_factory.mktemp("data") / "mnist5k"))


def run(args: list[str], timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def train_cmd(
    out: str, name: str, root: str, extra: list[str], config: str = "configs/mnist_vil_tiny.yaml"
) -> list[str]:
    return [
        sys.executable,
        TRAIN,
        "--config",
        config,
        f"run.output_dir={out}",
        f"run.name={name}",
        f"data.root={root}",
        *extra,
    ]


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"optimizer state {k} differs"


def test_ci_recipe_learns_and_evaluates_from_checkpoint(tmp_path, mnist_root):
    """The CI variant of the README's main job: 2 epochs on 4500 real digits, held-out top-1 well above chance."""
    proc = run(train_cmd(str(tmp_path), "ci", mnist_root, [], config="configs/mnist_vil_tiny_ci.yaml"), timeout=900)
    assert "held-out accuracy: top-1" in proc.stdout and "img/s" in proc.stdout and "ETA" in proc.stdout
    run_dir = tmp_path / "ci"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["top1"] >= 85.0, f"the CI recipe did not learn: {results}"
    for name in ("curves.png", "metrics.csv", "metrics.jsonl", "config.yaml"):
        assert (run_dir / name).stat().st_size > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tb"))
    train_rows = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["kind"] == "train"]
    assert train_rows[-1]["step"] == 140 and train_rows[-1]["loss"] < train_rows[0]["loss"] / 3
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 140 and ckpt["epoch"] == 2

    proc = run([sys.executable, EVALUATE, "--checkpoint", str(run_dir / "checkpoints" / "last.pt")])
    assert f"top-1 {results['top1']:.2f}%" in proc.stdout
    assert json.loads((run_dir / "eval.json").read_text())["top1"] == pytest.approx(results["top1"])


def test_killed_and_resumed_run_ends_at_the_same_weights(tmp_path, mnist_root):
    # 900 digits, 28 steps per epoch, 2 epochs.
    common = TINY + [
        "data.train_split=mnist5k-train-{0000..0001}.tar",
        "train.epochs=2",
        "train.checkpoint_interval=10",
        "train.eval_interval=1",
    ]
    out = str(tmp_path)
    run(train_cmd(out, "straight", mnist_root, common))
    reference = load_checkpoint(os.path.join(out, "straight", "checkpoints", "last.pt"))
    total = reference["step"]
    assert total == 2 * (900 // 32)
    # The EMA weights are a plain state dict of the model (what evaluate.py --ema loads).
    model = build_model(reference["config"])
    model.load_state_dict(reference["ema"])
    assert not all(torch.equal(reference["ema"][k], reference["model"][k]) for k in reference["model"])

    # SIGKILL part-way (after the first periodic checkpoint), then --resume.
    proc = subprocess.Popen(
        train_cmd(out, "killed", mnist_root, common), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt_path = os.path.join(out, "killed", "checkpoints", "last.pt")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        rows = read_metrics(os.path.join(out, "killed", "metrics.jsonl"))
        if os.path.exists(ckpt_path) and rows and rows[-1].get("step", 0) >= 13:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt_path)["step"]
    assert 10 <= killed_at < total, "the run must be killed between its first checkpoint and its end"
    run(train_cmd(out, "killed", mnist_root, common) + ["--resume"])
    assert_same_state(reference, load_checkpoint(ckpt_path))

    # A clean stop in the middle of an epoch at an odd batch (the loader's worker order is rotated on resume).
    run(train_cmd(out, "stopped", mnist_root, common + ["train.max_steps=37"]))
    stopped = load_checkpoint(os.path.join(out, "stopped", "checkpoints", "last.pt"))
    assert (stopped["step"], stopped["epoch"], stopped["step_in_epoch"]) == (37, 1, 37 - 28)
    run(train_cmd(out, "stopped", mnist_root, common) + ["--resume"])
    assert_same_state(reference, load_checkpoint(os.path.join(out, "stopped", "checkpoints", "last.pt")))
    # The metrics read as one run: every step once.
    steps = [r["step"] for r in read_metrics(os.path.join(out, "stopped", "metrics.jsonl")) if r["kind"] == "train"]
    assert steps == list(range(1, total + 1))


def test_ddp_two_ranks_gloo_then_resume_on_one_process(tmp_path, mnist_root):
    out = str(tmp_path)
    common = TINY + ["train.batch_size=64", "train.epochs=2", "train.checkpoint_interval=0", "train.eval_interval=0"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        TRAIN,
        "--config",
        "configs/mnist_vil_tiny.yaml",
        f"run.output_dir={out}",
        "run.name=ddp",
        f"data.root={mnist_root}",
        *common,
        "train.max_steps=90",
    ]
    proc = run(cmd, timeout=900)
    assert "2 rank(s) on cpu" in proc.stdout and "global batch 64 = 2 x 32 x 1" in proc.stdout
    logs = {}
    for rank in (0, 1):
        with open(os.path.join(out, "ddp", "data", f"rank{rank}.jsonl")) as f:
            logs[rank] = [json.loads(line) for line in f]
    for epoch_log in zip(logs[0], logs[1], strict=True):
        a, b = epoch_log
        # The same number of steps on both ranks, and disjoint shards.
        assert a["steps"] == b["steps"] and a["micro_batches"] == b["micro_batches"]
        assert not set(a["shards"]) & set(b["shards"]), (a["shards"], b["shards"])
    assert [e["steps"] for e in logs[0]] == [70, 20]
    assert len(set(logs[0][0]["shards"]) | set(logs[1][0]["shards"])) == 10
    ckpt = load_checkpoint(os.path.join(out, "ddp", "checkpoints", "last.pt"))
    assert (ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (90, 1, 20) and len(ckpt["rng"]) == 2

    # Rank 0's checkpoint continues in a single process (same global batch: 1 x 64).
    proc = run(
        [
            sys.executable,
            TRAIN,
            "--config",
            "configs/mnist_vil_tiny.yaml",
            f"run.output_dir={out}",
            "run.name=ddp",
            f"data.root={mnist_root}",
            *common,
            "--resume",
        ]
    )
    assert "resumed from" in proc.stdout and "different data geometry" in proc.stderr
    final = load_checkpoint(os.path.join(out, "ddp", "checkpoints", "last.pt"))
    assert final["step"] == 140 and final["epoch"] == 2
    steps = [r["step"] for r in read_metrics(os.path.join(out, "ddp", "metrics.jsonl")) if r["kind"] == "train"]
    assert steps == list(range(1, 141))
