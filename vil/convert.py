"""vil-convert: an authors' Vision-LSTM checkpoint (.th) -> a .safetensors file in vil's own key layout.

Usage:
    vil-convert vil2_base16_e400_in1k.th vil_base.safetensors --model vil_base
    vil-convert vil_tiny16_e800_in1k.th vil1_tiny.safetensors                # model inferred from the weights
    vil-convert vil2_tiny16_e800_in1k.th vil_tiny_384.safetensors --model vil_tiny --img-size 384

Reads v1 and v2 files in either key spelling (training code or the standalone vision_lstm files) with
torch.load(weights_only=True): a file that needs arbitrary unpickling is refused. Renames the keys, turns the
authors' offset norm weights (1 + w) into standard scales, resamples the position embedding to --img-size, checks
every key and shape against the model, and writes the result. Load it with

    timm.create_model("vil_base", pretrained=True, pretrained_cfg_overlay=dict(file="vil_base.safetensors"))
"""

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import timm
import torch
from safetensors.torch import save_file

from vil.models.vil import (
    MODEL_ARGS,
    checkpoint_filter_fn,
    convert_authors_state_dict,
    describe_state_dict,
    is_authors_layout,
    load_checkpoint_file,
    matching_model_names,
)


def infer_model_name(state_dict: dict[str, torch.Tensor], source: str) -> str:
    """The registered ViL variant a converted state dict belongs to; ValueError when it is not unique."""
    names = matching_model_names(state_dict)
    if not names:
        raise ValueError(
            f"no registered ViL model fits {source} ({describe_state_dict(state_dict)}); pass --model and, for a "
            f"custom size, build the model yourself and use vil.checkpoint_filter_fn"
        )
    if len(names) > 1:
        # Stride-8 fine-tunes have the same parameters as their stride-16 parents: use the file name, then the grid.
        wants_stride8 = "stride8" in os.path.basename(source)
        names = [name for name in names if ("stride8" in name) == wants_stride8] or names
    if len(names) > 1 and "pos_embed" in state_dict:
        grid = tuple(state_dict["pos_embed"].shape[1:3])
        by_grid = [name for name in names if _default_grid(name) == grid]
        names = by_grid or names
    if len(names) > 1:
        raise ValueError(f"{source} fits several models ({', '.join(names)}); choose one with --model")
    return names[0]


def _default_grid(name: str) -> tuple[int, int]:
    stride = MODEL_ARGS[name].get("patch_stride") or 16
    side = (224 - 16) // stride + 1
    return side, side


def convert(
    src: str,
    dst: str,
    model_name: str | None = None,
    img_size: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Convert `src` to `dst`; returns a summary (model name, tensor count, parameter count)."""
    state_dict = load_checkpoint_file(src)
    authors = is_authors_layout(state_dict)
    if authors:
        state_dict = convert_authors_state_dict(state_dict)
    model_name = model_name or infer_model_name(state_dict, src)
    if model_name not in MODEL_ARGS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(MODEL_ARGS)}")
    if num_classes is None:
        num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    model_kwargs: dict[str, Any] = {"num_classes": num_classes}
    if img_size:
        model_kwargs["img_size"] = tuple(img_size) if len(img_size) == 2 else int(img_size[0])
    # Only shapes are needed: the meta device builds even ViL-L instantly and without memory.
    model = timm.create_model(model_name, pretrained=False, device="meta", **model_kwargs)
    fitted = checkpoint_filter_fn(state_dict, model)
    missing = [key for key in model.state_dict() if key not in fitted]
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in fitted.items()}
    metadata = {
        "format": "pt",
        "layout": "vil",
        "vil_model": model_name,
        "source_file": os.path.basename(src),
        "source_layout": "authors" if authors else "vil",
        "img_size": "x".join(str(s) for s in model.patch_embed.img_size),
        "num_classes": str(num_classes),
    }
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    save_file(tensors, dst, metadata=metadata)
    return {
        "model": model_name,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "missing": missing,
        "metadata": metadata,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vil-convert",
        description="Convert an authors' Vision-LSTM checkpoint (.th, v1 or v2) to .safetensors in vil's layout.",
    )
    parser.add_argument("src", help="the authors' checkpoint, e.g. vil2_base16_e400_in1k.th (or a vil checkpoint)")
    parser.add_argument("dst", help="output file, e.g. vil_base.safetensors")
    parser.add_argument("--model", default=None, help=f"target model ({', '.join(MODEL_ARGS)}); default: inferred")
    parser.add_argument(
        "--img-size", type=int, nargs="+", default=None, metavar="N", help="resolution: N or H W (default 224)"
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classes of the target head; a different count drops the head"
    )
    args = parser.parse_args(argv)
    if not args.dst.endswith(".safetensors"):
        parser.error(f"dst must end in .safetensors, got {args.dst!r}")
    if args.img_size is not None and len(args.img_size) not in (1, 2):
        parser.error("--img-size takes one value (square) or two (H W)")
    try:
        summary = convert(args.src, args.dst, args.model, args.img_size, args.num_classes)
    except (ValueError, FileNotFoundError) as err:
        print(f"vil-convert: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.dst}: {summary['model']}, {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
        f"img_size {summary['metadata']['img_size']}"
    )
    if summary["missing"]:
        print(f"note: not in the checkpoint (left at init when loading): {', '.join(summary['missing'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
