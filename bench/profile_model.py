"""Where a ViL training step spends its GPU time: per-kernel CUDA time of one fwd+bwd (torch.profiler), next to the
step's wall time. The model-level counterpart of profile_mlstm.py.

Usage (CUDA machine, repo root):
    PYTHONPATH=kernels python bench/profile_model.py --model vil_tiny --batch 128 [--rows 30] [--by-shape] \
        [--qkv-impl grouped_conv]

bf16 autocast, 224 px, random inputs; eager (no torch.compile), as bench_models.py measures it.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import vil  # noqa: F401  (registers the ViL models in timm)
from vil.layers import linear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vil_tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--qkv-impl", choices=linear.BLOCK_DIAGONAL_IMPLS, default=linear.BLOCK_DIAGONAL_IMPL,
                    help="how ViL's block-diagonal q/k/v maps are computed (vil.layers.linear)")
    ap.add_argument("--by-shape", action="store_true",
                    help="also print the ATen ops grouped by input shapes (which copies, sums and muls take the time)")
    args = ap.parse_args()
    linear.BLOCK_DIAGONAL_IMPL = args.qkv_impl
    model = timm.create_model(args.model, num_classes=1000).cuda()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernel rows only: an ATen op's row repeats the CUDA time of the kernels it launched. Two steps were profiled.
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    cuda_ms = sum(e.self_device_time_total for e in kernels) / 2 / 1e3
    print(f"{args.model}, batch {args.batch}, {args.img_size} px, bf16 autocast, eager, "
          f"qkv maps {args.qkv_impl}, {torch.cuda.get_device_name()}: wall {wall:.1f} ms per fwd+bwd, "
          f"kernels' CUDA time {cuda_ms:.1f} ms per step (the table below sums 2 steps)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.by_shape:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=40,
                             max_shapes_column_width=100))


if __name__ == "__main__":
    main()
