"""Offline compilation of the matrix kernels for a GPU architecture (no GPU needed): what bench/inspect_kernels.py
reports (registers, spills, SASS counts) and what the CPU test suite compiles, so that a kernel edit that only breaks
the CUDA path (the interpreter never runs it: FAST_EXP2's inline PTX, tile shapes a GPU cannot hold) fails in CI.

Written against Triton 3.8 (ASTSource and its attribute format). The launch is specialised as Triton specialises a
real one: pointers 16-byte aligned, integer arguments equal to 1 made constants and multiples of 16 marked so.
Triton's bundled cuobjdump reads the cubin.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels as K
from . import launch
from . import score_kernels as SK

# Half-precision tensors of each kernel (the rest of the pointers are float32 per-row vectors or n-states): the
# chunk states C / dC too, as a chunked bf16 call keeps them (function.LOW_PRECISION_STATES).
_HALF = {"Q", "K", "V", "H", "DH", "DQ", "DK", "DV", "W", "DS", "WR", "M", "X", "OUT", "Y", "A", "KS", "QS", "XS",
         "CST", "DCST", "ST"}
_INTS = ("S", "L", "NC", "SP", "TRI")
_FLOATS = ("scale", "eps")
KERNELS = {
    "fwd_h": K.mlstm_fwd_h_kernel,
    "dq": K.mlstm_bwd_dq_kernel,
    "dk": K.mlstm_bwd_dk_kernel,
    "dv": K.mlstm_bwd_dv_kernel,
    "dkdv": K.mlstm_bwd_dkdv_kernel,
    "dkdv_k": K.mlstm_bwd_dkdv_kernel,  # the split pass's two launches (launch.dkdv_mode)
    "dkdv_v": K.mlstm_bwd_dkdv_kernel,
    # the score-matrix path (launch.uses_score_matrix); "score_rows" as it makes h, "score_cols" as it makes dk
    "scores_fwd": SK.mlstm_scores_fwd_kernel,
    "scores_bwd": SK.mlstm_scores_bwd_kernel,
    "score_rows": SK.mlstm_score_rows_kernel,
    "score_cols": SK.mlstm_score_cols_kernel,
}


def compile_kernel(name: str, DQK: int, DHV: int, S: int, tiles: dict, arch: int = 90, dtype: str = "bf16",
                   fast_exp2: bool = True, chunk: int = 0):
    """The compiled kernel (triton.compiler.CompiledKernel) of one matrix kernel, one chunk of S rows, no states:
    the variant such a call launches (with launch.FOLD_GATES_FWD / _BWD, fwd_h forms the gate vectors, the dq kernel
    zeroes the gate tickets and the one-pass dk + dv kernel computes the gate gradients). chunk > 0 (the score
    kernels only): chunks of that many rows with states, the score-matrix path's variant at S > 1024."""
    fn = KERNELS[name]
    consts = dict(DQK=DQK, DHV=DHV, PREC="tf32", FAST_EXP2=fast_exp2, NHT=1)  # NHT: tiles may set it
    gates = dict(GATES_BWD=launch.FOLD_GATES_BWD, EXP_GATE=True, BL=launch._pow2(S), GATES_STATE_TERMS=False,
                 GATES_CB=1)
    no_gates = dict(GATES_BWD=False, EXP_GATE=True, BL=16, GATES_STATE_TERMS=False, GATES_CB=1)
    flags = {"fwd_h": dict(HAS_INIT=False, NORMALIZE=True, EXP_GATE=True, GATES_FWD=launch.FOLD_GATES_FWD,
                           GT=min(launch.GATE_TILE_ROWS, launch._pow2(S))),
             "dq": dict(HAS_INIT=False, ROW_TERMS=True, NORMALIZE=True, EXP_GATE=True,
                        ZERO_TICKETS=launch.FOLD_GATES_BWD),
             # defaults are not constexprs to ASTSource
             "dkdv": dict(HAS_FINAL=False, DO_K=True, DO_V=True, **gates),
             "dkdv_k": dict(HAS_FINAL=False, DO_K=True, DO_V=False, **no_gates),
             "dkdv_v": dict(HAS_FINAL=False, DO_K=False, DO_V=True, **no_gates),
             "scores_fwd": dict(PACK=launch.SCORE_PACK_ROWS, HAS_STATE=chunk > 0),
             "scores_bwd": dict(PACK=launch.SCORE_PACK_ROWS, NORMALIZE=True, EXP_GATE=True, DO_DS=True, DO_WR=True,
                                ROW_TERMS=chunk == 0),
             # as they make h (state term: q C) and dk (v dC^T + dn)
             "score_rows": dict(PACK=launch.SCORE_PACK_ROWS, D=DHV, NORMALIZE=True, EXP_GATE=True, ROW_DOT=False,
                                STATE=1 if chunk else 0, DA=DQK, SW=DHV),
             "score_cols": dict(PACK=launch.SCORE_PACK_ROWS, D=DQK, ROW_DOT=True, STATE=1 if chunk else 0, DA=DHV,
                                SW=DHV)}
    consts.update(flags.get(name, dict(HAS_FINAL=False)))
    options = dict(num_warps=tiles.get("num_warps", 4), num_stages=tiles.get("num_stages", 3))
    if "maxnreg" in tiles:  # a register cap per thread (ptxas .maxnreg): more blocks per SM, maybe spills
        options["maxnreg"] = tiles["maxnreg"]
    consts.update({k: v for k, v in tiles.items() if k not in options})
    if name.startswith("dkdv"):
        consts.setdefault("SL", min(64, consts["BK"], consts["BV"]))
    # the score kernels take one head dim or none, their products kernels no exp2
    consts = {k: v for k, v in consts.items() if k in fn.arg_names or k not in ("DQK", "DHV", "FAST_EXP2")}
    lay = launch.chunk_layout(S, chunk or S)
    blocks = launch._cdiv(lay.L, launch.SCORE_PACK_ROWS)
    tri = launch.SCORE_PACK_ROWS ** 2 * blocks * (blocks + 1) // 2
    return compile_launch(fn, consts, dict(S=S, L=lay.L, NC=lay.NC, SP=lay.SP, NKO_Q=1, BNH=1024, TRI=tri), options,
                          arch=arch, dtype=dtype)


def compile_launch(fn, consts: dict, ints: dict, options: dict, arch: int = 90, dtype: str = "bf16"):
    """Any kernel of kernels.py compiled as a launch with these constexprs and integer arguments (their values) would
    be: the other float arguments fp32 scalars, pointers 16-byte aligned (half precision for q, k, v, h and their
    gradients, float32 otherwise)."""
    consts = dict(consts)
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in ints:
            if ints[arg] == 1:  # Triton turns an integer argument equal to 1 into a constant
                signature[arg], consts[arg] = "constexpr", 1
            else:
                signature[arg] = "i32"
                if ints[arg] % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in _FLOATS:
            signature[arg] = "fp32"
        else:  # a pointer; torch's allocations are 16-byte aligned
            signature[arg] = "*" + (dtype if arg in _HALF else "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*?(0x[0-9a-f]+)?\s*;", re.M)


def sass_sections(sass: str) -> dict:
    """Where a kernel's instructions stand: before its first loop ("prologue"), in each loop (a backward branch and
    its target; nested ones counted in the outer) and after the last ("epilogue", trailing padding included), each
    as {"instructions", "barriers" (BAR.SYNC and the like), "mma" (HGMMA + HMMA)}. A loop's body runs once per trip,
    the rest once per program: two kernels with alike loops differ by what stands around them."""
    found = [(int(addr, 16), op, target) for addr, op, target in _INSTRUCTION.findall(sass)]
    loops = []
    for addr, op, target in found:
        if op == "BRA" and target and int(target, 16) < addr:
            start = int(target, 16)
            loops = [lp for lp in loops if not (start <= lp[0] and lp[1] <= addr)]  # an outer loop swallows inner ones
            if not any(lp[0] <= start and addr <= lp[1] for lp in loops):
                loops.append((start, addr))
    loops.sort()

    def section(lo, hi):
        ops = [op for addr, op, _ in found if lo <= addr <= hi]
        return dict(instructions=len(ops), barriers=sum(op == "BAR" for op in ops),
                    mma=sum(op in ("HGMMA", "HMMA") for op in ops))

    last = found[-1][0] if found else 0
    return dict(prologue=section(0, loops[0][0] - 1) if loops else section(0, last),
                loops=[section(lo, hi) for lo, hi in loops],
                epilogue=section(loops[-1][1] + 1, last) if loops else section(last + 1, last))


def sass_report(compiled) -> dict:
    """Registers, spill stack and shared memory of a compiled kernel, its SASS instructions by opcode, and where they
    stand (sass_sections)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", cubin], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    opcodes = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass, re.M)
    return dict(regs=int(found.group(1)) if found else None, stack=int(found.group(2)) if found else None,
                smem=compiled.metadata.shared, counts=collections.Counter(opcodes), sections=sass_sections(sass))
