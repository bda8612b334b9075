"""What every train/ entry point does first and last: per-rank seeding, finding the checkpoint to resume, and turning
the errors a user can fix into a message and exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from vil.data import DataError

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .distributed import DistInfo, init_distributed


def training_arg_parser(description: str, example_config: str, example_overrides: str) -> argparse.ArgumentParser:
    """The command line every training entry point shares: --config, --resume [path] and key.sub=value overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML recipe, e.g. {example_config}")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from <run dir>/checkpoints/last.pt (no value) or from the named checkpoint",
    )
    parser.add_argument("overrides", nargs="*", help=f"config overrides such as {example_overrides}")
    return parser


def seed_rank(seed: int, rank: int) -> None:
    """Each rank draws its own random masks (drop path, dropout, mixup) from seed + rank."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    random.seed(seed + rank)


def find_resume_checkpoint(
    resume: Optional[str], run_dir: str, expected_format, script: str, log: Callable[..., None]
) -> tuple[str, Optional[str], Optional[dict]]:
    """``--resume`` -> (the run's last.pt path, the file resumed from or None, its loaded checkpoint or None).

    ``resume`` is None (start fresh), "auto" (<run_dir>/checkpoints/last.pt when it exists) or a path. A checkpoint
    written by another entry point is refused: its state does not fit this loop."""
    ckpt_path = os.path.join(run_dir, "checkpoints", "last.pt")
    resume_from = None
    if resume == "auto":
        if os.path.isfile(ckpt_path):
            resume_from = ckpt_path
        else:
            log(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    elif resume:
        resume_from = resume
    ckpt = load_checkpoint(resume_from) if resume_from else None
    if ckpt is not None and ckpt.get("format") != expected_format:
        raise CheckpointError(
            f"{resume_from} is not a {script} checkpoint; for weights only, use model.init_checkpoint."
        )
    return ckpt_path, resume_from, ckpt


class RunStart(NamedTuple):
    dist: DistInfo
    log: Callable[..., None]  # print on rank 0, silent elsewhere
    run_dir: str
    ckpt_path: str  # where this run writes last.pt
    resume_from: Optional[str]
    ckpt: Optional[dict]


def start_run(cfg: dict, resume: Optional[str], expected_format, script: str) -> RunStart:
    """Process group, per-rank seeds, run directory and the checkpoint to resume: how every training run begins."""
    dist = init_distributed(cfg["train"]["device"])
    log = print if dist.is_main else (lambda *a, **k: None)
    seed_rank(cfg["run"]["seed"], dist.rank)
    run_dir = os.path.join(cfg["run"]["output_dir"], cfg["run"]["name"])
    ckpt_path, resume_from, ckpt = find_resume_checkpoint(resume, run_dir, expected_format, script, log)
    return RunStart(dist, log, run_dir, ckpt_path, resume_from, ckpt)


def run_cli(main: Callable[[], object], oom_hint: Optional[str] = None) -> None:
    """Run an entry point's main(); a config, data or checkpoint problem (and, with ``oom_hint``, running out of GPU
    memory) prints its message and exits with 2."""
    try:
        main()
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        if oom_hint is None:
            raise
        print(f"error: out of GPU memory; {oom_hint}.", file=sys.stderr)
        sys.exit(2)
