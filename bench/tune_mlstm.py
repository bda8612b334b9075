"""Tile tuning of the Triton mLSTM's matrix kernels (fwd_h, dq, dk, dv, dkdv) on the GPU at hand.

Usage (CUDA machine, repo root):
    PYTHONPATH=kernels python bench/tune_mlstm.py --dh 96 192 384 512 --seq 196 --write --out bench/results/tune_h100.json

For each head dim it tries a list of tile shapes, warps and pipeline stages per kernel (one kernel at a time, the
others at their current choice: coordinate descent), times the op's forward (fwd_h) or backward (the rest) with
do_bench, and checks every candidate's outputs against the current choice's (a tiling bug shows as a mismatch and
the candidate is dropped). dkdv (dk and dv in one kernel) is tried beside dk + dv up to --fused-dkdv-max. The result
is the tiles per kernel and head dim; --write stores them for this GPU architecture in
kernels/tfla/triton/tuned_tiles.json, which the launch wrappers read (kernels/tfla/triton/launch.py: tiles()).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
from triton.testing import do_bench

from tfla.triton import function, launch


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


# (BT, BS, num_warps, num_stages): query-side kernels want BT % BS == 0, key-side ones BS % BT == 0.
QUERY_TILES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3),
               (128, 32, 8, 3), (32, 32, 4, 3)]
KEY_TILES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 3),
             (32, 128, 8, 3), (32, 32, 4, 3)]


def slices(dh: int, resident_max: int = 256) -> list[int]:
    """Widths to slice a head dim of dh into: the whole (padded) dim when it is small enough, and 64 / 128."""
    p = _pow2(dh)
    out = [p] if p <= resident_max else []
    out += [w for w in (64, 128) if w < p]
    return out


def candidates(kernel: str, dh: int) -> list[dict]:
    if kernel == "dkdv":
        p = _pow2(dh)
        tiles = KEY_TILES if p <= 128 else [(16, 32, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 8, 2)]
        return [dict(BT=bt, BS=bs, BK=p, BV=p, num_warps=w, num_stages=st) for bt, bs, w, st in tiles]
    red, out = {"fwd_h": ("BK", "BV"), "dq": ("BV", "BKO"), "dk": ("BV", "BKO"), "dv": ("BK", "BVO")}[kernel]
    tiles = QUERY_TILES if kernel in ("fwd_h", "dq") else KEY_TILES
    widths = [(r, o) for r in slices(dh) for o in slices(dh, resident_max=128)]
    # Tile shapes outer, widths inner, so that a search cut short by its budget has seen every width; past the
    # first two width pairs only the first four tile shapes, to keep the search affordable.
    return [{red: r, out: o, "BT": bt, "BS": bs, "num_warps": w, "num_stages": st}
            for n, (bt, bs, w, st) in enumerate(tiles) for j, (r, o) in enumerate(widths) if j < 2 or n < 4]


def make_inputs(B, NH, S, DH, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, NH, S, DH, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    i = torch.randn(B, NH, S, device="cuda", generator=g)
    f = torch.randn(B, NH, S, device="cuda", generator=g) + 3.0
    dh = torch.randn(B, NH, S, DH, device="cuda", generator=g, dtype=torch.bfloat16)
    return q, k, v, i, f, dh


def fwd(x, S):
    q, k, v, i, f, _ = x
    return function.mlstm_fwd_op(q, k, v, i, f, None, None, None, True, True, function.default_chunk_size(S), 1e-6,
                                 False)


def bwd(x, saved, S):
    q, k, v, i, f, dh = x
    h, Cst, nst, mst, qn = saved
    return function.mlstm_bwd_op(dh, None, None, None, q, k, v, i, f, None, None, None, h, Cst, nst, qn, True, True,
                                 function.default_chunk_size(S), 1e-6)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def tune_kernel(kernel, dh, S, x, current, budget_s, log):
    """Coordinate step: best candidate for one kernel with the others at `current`; returns (best cfg, table rows)."""
    saved = fwd(x, S)
    step = (lambda: fwd(x, S)) if kernel == "fwd_h" else (lambda: bwd(x, saved, S))
    launch.TILE_OVERRIDES.clear()
    launch.TILE_OVERRIDES.update(current)
    ref = [t.clone() for t in step()[:5]]
    base_ms = do_bench(step, warmup=10, rep=40)
    rows, best, best_ms = [], None, base_ms
    t_start = time.time()
    for cfg in candidates(kernel, dh):
        if time.time() - t_start > budget_s:
            log(f"  {kernel} DH={dh}: budget of {budget_s}s spent; {len(rows)} candidates tried")
            break
        launch.TILE_OVERRIDES.clear()
        launch.TILE_OVERRIDES.update(current)
        launch.TILE_OVERRIDES[kernel] = cfg
        try:
            out = step()
            err = max(rel(a, b) for a, b in zip(out[:5], ref))
            ms = do_bench(step, warmup=10, rep=40) if err < 2e-2 else float("nan")
        except Exception as e:  # out of registers / shared memory: not a candidate on this GPU
            rows.append(dict(cfg=cfg, ms=None, err=None, note=type(e).__name__))
            continue
        rows.append(dict(cfg=cfg, ms=ms, err=err))
        if ms == ms and ms < best_ms:
            best, best_ms = cfg, ms
    launch.TILE_OVERRIDES.clear()
    log(f"  {kernel} DH={dh} S={S}: current {base_ms:.3f} ms -> best {best_ms:.3f} ms {best or '(current)'}")
    return best, base_ms, best_ms, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dh", type=int, nargs="+", default=[96, 192, 384, 512])
    ap.add_argument("--seq", type=int, default=196)
    ap.add_argument("--tokens", type=int, default=50_000, help="B*S")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=60.0, help="per kernel and head dim")
    ap.add_argument("--fused-dkdv-max", type=int, default=256)
    ap.add_argument("--out", default=None, help="JSON report of every candidate")
    ap.add_argument("--write", action="store_true", help="store the result in kernels/tfla/triton/tuned_tiles.json")
    args = ap.parse_args()

    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    S = args.seq
    B = max(1, round(args.tokens / S))
    arch = launch.gpu_arch(torch.device("cuda"))
    launch._tuned_cache[arch] = {}  # start from the defaults, not from an earlier table
    log(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; bf16, "
        f"B={B} NH={args.heads} S={S}")
    result = {"gpu": torch.cuda.get_device_name(), "S": S, "B": B, "NH": args.heads, "dims": {}}
    tuned = {}
    for dh in args.dh:
        x = make_inputs(B, args.heads, S, dh)
        current: dict = {}
        entry = {}
        kernels = ["fwd_h", "dq", "dk", "dv"]
        for kernel in kernels:
            launch.FUSED_DKDV_MAX_HEAD_DIM = 0  # dk and dv kernels while they are tuned
            best, base_ms, best_ms, rows = tune_kernel(kernel, dh, S, x, current, args.budget_s, log)
            if best is not None:
                current[kernel] = best
            entry[kernel] = dict(best=best, base_ms=base_ms, best_ms=best_ms, rows=rows)
        separate_ms = entry["dv"]["best_ms"]
        use_dkdv = False
        if dh <= args.fused_dkdv_max:
            launch.FUSED_DKDV_MAX_HEAD_DIM = args.fused_dkdv_max
            best, base_ms, best_ms, rows = tune_kernel("dkdv", dh, S, x, current, args.budget_s, log)
            entry["dkdv"] = dict(best=best, base_ms=base_ms, best_ms=best_ms, rows=rows)
            if best is not None:
                current["dkdv"] = best
            use_dkdv = min(base_ms, best_ms) < separate_ms
            log(f"  DH={dh}: backward with dkdv {min(base_ms, best_ms):.3f} ms vs dk + dv {separate_ms:.3f} ms -> "
                f"{'dkdv' if use_dkdv else 'dk + dv'}")
        entry["use_dkdv"] = use_dkdv
        result["dims"][dh] = entry
        for kernel, cfg in current.items():
            tuned[f"{kernel}:{_pow2(dh)}:{_pow2(dh)}"] = cfg
    launch.FUSED_DKDV_MAX_HEAD_DIM = None
    # One pass for dk and dv up to the widest padded head dim below which it won at every tuned dim.
    dkdv_max = 0
    for dh in sorted(result["dims"]):
        if not result["dims"][dh]["use_dkdv"]:
            break
        dkdv_max = _pow2(dh)
    tuned["fused_dkdv_max_head_dim"] = dkdv_max
    log(f"tuned tiles for {arch}: " + json.dumps(tuned, indent=1))
    result["tuned"] = tuned
    result["log"] = lines
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    if args.write:
        path = launch.TUNED_TILES_FILE
        table = json.loads(path.read_text()) if path.exists() else {}
        table[arch] = tuned
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        launch._tuned_cache.clear()
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
