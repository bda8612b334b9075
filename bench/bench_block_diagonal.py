"""Speed of ViL's block-diagonal q/k/v map (vil.layers.linear.BlockDiagonalLinear) in each form, fwd+bwd.

Usage (CUDA machine, repo root): PYTHONPATH=kernels python bench/bench_block_diagonal.py [--tokens 25088]
    [--dims 384 768 1536] [--groups 64 128 256 512 1536] [--out bench/results/block_diagonal.md]

Per width (ViL-T/S/B's inner widths are 384/768/1536) and form it prints the ms of one forward+backward of one
map over `tokens` rows (bf16 under autocast, as the model trains), and the bytes the map must move (read x, write y,
read dy, write dx) over that time: the form at memory speed is as fast as the map can be.
"""

import argparse

import torch
from triton.testing import do_bench

from vil.layers import linear
from vil.layers.linear import BlockDiagonalLinear


def time_map(layer: BlockDiagonalLinear, x: torch.Tensor, impl: str, group_max: int) -> float:
    linear.BLOCK_DIAGONAL_IMPL, linear.DENSE_GROUP_MAX = impl, group_max
    dy = torch.randn_like(x)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(dy)

    return do_bench(step, warmup=10, rep=50)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128 * 196)
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 768, 1536])
    ap.add_argument("--groups", type=int, nargs="+", default=[64, 128, 256, 512, 1536])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, bf16 autocast, "
             "fwd+bwd of one map", "", "| width | form | ms | GB/s of the 4 activation passes |", "|---|---|---|---|"]
    for dim in args.dims:
        layer = BlockDiagonalLinear(dim, 4).cuda()
        x = torch.randn(args.tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        moved = 4 * x.numel() * x.element_size()
        forms = [("einsum", 0), ("grouped_conv", 0)] + [("dense", g) for g in args.groups if g <= dim]
        for impl, group in forms:
            ms = time_map(layer, x, impl, group)
            name = impl if impl != "dense" else f"dense, groups of {layer.dense_group()}"
            lines.append(f"| {dim} | {name} | {ms:.3f} | {moved / ms / 1e6:.0f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
