"""Metrics: JSONL + CSV files and TensorBoard, a console progress line, and a PNG of the training curves."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import warnings

__all__ = ["MetricsLogger", "ProgressMeter", "format_eta", "plot_curves", "read_metrics"]

CSV_COLUMNS = [
    "kind",
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "images_per_s",
    "top1",
    "top5",
    "ema_top1",
    "ema_top5",
    "corrupt",
    "truncated",
    "time",
]


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    # A run killed mid-write leaves a partial last line.
                    continue
    return rows


class MetricsLogger:
    """Rank-0 metrics writer: ``metrics.jsonl`` (every record), ``metrics.csv`` (``csv_columns``), TensorBoard.

    On resume, records after the checkpoint's step (written by the interrupted run) are dropped first, so the files
    read as one uninterrupted run.
    """

    def __init__(
        self,
        run_dir: str,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
        csv_columns: list[str] = CSV_COLUMNS,
    ):
        self.enabled = enabled
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        rows = read_metrics(self.jsonl_path) if resume_step is not None else []
        rows = [r for r in rows if r.get("step", 0) <= resume_step] if resume_step is not None else []
        with open(self.jsonl_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, csv_columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self._jsonl = open(self.jsonl_path, "a")
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, csv_columns, extrasaction="ignore")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step)
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl/csv only.", stacklevel=2)

    def log(self, kind: str, step: int, **values: float) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values, "time": round(time.time(), 3)}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._csv.writerow(record)
        self._csv_file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and name != "epoch":
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()


class ProgressMeter:
    """The console line: epoch, step, loss, lr, images/s and ETA of the whole run."""

    def __init__(self, total_steps: int, start_step: int, stream=sys.stdout):
        self.total_steps, self.stream = total_steps, stream
        self._t0, self._s0 = time.monotonic(), start_step
        self._tlast, self._slast = self._t0, start_step

    def rate(self, step: int, images_per_step: int) -> float:
        """Images/s since the previous call."""
        now = time.monotonic()
        rate = (step - self._slast) * images_per_step / max(now - self._tlast, 1e-9)
        self._tlast, self._slast = now, step
        return rate

    def eta(self, step: int) -> float:
        done = step - self._s0
        if done <= 0:
            return float("inf")
        return (time.monotonic() - self._t0) / done * (self.total_steps - step)

    def line(self, epoch: int, epochs: int, step: int, loss: float, lr: float, images_per_s: float) -> str:
        text = (
            f"epoch {epoch + 1}/{epochs}  step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.3e}  "
            f"{images_per_s:,.0f} img/s  ETA {format_eta(self.eta(step))}"
        )
        print(text, file=self.stream, flush=True)
        return text


def plot_curves(jsonl_path: str, png_path: str) -> str | None:
    """Training loss and lr against step, evaluation top-1/top-5 against epoch; returns the PNG path or None."""
    rows = read_metrics(jsonl_path)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("loss")
        axes[0].legend()
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("learning rate")
    if evals:
        epochs = [r["epoch"] for r in evals]
        for key, label in (("top1", "top-1"), ("top5", "top-5"), ("ema_top1", "EMA top-1")):
            points = [(e, r[key]) for e, r in zip(epochs, evals) if r.get(key) is not None]
            if points:
                axes[2].plot(*zip(*points), marker="o", label=label)
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("held-out accuracy (%)")
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(jsonl_path))))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
