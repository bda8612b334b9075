"""How fast could the chunked path's state products run? cuBLAS (torch.bmm in bf16) on the same shapes, as a
ceiling for the Triton kernels that compute them today inside larger kernels.

Usage (CUDA machine, repo root):
    PYTHONPATH=kernels python bench/state_gemm_ceiling.py --dh 96 192 384 512 --seq 4096

Above function.SINGLE_CHUNK_MAX_SEQ_LEN the op runs chunks of L = function.DEFAULT_LONG_CHUNK_SIZE rows. Per chunk
and (batch, head) a fwd+bwd takes six products with a [DQK, DHV] chunk state, 2 L DQK DHV flops each:
    chunk terms of the states   (e k)^T v  (fwd_state),   (g rs q)^T dh  (bwd_state)          [D, L] @ [L, D]
    state terms of the outputs  h += (g q) C,  dq += (g rs dh) C^T,  dk += e v dC^T,  dv += e k dC   [L, D] @ [D, D]
against about 6 L^2 D flops of products inside the chunk (q k^T and W v forward; dS, dq, dk and dv backward; each
the causal half of 2 L^2 D). At DH 384 / 512 the state products are most of the arithmetic (2 D / L = 3 to 4 times
the inside of the chunk), so how fast they can run bounds what a restructuring (state products as separate GEMMs, the
kernels keeping the inside of the chunk) could gain. Compare the sum printed here with the kernels' times in
`python bench/profile_mlstm.py 384:4096 --table` (bench/results/session18/profile_s4096_h100.log).

Per head dim: B = round(50k / S), NH = 4, bf16 operands with float32 accumulation (cuBLAS's default), median of
triton.testing.do_bench. The recurrence over the chunks (C_{c+1} = decay C_c + chunk term) is not timed: it is
elementwise over the states (mlstm_state_scan_kernel does it for launch.PARALLEL_CHUNK_STATES).
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from tfla.triton import function
from tfla.triton.launch import chunk_layout


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dh", type=int, nargs="+", default=[96, 192, 384, 512])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=50_000)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("state_gemm_ceiling.py times cuBLAS on a GPU: run it on a CUDA machine")
    if args.seq <= function.SINGLE_CHUNK_MAX_SEQ_LEN:
        raise SystemExit(f"--seq {args.seq} runs as one chunk without states; give S > "
                         f"{function.SINGLE_CHUNK_MAX_SEQ_LEN}")
    L = function.default_chunk_size(args.seq)
    B, NH = max(1, round(args.tokens / args.seq)), 4
    batch = B * NH * chunk_layout(args.seq, L).NC
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, B={B} NH={NH} S={args.seq} "
          f"chunk L={L}: {batch} chunk matrices per product")
    print("| DH | [L, D] @ [D, D] us (TFLOP/s) | [D, L] @ [L, D] us (TFLOP/s) | six state products us | "
          "their flops / inside-chunk flops |")
    print("|---|---|---|---|---|")
    for D in args.dh:
        rows = torch.randn(batch, L, D, device="cuda", dtype=torch.bfloat16)
        state = torch.randn(batch, D, D, device="cuda", dtype=torch.bfloat16)
        cols = rows.transpose(1, 2)  # [D, L] views, as the state kernels read the rows (transposed operand)
        out_rows = torch.empty(batch, L, D, device="cuda", dtype=torch.bfloat16)
        out_state = torch.empty(batch, D, D, device="cuda", dtype=torch.bfloat16)
        flops = 2.0 * batch * L * D * D
        ms_rows = do_bench(lambda: torch.bmm(rows, state, out=out_rows), warmup=10, rep=100, return_mode="median")
        ms_state = do_bench(lambda: torch.bmm(cols, rows, out=out_state), warmup=10, rep=100, return_mode="median")
        six_us = (4 * ms_rows + 2 * ms_state) * 1e3
        ratio = (6 * 2 * L * D * D) / (6 * L * L * D)
        print(f"| {D} | {ms_rows * 1e3:.0f} ({tflops(flops, ms_rows):.0f}) | {ms_state * 1e3:.0f} "
              f"({tflops(flops, ms_state):.0f}) | {six_us:.0f} | {ratio:.2f} |", flush=True)
        del rows, state, out_rows, out_state


if __name__ == "__main__":
    main()
