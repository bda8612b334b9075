"""Per-kernel CUDA time of one Triton mLSTM fwd+bwd (torch.profiler), to see where the time goes.

Usage: PYTHONPATH=kernels python bench/profile_mlstm.py 96:196 512:196 192:1024 192:4096
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from tfla.triton import mlstm_triton

for spec in sys.argv[1:] or ["96:196"]:
    DH, S = map(int, spec.split(":"))
    B, NH = max(1, round(50_000 / S)), 4
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, NH, S, DH, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    i = torch.randn(B, NH, S, device="cuda", generator=g).requires_grad_()
    f = (torch.randn(B, NH, S, device="cuda", generator=g) + 3).requires_grad_()
    for gate in ("exp", "sig"):
        def step():
            h = mlstm_triton(q, k, v, i, f, gate=gate)
            h.backward(torch.ones_like(h))
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"== DH={DH} S={S} B={B} gate={gate} (5 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
