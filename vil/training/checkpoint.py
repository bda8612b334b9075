"""Checkpoints: atomic writes, ``torch.load(weights_only=True)``-safe contents, exact RNG capture and restore.

A training checkpoint is a dict of tensors, numbers, strings, lists and dicts only (no pickled objects)::

    format, step, epoch, step_in_epoch, model, optimizer, scheduler, scaler, ema, rng (one entry per rank),
    data (the loader geometry the data position refers to), config, best_top1
"""

from __future__ import annotations

import os
import random
import sys
import warnings

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT",
    "CheckpointError",
    "capture_rng",
    "load_checkpoint",
    "load_init_weights",
    "restore_rng",
    "save_atomic",
]

FORMAT = "vil.training/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the run."""


def save_atomic(obj: dict, path: str) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # Make the rename itself durable.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str) -> dict:
    """Load with ``weights_only=True`` onto the CPU; errors name the file and the fix."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint not found: {path}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"Cannot load {path} with torch.load(weights_only=True): {type(exc).__name__}: {exc}. "
            f"The file is truncated or holds pickled objects; use another checkpoint."
        ) from exc


def capture_rng() -> dict:
    """This process's RNG states as tensors and plain numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"][0])


def _unwrap_state_dict(ckpt: dict, from_ema: bool, path: str) -> dict:
    if ckpt.get("format") == FORMAT:
        if from_ema:
            if not ckpt.get("ema"):
                raise CheckpointError(f"{path} has no EMA weights; set model.init_from_ema=false.")
            return ckpt["ema"]
        return ckpt["model"]
    # The authors' files keep the weights under "state_dict"; plain state dicts are accepted as they are.
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def load_init_weights(model: nn.Module, path: str, from_ema: bool = False) -> tuple[list[str], list[str]]:
    """Initialise ``model`` for fine-tuning from a train/train.py checkpoint or one of the authors' released files.

    The weights go through the model module's ``checkpoint_filter_fn`` when it has one (renaming the authors' keys,
    resampling the position embedding to the new resolution). A classifier of a different size is left at its
    initialisation. Returns (missing keys, unexpected keys).
    """
    ckpt = load_checkpoint(path)
    state = _unwrap_state_dict(ckpt, from_ema, path)
    # Released EMA/DDP checkpoints prefix keys with "module.".
    state = {k.removeprefix("module."): v for k, v in state.items()}
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    dropped = []
    for key in list(state):
        if key not in own or state[key].shape == own[key].shape:
            continue
        if (
            "pos_embed" in key
            and state[key].ndim == 4
            and own[key].ndim == 4
            and state[key].shape[-1] == own[key].shape[-1]
        ):
            # A position-embedding grid [1, H, W, D] from another resolution (pre-training at 192 px).
            from timm.layers import resample_abs_pos_embed_nhwc

            state[key] = resample_abs_pos_embed_nhwc(state[key], list(own[key].shape[1:3]), interpolation="bicubic")
            continue
        dropped.append(key)
        warnings.warn(
            f"{key} of {path} not loaded: shape {tuple(state[key].shape)} vs the model's {tuple(own[key].shape)} "
            f"(left at its initialisation; expected for a classifier of another size).",
            stacklevel=2,
        )
        del state[key]
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    # A classifier for another number of classes (dropped here or by the filter) stays at its initialisation.
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    new_head = [k for k in missing if k.startswith(f"{classifier}.") and k not in dropped]
    if new_head:
        warnings.warn(
            f"{', '.join(new_head)} not in {path} (or of another size): left at initialisation.", stacklevel=2
        )
    really_missing = [k for k in missing if k not in dropped and k not in new_head]
    if unexpected or really_missing:
        raise CheckpointError(
            f"{path} does not fit the model: {len(really_missing)} missing keys (e.g. {really_missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Check model.name / model.kwargs against it."
        )
    return missing, unexpected
