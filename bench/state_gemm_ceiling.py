"""How fast could the chunked path's state products run? cuBLAS (torch.bmm) and a plain Triton batched GEMM on the
same shapes, beside the state terms' cost inside our fused kernels, as a ceiling for restructuring them.

Usage (CUDA machine, repo root):
    PYTHONPATH=kernels python bench/state_gemm_ceiling.py --dh 96 192 384 512 --seq 4096

Above function.SINGLE_CHUNK_MAX_SEQ_LEN the op runs chunks of L = function.default_chunk_size(S, DH) rows. Per chunk
and (batch, head) a fwd+bwd takes six products with a [DQK, DHV] chunk state, 2 L DQK DHV flops each:
    chunk terms of the states   (e k)^T v  (fwd_state),   (g rs q)^T dh  (bwd_state)          [D, L] @ [L, D]
    state terms of the outputs  h += (g q) C,  dq += (g rs dh) C^T,  dk += e v dC^T,  dv += e k dC   [L, D] @ [D, D]
against about 6 L^2 D flops of products inside the chunk (q k^T and W v forward; dS, dq, dk and dv backward; each
the causal half of 2 L^2 D). At DH 384 / 512 the state products are most of the arithmetic (2 D / L = 3 to 4 times
the inside of the chunk), so how fast they can run bounds what a restructuring (state products as separate GEMMs, the
kernels keeping the inside of the chunk) could gain.

Printed per head dim (B = round(50k / S), NH = 4, bf16 operands, float32 accumulation, median of
triton.testing.do_bench):
  * cuBLAS: torch.bmm of [L, D] @ [D, D] (the four output terms) and [D, L] @ [L, D] (the two chunk terms);
  * Triton: the best of a few tile shapes of a plain batched GEMM (_bmm_kernel below) on [L, D] @ [D, D];
  * ours: the score-matrix path's products kernels (score_rows for h, score_cols for dv) with and without their
    state term; the difference is what the state term costs inside the fused kernel today (at DH 96 the path is not
    the default, but the kernels run there all the same).
The recurrence over the chunks (C_{c+1} = decay C_c + chunk term) is not timed: it is elementwise over the states
(mlstm_state_scan_kernel does it for launch.PARALLEL_CHUNK_STATES). A restructuring would also pay a write and a read
of each [S, D] output term it moves out of the fused kernels: the last column is that traffic at 3 TB/s.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from tfla.triton import function, launch
from tfla.triton.launch import chunk_layout


@triton.jit
def _bmm_kernel(A, B, C, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[b] = A[b] @ B[b] for contiguous [batch, M, K] @ [batch, K, N]; K a multiple of BK (the head dims here)."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(A + b * M * K + rows[:, None] * K + ks[None, :], mask=rows[:, None] < M, other=0.0)
        x = tl.load(B + b * K * N + ks[:, None] * N + cols[None, :], mask=cols[None, :] < N, other=0.0)
        acc += tl.dot(a, x)
    tl.store(C + b * M * N + rows[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


TRITON_TILES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 64, 4, 4),
                (64, 256, 64, 8, 3)]


def triton_bmm_ms(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> tuple[float, tuple]:
    batch, M, K = a.shape
    N = b.shape[-1]
    best = (float("inf"), None)
    for bm, bn, bk, warps, stages in TRITON_TILES:
        if bk > K or K % bk:
            continue
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), batch)
        try:
            ms = do_bench(lambda: _bmm_kernel[grid](a, b, out, M, N, K, BM=bm, BN=bn, BK=bk, num_warps=warps,
                                                    num_stages=stages), warmup=10, rep=100, return_mode="median")
        except triton.runtime.errors.OutOfResources:
            continue
        best = min(best, (ms, (bm, bn, bk, warps, stages)), key=lambda t: t[0])
    return best


def fused_products_ms(B: int, NH: int, S: int, D: int, lay) -> dict:
    """Our score-matrix products kernels (launch._apply_scores) on random operands: h (score_rows, forward, with
    the entering state's term) and dv (score_cols, with the leaving state gradient's term), each with and without
    the state term. Gate vectors are zeros (weights of one): timing only."""
    BNH = B * NH
    dt = torch.bfloat16
    x, a, out = (torch.randn(BNH, S, D, device="cuda", dtype=dt) for _ in range(3))
    m, per_matrix = launch._score_matrix(x, BNH, lay)
    m.normal_()
    st = torch.randn(BNH, lay.NC + 1, D, D, device="cuda", dtype=dt) / D
    vec = torch.zeros(BNH, lay.SP, device="cuda")
    mst = torch.zeros(BNH, lay.NC + 1, device="cuda")
    qn = torch.ones(BNH, lay.SP, device="cuda")
    prec = launch._precision(dt)
    scale = D ** -0.5

    def rows(with_state: bool):
        return lambda: launch._apply_scores(
            "score_rows", m, per_matrix, x, out, None, lay, BNH, 1, prec, qn, vec, 1e-6,
            state=(1, a, st, None, vec, mst, vec, vec, scale) if with_state else None, NORMALIZE=True,
            EXP_GATE=True)

    def cols(with_state: bool):
        return lambda: launch._apply_scores("score_cols", m, per_matrix, x, out, None, lay, BNH, 1, prec,
                                            state=(2, a, st, None, vec, vec, vec) if with_state else None)

    return {name: do_bench(fn, warmup=10, rep=100, return_mode="median")
            for name, fn in (("rows_state", rows(True)), ("rows", rows(False)), ("cols_state", cols(True)),
                             ("cols", cols(False)))}


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
    B, NH = max(1, round(args.tokens / args.seq)), 4
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; bf16, B={B} "
          f"NH={NH} S={args.seq}, chunks of function.default_chunk_size(S, DH) rows")
    print("| DH | chunk L (matrices per product) | cuBLAS [L,D]@[D,D] us (TFLOP/s) | cuBLAS [D,L]@[L,D] us (TFLOP/s) | "
          "Triton [L,D]@[D,D] us (TFLOP/s; tiles) | ours h: with / without state us (state part) | ours dv: with / "
          "without state us (state part) | [S, D] write + read at 3 TB/s us |")
    print("|---|---|---|---|---|---|---|---|")
    for D in args.dh:
        L = function.default_chunk_size(args.seq, D)
        lay = chunk_layout(args.seq, L)
        batch = B * NH * lay.NC
        rows = torch.randn(batch, L, D, device="cuda", dtype=torch.bfloat16)
        state = torch.randn(batch, D, D, device="cuda", dtype=torch.bfloat16)
        cols = rows.transpose(1, 2)  # [D, L] views, as the state kernels read the rows (transposed operand)
        out_rows = torch.empty(batch, L, D, device="cuda", dtype=torch.bfloat16)
        out_state = torch.empty(batch, D, D, device="cuda", dtype=torch.bfloat16)
        flops = 2.0 * batch * L * D * D
        ms_rows = do_bench(lambda: torch.bmm(rows, state, out=out_rows), warmup=10, rep=100, return_mode="median")
        ms_state = do_bench(lambda: torch.bmm(cols, rows, out=out_state), warmup=10, rep=100, return_mode="median")
        ms_triton, tiles = triton_bmm_ms(rows, state, out_rows)
        del rows, state, out_rows, out_state
        ours = fused_products_ms(B, NH, args.seq, D, lay)
        traffic_us = 2 * B * NH * args.seq * D * 2 / 3e12 * 1e6
        print(f"| {D} | {L} ({batch}) | {ms_rows * 1e3:.0f} ({tflops(flops, ms_rows):.0f}) | {ms_state * 1e3:.0f} "
              f"({tflops(flops, ms_state):.0f}) | {ms_triton * 1e3:.0f} ({tflops(flops, ms_triton):.0f}; {tiles}) | "
              f"{ours['rows_state'] * 1e3:.0f} / {ours['rows'] * 1e3:.0f} "
              f"({(ours['rows_state'] - ours['rows']) * 1e3:.0f}) | {ours['cols_state'] * 1e3:.0f} / "
              f"{ours['cols'] * 1e3:.0f} ({(ours['cols_state'] - ours['cols']) * 1e3:.0f}) | {traffic_us:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
