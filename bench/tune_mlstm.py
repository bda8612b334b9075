"""Tile tuning of the Triton mLSTM's matrix kernels (fwd_h, dq, dk, dv, dkdv) on the GPU at hand.

Usage (CUDA machine, repo root):
    PYTHONPATH=kernels python bench/tune_mlstm.py --dh 96 192 384 512 --seq 196 --write \
        --out bench/results/tune_h100.json

For each head dim it tries a list of tile shapes, warps and pipeline stages per kernel, one kernel at a time with
the others at their current choice (coordinate descent). It times the op's forward (for fwd_h) or backward (the
rest) as GPU time of a CUDA-graph replay, so the host's launch cost does not blur the ranking, and it checks every
candidate's outputs against the current choice's (a tiling bug shows as a mismatch and drops the candidate).
dkdv (dk and dv in one kernel) is tried beside dk + dv where it fits. Head dims that the kernels take in two pieces
(launch.head_dim_pieces: 96, 192, ...) keep the pieces' widths; only row tiles, warps and stages are tried, and the
winners are stored under the exact dims ("fwd_h:96:96"). --write merges the winners for this GPU
architecture into kernels/tfla/triton/tuned_tiles.json, which the launch wrappers read (launch.py: tiles()).

--states tunes the variants that carry a chunk state (chunked calls: use --seq 4096) with head-dim pieces, which a
GPU otherwise runs with padded tiles (launch.PIECES_WITH_STATES). It starts from the shipped table, times the
padded state variants first, tunes fwd_h, dq and dkdv with pieces, and keeps the pieces where they beat the padded
tiles: fwd_h if the forward got faster, dq and dkdv together if the backward did. Winners go under
"fwd_h:96:96:states" and so on, which launch.tiles() then applies to the state variants:
    PYTHONPATH=kernels python bench/tune_mlstm.py --states --dh 96 192 --seq 4096 --write \
        --out bench/results/tuning/tune_states_h200.json

--split tunes the split backward pass (launch.dkdv_mode: the one-pass dk + dv kernel launched twice, one accumulator
each, tiles "dkdv_k" / "dkdv_v") against what the shipped table runs, at the head dims given (padded to <= 256). It
keeps the split where the whole backward got faster: the tiles go under "dkdv_k:192:192" (":states" appended at a
chunked --seq, whose kernels carry a chunk state) and the padded dim into "dkdv_split" ("dkdv_split:states"):
    PYTHONPATH=kernels python bench/tune_mlstm.py --split --dh 96 192 --seq 1024 --write

--state-kernels tunes the two chunk-state kernels (fwd_state, bwd_state: one program per (DQK, DHV) tile of a state,
sequential over the chunks) at a chunked --seq, from the shipped table; winners go under "fwd_state:128:128" (padded
dims) where they beat the shipped tiles:
    PYTHONPATH=kernels python bench/tune_mlstm.py --state-kernels --dh 96 192 384 512 --seq 4096 --write

--score-matrix tunes the kernels of the score-matrix path (launch.uses_score_matrix: wide heads), forced on, from the
shipped table; winners go under "scores_fwd:512:512"-style entries (padded dims), or at a chunked --seq (the path
chunk by chunk with states) "scores_fwd:512:512:states", with the state term's reduction slice BD among the
products kernels' candidates:
    PYTHONPATH=kernels python bench/tune_mlstm.py --score-matrix --dh 384 --seq 1024 --write
    PYTHONPATH=kernels python bench/tune_mlstm.py --score-matrix --dh 512 384 --seq 4096 --kernels score_rows \
        score_cols --write
In one chunk DH 384 and 512 share the entry of the padded 512 (the head dim tuned last wins); chunked, a head dim that
is not a power of two gets its own entry ("score_rows:384:384:states"). --kernels naming score kernels tunes only
those.

--short tunes the kernels of one short chunk (--seq <= launch.SHORT_CHUNK_ROWS, no states: ViL's 197 tokens) from
the shipped table and writes the winners as "dkdv:96:96:short"-style entries, which only such calls read:
    PYTHONPATH=kernels python bench/tune_mlstm.py --short --dh 96 192 --seq 196 --write

--register-caps tries caps on the registers per thread (ptxas .maxnreg, the launch option "maxnreg") on the shipped
tiles of fwd_h, dq and the kernels that make dk and dv, at one chunk (--seq <= 1024). A kernel a little over a
multiple of the register file (65536 per SM) runs one block fewer per SM: on the H200 (Triton 3.6) DH 96's dq took
178 registers, 2 blocks of 4 warps, and capped at 128 (4 blocks, no spills) it went from 229 to 183 us at S 1024.
The cap that wins (or none) is written into the entry the shipped tiles came from:
    PYTHONPATH=kernels python bench/tune_mlstm.py --register-caps --dh 96 192 --seq 1024 --write
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

from mlstm_bench_utils import cuda_graph_ms, mlstm_inputs
from tfla.triton import function, launch


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


# (BT, BS, num_warps, num_stages): query-side kernels want BT % BS == 0, key-side ones BS % BT == 0.
# 8 warps come second and third: at head dims of 192-256 the one-program-per-row-tile accumulators ([64, 256] float32)
# spill with 4 warps, and a search cut short by its budget must still have tried the 8-warp shapes. (64, 32, 8, 2)
# compiles to 170 registers and 24 KiB of shared memory at DH = 192 with a 256-wide output slice
# (bench/inspect_kernels.py): more blocks per SM than any other one-slice shape; not yet timed.
QUERY_TILES = [(64, 64, 4, 2), (64, 64, 8, 3), (64, 32, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
               (64, 32, 4, 3), (128, 32, 8, 3), (32, 32, 4, 3)]
KEY_TILES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 3),
             (32, 128, 8, 3), (32, 32, 4, 3)]


def slices(dh: int, resident_max: int = 256, exact: bool = False) -> list[int]:
    """Widths to slice a head dim of dh into: the whole (padded) dim when it is small enough, and 64 / 128; with
    `exact`, also 32 where it divides dh and 64 does not (96 = 3 x 32 instead of 128 with a quarter masked)."""
    p = _pow2(dh)
    out = [p] if p <= resident_max else []
    out += [w for w in (64, 128) if w < p]
    if exact and dh % 32 == 0 and dh % 64 != 0:
        out.append(32)
    return out


# The split pass holds one accumulator per program: 64-row key tiles (Hopper's wgmma) first; 8 warps keep a [64, 192]
# float32 accumulator and the resident key tile out of local memory (bench/inspect_kernels.py --kernel dkdv_k).
SPLIT_TILES = [(32, 64, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3), (32, 64, 8, 3), (64, 64, 8, 3), (32, 64, 4, 2),
               (64, 128, 8, 2), (32, 128, 8, 2), (16, 64, 4, 3)]
# State kernels: (BK, BV, row step, warps, stages). Narrow state tiles give more programs (a DH 96 state in 64-wide
# tiles is 4 programs per head: 192 programs in all at B = 12, NH = 4, on 132 SMs), at the cost of re-reading the
# chunk's rows once per tile.
STATE_TILES = [(64, 64, 64, 4, 3), (32, 32, 64, 4, 3), (32, 64, 64, 4, 3), (64, 32, 64, 4, 3), (32, 32, 128, 4, 2),
               (64, 64, 128, 8, 2), (16, 32, 64, 4, 3), (32, 32, 32, 4, 3), (128, 64, 64, 8, 2), (16, 16, 64, 2, 3),
               # wide heads (DH 384 / 512: 64-96 tiles per head), where every tile re-reads the chunk's rows: fewer,
               # larger tiles read them fewer times and make larger products (the last three not yet run on a GPU)
               (128, 128, 64, 8, 2), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3),
               (32, 128, 64, 4, 3), (64, 256, 64, 8, 3), (64, 128, 128, 8, 2)]
# dk + dv in one program with both [BS, 256] accumulators: small row tiles, or 8 warps to spread the registers.
WIDE_DKDV_TILES = [(16, 32, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2)]


def candidates(kernel: str, dh: int, max_output_slice: int = 256) -> list[dict]:
    if kernel in ("fwd_state", "bwd_state"):
        rows = "BS" if kernel == "fwd_state" else "BT"
        return [{"BK": bk, "BV": bv, rows: r, "num_warps": w, "num_stages": st}
                for bk, bv, r, w, st in STATE_TILES if max(bk, bv) <= _pow2(dh)]
    pieces = piece_tiles(kernel, dh)
    if pieces:  # the head-dim pieces fix the widths (launch.head_dim_pieces): only row tiles and launch options vary
        if kernel == "dkdv":
            tiles = KEY_TILES if _pow2(dh) <= 128 else WIDE_DKDV_TILES
        elif kernel in ("dkdv_k", "dkdv_v"):
            tiles = SPLIT_TILES
        else:
            tiles = QUERY_TILES
        return [dict(pieces, BT=bt, BS=bs, num_warps=w, num_stages=st) for bt, bs, w, st in tiles]
    if kernel in ("dkdv", "dkdv_k", "dkdv_v"):
        p = _pow2(dh)
        tiles = SPLIT_TILES if kernel != "dkdv" else KEY_TILES if p <= 128 else WIDE_DKDV_TILES
        return [dict(BT=bt, BS=bs, BK=p, BV=p, num_warps=w, num_stages=st) for bt, bs, w, st in tiles]
    red, out = {"fwd_h": ("BK", "BV"), "dq": ("BV", "BKO"), "dk": ("BV", "BKO"), "dv": ("BK", "BVO")}[kernel]
    tiles = QUERY_TILES if kernel in ("fwd_h", "dq") else KEY_TILES
    # Reduction slices may be 32 wide (no padding); output slices not. Every output slice is one more program that
    # recomputes the same scores, so the widest output slices come first (up to max_output_slice: one program per
    # row tile at DH <= 256, if its accumulator fits the registers).
    widths = [(r, o) for o in slices(dh, resident_max=max_output_slice) for r in slices(dh, exact=True)]
    # Tile shapes outer, widths inner, so that a search cut short by its budget has seen every width; past the
    # first two width pairs only the first four tile shapes, to keep the search affordable.
    return [{red: r, out: o, "BT": bt, "BS": bs, "num_warps": w, "num_stages": st}
            for n, (bt, bs, w, st) in enumerate(tiles) for j, (r, o) in enumerate(widths) if j < 2 or n < 4]


def piece_tiles(kernel: str, dh: int) -> dict:
    """The head-dim pieces this kernel takes at dh (empty where it takes none: a power of two, or pieces off)."""
    return launch.head_dim_piece_tiles(kernel, dh, dh) if launch.HEAD_DIM_PIECES else {}


def table_key(kernel: str, dh: int) -> str:
    # Tiles measured with pieces are stored under the exact head dim (launch._resolve_tiles reads them there), so
    # that they do not apply to the power of two that the dim pads to.
    d = dh if piece_tiles(kernel, dh) else _pow2(dh)
    return f"{kernel}:{d}:{d}"


def fwd(x, S):
    q, k, v, i, f, _ = x
    return function.mlstm_fwd_op(q, k, v, i, f, None, None, None, True, True,
                                 function.default_chunk_size(S, q.shape[-1]), 1e-6, False, function._keeps_scores(True))


def bwd(x, saved, S):
    q, k, v, i, f, dh = x
    h, Cst, nst, mst, qn, gate_rows, scores = saved
    return function.mlstm_bwd_op(dh, None, None, None, q, k, v, i, f, None, None, None, h, Cst, nst, qn, mst, gate_rows,
                                 scores, True, True, function.default_chunk_size(S, q.shape[-1]), 1e-6)


def gpu_ms(step) -> float:
    """GPU time of one step from a CUDA graph: the host's launch cost (which swamps the kernels at small shapes) is
    left out, so candidates are ranked by what their kernels take."""
    return cuda_graph_ms(step, warmup=5, rep=30)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


class Log:
    """Prints each line and keeps it for the JSON report."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.lines.append(msg)


def merge_into_table(arch: str, tuned: dict, one_pass: dict | None = None, choices: dict | None = None):
    """Merge winners into kernels/tfla/triton/tuned_tiles.json (entries not tuned in this run keep theirs) and the
    measured choices: one_pass for "dkdv_one_pass", or choices {list key: {padded dim: won}} (--split); returns the
    file's path."""
    path = launch.TUNED_TILES_FILE
    table = json.loads(path.read_text()) if path.exists() else {}
    entries = table.setdefault(arch, {})
    entries.update(tuned)
    choices = dict(choices or {})
    if one_pass is not None:
        choices["dkdv_one_pass"] = one_pass
    for key, won_at in choices.items():
        dims = set(entries.get(key, []))
        dims |= {p for p, won in won_at.items() if won}
        dims -= {p for p, won in won_at.items() if not won}
        entries[key] = sorted(dims)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    launch.reset_tile_caches()
    return path


# A candidate replaces the current tiles only when it is faster by more than this fraction (--min-gain): repeated
# measurements of one config differ by up to about 1 % on the H200, and session 11's --state-kernels run "won" by 0.1 %
# with the default tiles written out as an entry (bench/results/tuning/tune_state_kernels_h200_s4096_session11.log).
MIN_GAIN = 0.01


def tune_kernel(kernel, dh, S, x, current, budget_s, log, max_output_slice=256, cands=None, phase=None):
    """Coordinate step: best candidate for one kernel with the others at `current` (from `cands`, or candidates());
    returns (best cfg or None where none beat the current by MIN_GAIN, its ms, the best ms, table rows).
    phase: what is timed, "fwd", "bwd" or "both" (a kernel that runs in both); by default the forward for the
    forward's kernels, else the backward."""
    launch.TILE_OVERRIDES.clear()
    launch.TILE_OVERRIDES.update(current)
    phase = phase or ("fwd" if kernel in ("fwd_h", "fwd_state") else "bwd")
    if phase == "fwd":
        step = lambda: fwd(x, S)  # noqa: E731
    elif phase == "both":
        step = lambda: bwd(x, fwd(x, S), S)  # noqa: E731
    else:  # the backward's inputs come from the forward at the current tiles, which do fit (or were shrunk)
        shrink = launch.SHRINK_TILES_THAT_DO_NOT_FIT
        launch.SHRINK_TILES_THAT_DO_NOT_FIT = True
        saved = fwd(x, S)
        launch.SHRINK_TILES_THAT_DO_NOT_FIT = shrink
        step = lambda: bwd(x, saved, S)  # noqa: E731
    try:
        ref = [t.clone() for t in step()[:5]]
        base_ms = gpu_ms(step)
    except Exception as e:  # the current tiles do not fit this GPU: the first candidate that runs is the reference
        log(f"  {kernel} DH={dh}: current tiles fail ({type(e).__name__})")
        ref, base_ms = None, float("inf")
    rows, best, best_ms = [], None, base_ms
    t_start = time.time()
    for cfg in cands if cands is not None else candidates(kernel, dh, max_output_slice):
        if time.time() - t_start > budget_s:
            log(f"  {kernel} DH={dh}: budget of {budget_s}s spent; {len(rows)} candidates tried")
            break
        launch.TILE_OVERRIDES.clear()
        launch.TILE_OVERRIDES.update(current)
        launch.TILE_OVERRIDES[kernel] = cfg
        try:
            out = step()
            if ref is None:
                ref = [t.clone() for t in out[:5]]
            err = max(rel(a, b) for a, b in zip(out[:5], ref))
            ms = gpu_ms(step) if err < 2e-2 else float("nan")
        except Exception as e:  # out of registers / shared memory: not a candidate on this GPU
            rows.append(dict(cfg=cfg, ms=None, err=None, note=type(e).__name__))
            continue
        rows.append(dict(cfg=cfg, ms=ms, err=err))
        if ms == ms and ms < best_ms:
            best, best_ms = cfg, ms
    launch.TILE_OVERRIDES.clear()
    if best is not None and best_ms > base_ms * (1.0 - MIN_GAIN):  # within noise of the current tiles
        log(f"  {kernel} DH={dh} S={S}: current {base_ms:.3f} ms; best candidate {best_ms:.3f} ms {best} is within "
            f"{MIN_GAIN:.0%}: keeping the current tiles")
        return None, base_ms, base_ms, rows
    log(f"  {kernel} DH={dh} S={S}: current {base_ms:.3f} ms -> best {best_ms:.3f} ms {best or '(current)'}")
    return best, base_ms, best_ms, rows


def main():
    global MIN_GAIN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dh", type=int, nargs="+", default=[96, 192, 384, 512])
    ap.add_argument("--seq", type=int, default=196)
    ap.add_argument("--tokens", type=int, default=50_000, help="B*S")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=60.0, help="per kernel and head dim")
    ap.add_argument("--kernels", nargs="+", default=["fwd_h", "dq", "dk", "dv", "dkdv"],
                    help="tune only these (the others keep their defaults)")
    ap.add_argument("--max-output-slice", type=int, default=256,
                    help="widest output slice to try (256: one program covers a head dim of up to 256)")
    ap.add_argument("--out", default=None, help="JSON report of every candidate")
    ap.add_argument("--write", action="store_true", help="store the result in kernels/tfla/triton/tuned_tiles.json")
    ap.add_argument("--min-gain", type=float, default=MIN_GAIN,
                    help="fraction a candidate must beat the current tiles by to replace them (default 0.01)")
    ap.add_argument("--states", action="store_true",
                    help="tune the chunk-state variants with head-dim pieces against their padded tiles (see above)")
    ap.add_argument("--split", action="store_true",
                    help="tune the split dk + dv pass against the shipped backward (see above)")
    ap.add_argument("--register-caps", type=int, nargs="*", metavar="REGS",
                    help="try these register caps (e.g. 128 168; none given: 128 168) and none on the shipped tiles "
                         "(see above)")
    ap.add_argument("--short", action="store_true",
                    help="tune the tiles of one short chunk (--seq <= 256) against the shipped table (see above)")
    ap.add_argument("--state-kernels", action="store_true",
                    help="tune the chunk-state kernels fwd_state and bwd_state (see above)")
    ap.add_argument("--score-matrix", action="store_true",
                    help="tune the score-matrix path's kernels, with the path forced on (see above)")
    args = ap.parse_args()
    MIN_GAIN = args.min_gain
    if args.score_matrix:
        return tune_score_matrix(args)
    if args.states:
        return tune_states(args)
    if args.split:
        return tune_split(args)
    if args.state_kernels:
        return tune_state_kernels(args)
    if args.register_caps is not None:
        return tune_register_caps(args)
    if args.short:
        return tune_short(args)

    log = Log()
    S = args.seq
    B = max(1, round(args.tokens / S))
    arch = launch.gpu_arch(torch.device("cuda"))
    launch.reset_tile_caches(arch, {})  # start from the defaults, not from an earlier table
    launch.SHRINK_TILES_THAT_DO_NOT_FIT = False  # a candidate that does not fit fails (and is dropped)
    log(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; bf16, "
        f"B={B} NH={args.heads} S={S}")
    result = {"gpu": torch.cuda.get_device_name(), "S": S, "B": B, "NH": args.heads, "dims": {}}
    tuned: dict = {}
    one_pass = {}
    for dh in args.dh:
        x = mlstm_inputs(B, args.heads, S, dh)
        current: dict = {}
        entry = {}
        for kernel in [k for k in ("fwd_h", "dq", "dk", "dv") if k in args.kernels]:
            launch.ONE_PASS_DKDV = False  # the dk and dv kernels while they are tuned
            best, base_ms, best_ms, rows = tune_kernel(kernel, dh, S, x, current, args.budget_s, log,
                                                       args.max_output_slice)
            if best is not None:
                current[kernel] = best
            entry[kernel] = dict(best=best, base_ms=base_ms, best_ms=best_ms, rows=rows)
        separate_ms = min(entry["dv"]["base_ms"], entry["dv"]["best_ms"]) if "dv" in entry else float("inf")
        if _pow2(dh) <= launch.ONE_PASS_DKDV_MAX_HEAD_DIM and "dkdv" in args.kernels:
            launch.ONE_PASS_DKDV = True
            best, base_ms, best_ms, rows = tune_kernel("dkdv", dh, S, x, current, args.budget_s, log)
            entry["dkdv"] = dict(best=best, base_ms=base_ms, best_ms=best_ms, rows=rows)
            if best is not None:
                current["dkdv"] = best
            if "dv" in entry:  # dk + dv measured in this run: the one-pass choice can be made
                one_pass[_pow2(dh)] = min(base_ms, best_ms) < separate_ms
                log(f"  DH={dh}: backward (GPU) with dkdv {min(base_ms, best_ms):.3f} ms vs dk + dv "
                    f"{separate_ms:.3f} ms -> {'dkdv' if one_pass[_pow2(dh)] else 'dk + dv'}")
        result["dims"][dh] = entry
        for kernel, cfg in current.items():
            tuned[table_key(kernel, dh)] = cfg
    launch.ONE_PASS_DKDV = None
    log(f"tuned tiles for {arch}: " + json.dumps(tuned, indent=1) + f"; one-pass dkdv: {one_pass}")
    result["tuned"] = tuned
    result["one_pass_dkdv"] = one_pass
    result["log"] = log.lines
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    if args.write:  # merged into the table: head dims not tuned in this run keep their entries
        log(f"wrote {merge_into_table(arch, tuned, one_pass)}")


def _start_from_shipped(args, what: str, flag: str = "", needs_chunks: bool = False):
    """The common start of --states, --split and --state-kernels, which all start from the shipped table:
    (log, S, B, arch, result)."""
    log = Log()
    S = args.seq
    B = max(1, round(args.tokens / S))
    if needs_chunks and S <= function.SINGLE_CHUNK_MAX_SEQ_LEN:
        raise SystemExit(f"{flag} needs chunks: S={S} runs as one chunk; use --seq 4096")
    arch = launch.gpu_arch(torch.device("cuda"))
    launch.reset_tile_caches()  # the shipped table: what these modes measure against
    log(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; bf16, "
        f"B={B} NH={args.heads} S={S} chunk={[function.default_chunk_size(S, dh) for dh in args.dh]}; {what}")
    result = {"gpu": torch.cuda.get_device_name(), "S": S, "B": B, "NH": args.heads, "dims": {}}
    return log, S, B, arch, result


def _report(args, log: Log, arch: str, result: dict, tuned: dict, choices: dict | None = None) -> None:
    """Write the JSON report (--out) and merge the winners into the table (--write)."""
    result.update(tuned=tuned, log=log.lines)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    if args.write and (tuned or choices):
        log(f"wrote {merge_into_table(arch, tuned, choices=choices)}")


def tune_states(args) -> None:
    """--states: see the module docstring."""
    log, S, B, arch, result = _start_from_shipped(args, "state variants, pieces vs padded", "--states", True)
    tuned = {}
    for dh in args.dh:
        kernels = [k for k in ("fwd_h", "dq", "dkdv") if k in args.kernels and piece_tiles(k, dh)]
        if not kernels:
            log(f"  DH={dh}: no head-dim pieces, nothing to tune")
            continue
        x = mlstm_inputs(B, args.heads, S, dh)
        saved = fwd(x, S)

        def times():
            return gpu_ms(lambda: fwd(x, S)), gpu_ms(lambda: bwd(x, saved, S))

        launch.PIECES_WITH_STATES = False
        launch.SHRINK_TILES_THAT_DO_NOT_FIT = True
        launch.TILE_OVERRIDES.clear()
        launch.reset_tile_caches()  # tiles() memoises without PIECES_WITH_STATES in its key
        padded = times()
        launch.PIECES_WITH_STATES = True
        launch.reset_tile_caches()
        launch.SHRINK_TILES_THAT_DO_NOT_FIT = False  # a candidate that does not fit fails (and is dropped)
        current: dict = {}
        entry = {"padded_fwd_ms": padded[0], "padded_bwd_ms": padded[1]}
        for kernel in kernels:
            best, base_ms, best_ms, rows = tune_kernel(kernel, dh, S, x, current, args.budget_s, log)
            if best is not None:
                current[kernel] = best
            elif base_ms == base_ms and base_ms < float("inf"):  # the stateless tiles with pieces were best
                current[kernel] = launch.tiles(kernel, dh, dh, arch, with_states=True)
            entry[kernel] = dict(best=best, base_ms=base_ms, best_ms=best_ms, rows=rows)
        launch.TILE_OVERRIDES.clear()
        launch.TILE_OVERRIDES.update(current)
        pieces = times()
        launch.TILE_OVERRIDES.clear()
        launch.PIECES_WITH_STATES = False
        launch.SHRINK_TILES_THAT_DO_NOT_FIT = True
        launch.reset_tile_caches()
        keep = {"fwd_h": pieces[0] < padded[0]}
        keep["dq"] = keep["dkdv"] = pieces[1] < padded[1]
        log(f"  DH={dh}: padded fwd {padded[0]:.3f} / bwd {padded[1]:.3f} ms; pieces tuned fwd {pieces[0]:.3f} / "
            f"bwd {pieces[1]:.3f} ms -> pieces for {[k for k in current if keep[k]] or 'none'}")
        entry.update(pieces_fwd_ms=pieces[0], pieces_bwd_ms=pieces[1])
        for kernel, cfg in current.items():
            if keep[kernel]:
                tuned[f"{kernel}:{dh}:{dh}:states"] = cfg
        result["dims"][dh] = entry
    log(f"tuned state-variant tiles for {arch}: " + json.dumps(tuned, indent=1))
    _report(args, log, arch, result, tuned)


def tune_split(args) -> None:
    """--split: see the module docstring."""
    log, S, B, arch, result = _start_from_shipped(args, "split dk + dv vs shipped backward")
    chunked = S > function.SINGLE_CHUNK_MAX_SEQ_LEN
    suffix = ":states" if chunked else ""
    tuned, won_at = {}, {}
    for dh in args.dh:
        if _pow2(dh) > launch.ONE_PASS_DKDV_MAX_HEAD_DIM:
            log(f"  DH={dh}: wider than the dk + dv kernel takes; skipped")
            continue
        x = mlstm_inputs(B, args.heads, S, dh)
        saved = fwd(x, S)
        launch.SPLIT_DKDV = None
        launch.SHRINK_TILES_THAT_DO_NOT_FIT = True
        launch.reset_tile_caches()
        shipped_mode = launch.dkdv_mode(dh, dh, arch, with_states=chunked)
        shipped_ms = gpu_ms(lambda: bwd(x, saved, S))
        launch.SPLIT_DKDV = True
        launch.SHRINK_TILES_THAT_DO_NOT_FIT = False  # a candidate that does not fit fails (and is dropped)
        launch.reset_tile_caches()
        current: dict = {}
        entry = {"shipped_mode": shipped_mode, "shipped_bwd_ms": shipped_ms}
        for kernel in ("dkdv_k", "dkdv_v"):
            best, base_ms, best_ms, rows = tune_kernel(kernel, dh, S, x, current, args.budget_s, log)
            current[kernel] = best or launch.tiles(kernel, dh, dh, arch, with_states=chunked)
            entry[kernel] = dict(best=best, base_ms=base_ms, best_ms=best_ms, rows=rows)
        launch.TILE_OVERRIDES.clear()
        launch.TILE_OVERRIDES.update(current)
        try:
            split_ms = gpu_ms(lambda: bwd(x, saved, S))
        except Exception as e:  # no candidate fits this GPU
            log(f"  DH={dh}: split pass fails ({type(e).__name__})")
            split_ms = float("inf")
        launch.TILE_OVERRIDES.clear()
        launch.SPLIT_DKDV = None
        launch.SHRINK_TILES_THAT_DO_NOT_FIT = True
        launch.reset_tile_caches()
        won = split_ms < shipped_ms
        won_at[_pow2(dh)] = won
        log(f"  DH={dh} S={S}: backward (GPU) shipped ({shipped_mode}) {shipped_ms:.3f} ms, split {split_ms:.3f} ms "
            f"-> {'split' if won else shipped_mode}")
        entry["split_bwd_ms"] = split_ms
        if won:
            for kernel, cfg in current.items():
                tuned[table_key(kernel, dh) + suffix] = cfg
        result["dims"][dh] = entry
    log(f"split tiles for {arch}: " + json.dumps(tuned, indent=1) + f"; split won at {won_at}")
    result["split_won"] = won_at
    _report(args, log, arch, result, tuned, choices={"dkdv_split" + suffix: won_at})


def tune_state_kernels(args) -> None:
    """--state-kernels: see the module docstring."""
    log, S, B, arch, result = _start_from_shipped(args, "chunk-state kernels", "--state-kernels", True)
    launch.SHRINK_TILES_THAT_DO_NOT_FIT = False  # a candidate that does not fit fails (and is dropped)
    tuned = {}
    for dh in args.dh:
        x = mlstm_inputs(B, args.heads, S, dh)
        entry = {}
        for kernel in ("fwd_state", "bwd_state"):
            best, base_ms, best_ms, rows = tune_kernel(kernel, dh, S, x, {}, args.budget_s, log)
            entry[kernel] = dict(best=best, base_ms=base_ms, best_ms=best_ms, rows=rows)
            if best is not None:
                tuned[f"{kernel}:{_pow2(dh)}:{_pow2(dh)}"] = best
        result["dims"][dh] = entry
    launch.SHRINK_TILES_THAT_DO_NOT_FIT = True
    log(f"state-kernel tiles for {arch}: " + json.dumps(tuned, indent=1))
    _report(args, log, arch, result, tuned)


# launch.dkdv_mode -> the kernels that make dk and dv in the shipped backward
_KEY_SIDE_KERNELS = {"one_pass": ("dkdv",), "split": ("dkdv_k", "dkdv_v"), "slices": ("dk", "dv")}


def _tune_shipped_kernels(args, log, S, B, arch, result, label, key_suffix="", cands_of=None) -> None:
    """Shared by --register-caps and --short: each head dim's fwd_h, dq and the kernels that make dk and dv in the
    shipped backward, one at a time against the shipped table (candidates from cands_of(kernel, dh), or the usual
    list); winners go under the kernel's key plus key_suffix, keys set to None (no cap) left out."""
    launch.SHRINK_TILES_THAT_DO_NOT_FIT = False  # a candidate that does not fit fails (and is dropped)
    tuned = {}
    for dh in args.dh:
        x = mlstm_inputs(B, args.heads, S, dh)
        entry = {}
        for kernel in ("fwd_h", "dq") + _KEY_SIDE_KERNELS[launch.dkdv_mode(dh, dh, arch)]:
            cands = cands_of(kernel, dh) if cands_of else None
            best, base_ms, best_ms, rows = tune_kernel(kernel, dh, S, x, {}, args.budget_s, log, cands=cands)
            entry[kernel] = dict(best=best, base_ms=base_ms, best_ms=best_ms, rows=rows)
            if best is not None:  # the whole entry is replaced
                tuned[table_key(kernel, dh) + key_suffix] = {k: v for k, v in best.items() if v is not None}
        result["dims"][dh] = entry
    launch.SHRINK_TILES_THAT_DO_NOT_FIT = True
    log(f"{label} for {arch}: " + json.dumps(tuned, indent=1))
    _report(args, log, arch, result, tuned)


def tune_register_caps(args) -> None:
    """--register-caps: see the module docstring. At --seq <= launch.SHORT_CHUNK_ROWS the calls run the short-chunk
    tiles, so the caps are measured on those and written into the ":short" entries."""
    log, S, B, arch, result = _start_from_shipped(args, "register caps on the shipped tiles")
    if S > function.SINGLE_CHUNK_MAX_SEQ_LEN:
        raise SystemExit(f"--register-caps tunes the one-chunk kernels: S={S} is chunked; use --seq 1024 or less")
    caps = args.register_caps or [128, 168]

    def cands_of(kernel, dh):
        shipped = launch.tiles(kernel, dh, dh, arch, rows=S)
        # maxnreg None: no cap (an override without the key would keep the table entry's cap)
        return [dict(shipped, maxnreg=cap) for cap in caps + [None] if cap != shipped.get("maxnreg")]

    suffix = ":short" if S <= launch.SHORT_CHUNK_ROWS else ""
    _tune_shipped_kernels(args, log, S, B, arch, result, "register caps", suffix, cands_of)


def tune_short(args) -> None:
    """--short: see the module docstring."""
    log, S, B, arch, result = _start_from_shipped(args, "tiles of one short chunk")
    if not (S <= function.SINGLE_CHUNK_MAX_SEQ_LEN and S <= launch.SHORT_CHUNK_ROWS):
        raise SystemExit(f"--short tunes one chunk of at most {launch.SHORT_CHUNK_ROWS} rows; got --seq {S}")
    _tune_shipped_kernels(args, log, S, B, arch, result, "short-chunk tiles", ":short")

# The score-matrix path (tfla/triton/score_kernels.py). (BT, BS, head-dim slice, num_warps, num_stages); the slice is
# the reduction's BK (BK = BV for scores_bwd) or the output slice BO. Query-side kernels need BT % BS == 0, the key
# side (score_cols) BS % BT == 0, and every row tile must divide launch.SCORE_PACK_ROWS (128).
SCORE_CANDIDATES = {
    # output (or reduction) slices of 64 right after the default: DH 192 in three exact slices rather than 128 + a
    # half-masked 128 (the tuner's budget may end the list early)
    "scores_fwd": [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 8, 4),
                   (64, 64, 128, 4, 3), (64, 64, 64, 4, 2), (128, 64, 64, 8, 3), (128, 64, 128, 8, 2),
                   (64, 32, 128, 4, 3), (128, 128, 64, 8, 2), (64, 64, 128, 8, 2)],
    "scores_bwd": [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 4), (64, 64, 128, 4, 2),
                   (128, 64, 64, 8, 3), (64, 32, 64, 4, 3), (128, 64, 128, 8, 2), (64, 64, 64, 8, 3),
                   (64, 32, 128, 4, 3), (64, 64, 128, 8, 3), (64, 64, 128, 4, 3)],
    "score_rows": [(64, 64, 128, 4, 3), (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 3),
                   (128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 128, 8, 3), (64, 64, 256, 8, 3),
                   (128, 64, 256, 8, 2), (128, 128, 128, 8, 2), (64, 32, 128, 4, 4), (128, 32, 256, 8, 3)],
    "score_cols": [(64, 64, 128, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3),
                   (128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (64, 128, 128, 8, 3), (64, 64, 256, 8, 3),
                   (64, 128, 256, 8, 2), (128, 128, 128, 8, 2), (32, 64, 128, 4, 3), (32, 128, 256, 8, 3)],
}
# Chunked calls (--seq 4096): the products kernels also form the state term, a [rows, DH] x [DH, BO] product per
# program that reads a state slice (in the input dtype with function.LOW_PRECISION_STATES, which made BD 64 win over
# 32 on the H100: bench/results/session17/): larger row tiles read each chunk's state fewer times. (BT, BS, BO, warps,
# stages, BD); the first is the default.
SCORE_STATE_CANDIDATES = {
    "score_rows": [(64, 64, 128, 4, 3, 64),
                   # output slices of 64 (DH 192: three exact slices) first, as in SCORE_CANDIDATES
                   (64, 64, 64, 4, 3, 64), (128, 64, 64, 4, 3, 64), (128, 64, 64, 8, 3, 64),
                   (128, 64, 128, 8, 3, 64), (128, 64, 128, 8, 2, 32),
                   (128, 128, 128, 8, 2, 64), (64, 64, 128, 4, 3, 32), (64, 64, 256, 8, 2, 64),
                   (128, 64, 256, 8, 2, 32), (64, 64, 128, 8, 3, 128),
                   # one accumulator since session 19: 128-row tiles fit 8 warps without spilling (166 registers
                   # at DH 512 for sm_90 with Triton 3.6, 253 before), 64-row ones 4 warps in 158 (3 blocks per SM);
                   # a 7th number is a register cap (ptxas .maxnreg): 128 lets two 8-warp blocks share an SM. None
                   # of these beat the first on the H100 but DH 512's score_cols with the cap (session 19)
                   (128, 64, 128, 8, 3, 64, 128), (128, 64, 256, 8, 2, 64), (128, 64, 128, 4, 3, 64),
                   (64, 64, 128, 4, 2, 64)],
    "score_cols": [(64, 64, 128, 4, 3, 64), (64, 64, 64, 4, 3, 64), (64, 128, 64, 4, 3, 64), (64, 128, 64, 8, 3, 64),
                   (64, 128, 128, 8, 3, 64), (64, 128, 128, 8, 2, 32),
                   (128, 128, 128, 8, 2, 64), (64, 64, 128, 4, 3, 32), (64, 64, 256, 8, 2, 64),
                   (64, 128, 256, 8, 2, 32), (64, 64, 128, 8, 3, 128),
                   (64, 128, 128, 8, 3, 64, 128), (32, 128, 128, 8, 3, 64), (64, 64, 128, 4, 2, 64)],
}
# Which step times each kernel: score_rows makes h in the forward and dq in the backward.
SCORE_PHASES = {"scores_fwd": "fwd", "score_rows": "both", "scores_bwd": "bwd", "score_cols": "bwd"}


def score_candidates(kernel: str, chunked: bool = False) -> list[dict]:
    if chunked and kernel in SCORE_STATE_CANDIDATES:
        return [dict(zip(("BT", "BS", "BO", "num_warps", "num_stages", "BD", "maxnreg"), c))
                for c in SCORE_STATE_CANDIDATES[kernel]]
    slice_key = {"scores_fwd": ("BK",), "scores_bwd": ("BK", "BV")}.get(kernel, ("BO",))
    return [dict({key: width for key in slice_key}, BT=bt, BS=bs, num_warps=w, num_stages=st)
            for bt, bs, width, w, st in SCORE_CANDIDATES[kernel]]


def tune_score_matrix(args) -> None:
    """--score-matrix: the four kernels of the score-matrix path at one chunk (--seq <= 1024) or, chunked, with the
    state terms, coordinate descent from the shipped table with launch.SCORE_MATRIX forced on; winners under
    "scores_fwd:512:512" (padded dims; ":states" appended when chunked)."""
    log, S, B, arch, result = _start_from_shipped(args, "score-matrix path")
    chunked = S > function.SINGLE_CHUNK_MAX_SEQ_LEN
    if chunked and not launch.SCORE_MATRIX_STATES:
        raise SystemExit("a chunked --seq tunes the path with states, which launch.SCORE_MATRIX_STATES turns off")
    if max(function.default_chunk_size(S, dh) for dh in args.dh) > launch.SCORE_MATRIX_MAX_CHUNK:
        raise SystemExit(f"--score-matrix tunes chunks of at most {launch.SCORE_MATRIX_MAX_CHUNK} rows")
    # --kernels naming score kernels tunes only those (the rest keep the shipped tiles); else all four
    wanted = [k for k in SCORE_PHASES if k in args.kernels] or list(SCORE_PHASES)
    shipped_switch = launch.SCORE_MATRIX
    launch.SCORE_MATRIX = True
    launch.SHRINK_TILES_THAT_DO_NOT_FIT = False
    tuned = {}
    try:
        for dh in args.dh:
            x = mlstm_inputs(B, args.heads, S, dh)
            current, entry = {}, {}
            for kernel in wanted:
                best, base_ms, best_ms, rows = tune_kernel(kernel, dh, S, x, current, args.budget_s, log,
                                                           cands=score_candidates(kernel, chunked),
                                                           phase=SCORE_PHASES[kernel])
                if best is not None:
                    current[kernel] = best
                entry[kernel] = dict(best=best, base_ms=base_ms, best_ms=best_ms, rows=rows)
            result["dims"][dh] = entry
            for kernel, cfg in current.items():
                # chunked entries of a head dim that is not a power of two go under the exact dims (launch.tiles
                # reads them after the padded ones), so that DH 384 and 512 keep their own output slices
                dims = dh if chunked else _pow2(dh)
                tuned[f"{kernel}:{dims}:{dims}" + (":states" if chunked else "")] = cfg
    finally:
        launch.SCORE_MATRIX = shipped_switch
        launch.SHRINK_TILES_THAT_DO_NOT_FIT = True
    log(f"score-matrix tiles for {arch}: " + json.dumps(tuned, indent=1))
    _report(args, log, arch, result, tuned)


if __name__ == "__main__":
    main()
