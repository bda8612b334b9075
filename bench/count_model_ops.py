"""How many ATen ops one training step (forward + backward) of a model dispatches: the host-side work of an eager step.

Usage (any machine; CPU is enough, the count does not depend on the device):
    python bench/count_model_ops.py --models vil_tiny vit_tiny_patch16_224 [--qkv-impl grouped_conv] [--top 12]

Each op costs the host a dispatch (and, on a GPU, usually a kernel launch) whatever the tensor sizes, so at small
models an eager step whose op count is 5x a ViT's is host-bound long before the GPU is busy. The mLSTM is counted as
one op each way, as the Triton op is on a GPU (on CPU the PyTorch reference would add hundreds).
"""

from __future__ import annotations

import argparse
import collections

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vil  # noqa: F401  (registers the ViL models in timm)
from vil.layers import linear, vil_layer


class _OneOpMLSTM(torch.autograd.Function):
    """Stands in for the Triton op: one op forward (a copy of v), one op per gradient backward."""

    @staticmethod
    def forward(ctx, q, k, v, i, f):
        return v.clone()

    @staticmethod
    def backward(ctx, dh):
        return dh, dh, dh, None, None


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step(name: str, batch: int, img_size: int) -> collections.Counter:
    model = timm.create_model(name, num_classes=1000, img_size=img_size)
    x = torch.randn(batch, 3, img_size, img_size)
    with _CountOps() as counter:
        model(x).float().mean().backward()
    return counter.counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["vil_tiny", "vit_tiny_patch16_224"])
    ap.add_argument("--qkv-impl", choices=linear.BLOCK_DIAGONAL_IMPLS, default=linear.BLOCK_DIAGONAL_IMPL)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    linear.BLOCK_DIAGONAL_IMPL = args.qkv_impl
    vil_layer.mlstm = lambda q, k, v, i, f, gate, backend, chunk_size: _OneOpMLSTM.apply(q, k, v, i, f)
    print(f"ATen ops per training step (forward + backward), {args.img_size} px, ViL q/k/v maps: {args.qkv_impl}")
    print("| model | ops | most frequent |\n|---|---|---|")
    for name in args.models:
        counts = count_step(name, args.batch, args.img_size)
        top = ", ".join(f"{op} {n}" for op, n in counts.most_common(args.top))
        print(f"| {name} | {sum(counts.values())} | {top} |", flush=True)


if __name__ == "__main__":
    main()
