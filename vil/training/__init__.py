"""Reusable pieces of the training entry points (train/train.py, train/evaluate.py; segmentation: segmentation.py)."""

from .checkpoint import CheckpointError, capture_rng, load_checkpoint, load_init_weights, restore_rng, save_atomic
from .config import DEFAULTS, ConfigError, apply_overrides, config_to_yaml, load_config
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed, shutdown
from .engine import (
    BatchPlan,
    autocast,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    evaluate,
    optimizer_step,
    plan_batches,
    wrap_for_training,
)
from .entry import RunStart, find_resume_checkpoint, run_cli, seed_rank, start_run, training_arg_parser
from .metrics import MetricsLogger, ProgressMeter, format_eta, plot_curves, read_metrics

__all__ = [
    "DEFAULTS",
    "BatchPlan",
    "CheckpointError",
    "ConfigError",
    "DistInfo",
    "MetricsLogger",
    "ProgressMeter",
    "RunStart",
    "all_gather_objects",
    "all_reduce_sum",
    "apply_overrides",
    "autocast",
    "barrier",
    "build_mixup",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "capture_rng",
    "config_to_yaml",
    "evaluate",
    "find_resume_checkpoint",
    "optimizer_step",
    "wrap_for_training",
    "format_eta",
    "init_distributed",
    "load_checkpoint",
    "load_config",
    "load_init_weights",
    "plan_batches",
    "plot_curves",
    "read_metrics",
    "restore_rng",
    "run_cli",
    "save_atomic",
    "seed_rank",
    "shutdown",
    "start_run",
    "training_arg_parser",
]
