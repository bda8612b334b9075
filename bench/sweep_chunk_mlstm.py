"""Which chunk size should long sequences use? fwd+bwd time of the Triton mLSTM per chunk size, unfused vs fused.

Usage (CUDA machine, repo root):
    PYTHONPATH=kernels python bench/sweep_chunk_mlstm.py --dh 96 192 --seq 1024 4096 --chunks 128 256 512 1024

One chunk is quadratic in its length; more chunks add the sequential state pass and the state tensors
([DQK, DHV] per chunk). The crossover decides `function.default_chunk_size`. Each row: bf16, NH = 4,
B = round(50k / S), exp and sig gate, median ms of triton.testing.do_bench over fwd+bwd, on the unfused path
(FUSED_KERNELS = False: PyTorch gate bookkeeping) and the fused one (True, the default since this sweep).
"""

from __future__ import annotations

import argparse

from triton.testing import do_bench

from mlstm_bench_utils import cuda_graph_ms, mlstm_inputs
from tfla.triton import function, mlstm_triton


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dh", type=int, nargs="+", default=[96, 192])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--gates", nargs="+", default=["exp", "sig"])
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--graph", action="store_true",
                    help="also the fused path's GPU time alone (fwd+bwd replayed from a CUDA graph: no host cost)")
    ap.add_argument("--fused-only", action="store_true", help="skip the unfused path's column (half the time)")
    args = ap.parse_args()
    shipped = function.FUSED_KERNELS
    extra = " fwd+bwd GPU ms fused |" if args.graph else ""
    print("| DH | S | B | gate | chunk | fwd+bwd ms unfused | fwd+bwd ms fused |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|" if args.graph else ""))
    for DH in args.dh:
        for S in args.seq:
            B, NH = max(1, round(args.tokens / S)), 4
            q, k, v, i, f, dh = mlstm_inputs(B, NH, S, DH, requires_grad=True)
            for gate in args.gates:
                for L in args.chunks:
                    if L > S:
                        continue
                    row = []
                    for fused in (False, True):
                        if args.fused_only and not fused:
                            row.append("-")
                            continue
                        def step():
                            function.FUSED_KERNELS = fused
                            mlstm_triton(q, k, v, i, f, gate=gate, chunk_size=L).backward(dh)

                        step()
                        ms = do_bench(step, warmup=10, rep=100, grad_to_none=(q, k, v, i, f), return_mode="median")
                        row.append(f"{ms:.3f}")
                    if args.graph:
                        function.FUSED_KERNELS = True
                        row.append(f"{cuda_graph_ms(step, (q, k, v, i, f)):.3f}")
                    function.FUSED_KERNELS = shipped
                    print(f"| {DH} | {S} | {B} | {gate} | {L} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
