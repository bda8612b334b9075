"""Where one Triton mLSTM fwd+bwd spends its time: GPU kernels (torch.profiler), host-side launch cost, and the same
step replayed from a CUDA graph (no host cost at all).

Usage: PYTHONPATH=kernels python bench/profile_mlstm.py 96:196 512:196 192:1024 192:4096 [--gate exp] [--table]
       [--cprofile]

Per shape it prints: wall ms of one fwd+bwd (do_bench), host ms to issue one step (no synchronisation; if this is
close to the wall time, the step is launch-bound, not GPU-bound), CUDA-graph replay ms (GPU time alone), and with
--table the per-kernel CUDA time table, with --cprofile the host functions that take the time.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from tfla.triton import mlstm_triton


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", default=["96:196"], help="DH:S")
    ap.add_argument("--gate", nargs="*", default=["exp"])
    ap.add_argument("--table", action="store_true", help="print the per-kernel CUDA time table")
    ap.add_argument("--cprofile", action="store_true", help="print where the host's time goes (cProfile, 20 steps)")
    args = ap.parse_args()
    print("| DH | S | B | gate | wall fwd+bwd ms | host issue ms | CUDA-graph replay ms | kernels' CUDA ms |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.shapes:
        DH, S = map(int, spec.split(":"))
        B, NH = max(1, round(50_000 / S)), 4
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, NH, S, DH, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        i = torch.randn(B, NH, S, device="cuda", generator=g).requires_grad_()
        f = (torch.randn(B, NH, S, device="cuda", generator=g) + 3).requires_grad_()
        dh = torch.randn(B, NH, S, DH, device="cuda", generator=g, dtype=torch.bfloat16)
        leaves = (q, k, v, i, f)
        for gate in args.gate:
            def step():
                h = mlstm_triton(q, k, v, i, f, gate=gate)
                h.backward(dh)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            wall = do_bench(step, warmup=20, rep=200, grad_to_none=leaves, return_mode="median")

            n = 30
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                for x in leaves:
                    x.grad = None
                step()
            host = (time.perf_counter() - t0) / n * 1e3
            torch.cuda.synchronize()

            for x in leaves:
                x.grad = None
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    for x in leaves:
                        x.grad = None
                    step()
            torch.cuda.current_stream().wait_stream(side)
            for x in leaves:
                x.grad = None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            replay = do_bench(graph.replay, warmup=20, rep=200, return_mode="median")

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            cuda_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
            print(f"| {DH} | {S} | {B} | {gate} | {wall:.3f} | {host:.3f} | {replay:.3f} | {cuda_ms:.3f} |", flush=True)
            if args.table:
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
            if args.cprofile:
                import cProfile
                import pstats

                torch.cuda.synchronize()
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(20):
                    for x in leaves:
                        x.grad = None
                    step()
                pr.disable()
                torch.cuda.synchronize()
                pstats.Stats(pr).sort_stats("tottime").print_stats(25)
            del graph


if __name__ == "__main__":
    main()
