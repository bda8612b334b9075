"""GPU check of the token-major layout (tfla.triton.function.TOKEN_MAJOR_IN_PLACE, on by default): q, k, v as
[B, NH, S, D] views of contiguous [B, S, NH, D] tensors must give the contiguous run's h and gradients, keep that
layout for h, dq, dk, dv, and match the float64 reference. Shapes: ViL-T's and ViL-S's (one chunk, head-dim
pieces), a long single chunk, and a chunked call at DH 384 (state kernels, separate dk / dv kernels).

Usage (CUDA machine, repo root):
    PYTHONPATH=kernels python bench/check_token_major_gpu.py

The model-level effect: `TFLA_TOKEN_MAJOR=0 python bench/bench_models.py --device cuda --pairs tiny --cuda-graph`
against a run without the variable (bench/results/models_tiny_token_major_h200.md).
Exit status 1 when a case fails.
"""

from __future__ import annotations

import argparse

import torch

from mlstm_bench_utils import mlstm_inputs
from tfla import mlstm_parallel
from tfla.triton import function, launch, mlstm_triton

# (B, NH, S, DH, chunk size or None for the default)
CASES = [(128, 4, 196, 96, None), (64, 4, 196, 192, None), (4, 4, 2048, 96, None), (8, 4, 300, 384, 128)]


def _fwd_bwd(q, k, v, i, f, dh, chunk_size):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, i, f)]
    h = mlstm_triton(*leaves, gate="exp", chunk_size=chunk_size)
    h.backward(dh)
    return [h.detach()] + [t.grad for t in leaves]


def check(B: int, NH: int, S: int, DH: int, chunk_size) -> bool:
    q, k, v, i, f, dh = mlstm_inputs(B, NH, S, DH)

    def token_major(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    plain = _fwd_bwd(q, k, v, i, f, dh, chunk_size)
    tm = _fwd_bwd(*(token_major(t) for t in (q, k, v)), i, f, token_major(dh), chunk_size)
    layout_kept = all(launch.heads_per_row(t) == NH for t in tm[:4])  # h, dq, dk, dv
    same = all(torch.equal(a, b) for a, b in zip(plain, tm))
    n = min(B, 4)  # the float64 reference on the first rows of the batch
    ref = [t[:n].double().detach().requires_grad_() for t in (q, k, v, i, f)]
    h_ref = mlstm_parallel(*ref, gate="exp")
    h_ref.backward(dh[:n].double())
    wants = [h_ref.detach()] + [t.grad for t in ref]
    err = max(((a[:n].double() - b).norm() / b.norm()).item() for a, b in zip(tm, wants))
    good = layout_kept and same and err < 5e-2
    print(f"{'ok  ' if good else 'FAIL'} B={B} NH={NH} S={S} DH={DH} chunk={chunk_size}: layout kept {layout_kept}, "
          f"equal to the contiguous run {same}, max rel err vs float64 (h, dq, dk, dv, di, df) {err:.1e}", flush=True)
    return good


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    function.TOKEN_MAJOR_IN_PLACE = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, exp gate")
    fails = sum(not check(*case) for case in CASES)
    print(f"{fails} failure(s) in {len(CASES)} cases")
    raise SystemExit(1 if fails else 0)


if __name__ == "__main__":
    main()
