"""Compile the Triton mLSTM's matrix kernels for a GPU architecture offline (no GPU needed) and report what the
compiler made of them: registers per thread, spill stack, shared memory, and SASS instruction counts.

Usage (any machine with Triton installed; repo root):
    PYTHONPATH=kernels python bench/inspect_kernels.py --dh 96 --seq 196
    PYTHONPATH=kernels python bench/inspect_kernels.py --dh 192 --kernel fwd_h --tiles BK=64 BV=256 num_warps=8
    PYTHONPATH=kernels python bench/inspect_kernels.py --dh 96 --seq 1024 --kernel fwd_h dq --sections
    PYTHONPATH=kernels python bench/inspect_kernels.py --dh 512 --seq 4096 --chunk 256 --kernel score_rows score_cols

Why: on the H100 these kernels are latency-bound (bench/results/ncu_mlstm_h100.md), so registers, spills and the
instruction count of the inner loop decide their speed, and all three can be read here, on a CPU, before any GPU
time is spent. Compilation and specialisation: tfla/triton/offline.py. Tiles come from the tuned table of --arch
(kernels/tfla/triton/tuned_tiles.json) unless --tiles overrides them; the CUDA fast-exp path (FAST_EXP2) is what is
compiled. --sections adds where the instructions stand: before the first loop, in each loop, after the last
(tfla/triton/offline.py: sass_sections), which is where two kernels with alike loops differ. "blocks / SM" is how
many programs the registers and the shared memory let one Hopper SM hold (65536 registers, 227 KiB).

Register counts depend on the Triton version. To read what the GPU machine (Triton 3.6) compiles, put that version
first on the path; it reproduced the H200's counts exactly in session 10 (dq at DH 96: 178 registers, 2 blocks / SM,
where Triton 3.8 made 150):
    python -m pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:kernels python bench/inspect_kernels.py --dh 96 --seq 1024
"""

from __future__ import annotations

import argparse

import triton

from tfla.triton import function, launch
from tfla.triton.offline import KERNELS, compile_kernel, sass_report


def _parse_tiles(items: list[str]) -> dict:
    """KEY=VALUE items: integers, or True / False for flags such as RELOAD_KV."""
    flags = {"True": True, "False": False}
    return {k: flags[v] if v in flags else int(v) for k, v in (item.split("=") for item in items)}


def blocks_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Programs one Hopper SM holds at once: registers are granted per warp in units of 256 (8 per thread), from
    65536; shared memory from 227 KiB, with 1 KiB reserved per block; at most 32 blocks."""
    by_regs = 65536 // (-(-regs // 8) * 8 * 32 * num_warps)
    by_smem = (227 * 1024) // (smem + 1024)
    return min(by_regs, by_smem, 32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dh", type=int, default=96, help="head dim (DQK = DHV)")
    ap.add_argument("--seq", type=int, default=196)
    ap.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = H100)")
    ap.add_argument("--tiles", nargs="*", default=[], help="KEY=VALUE overrides, e.g. BT=64 num_warps=8")
    ap.add_argument("--chunk", type=int, default=0,
                    help="score kernels: chunks of this many rows with states (the chunked path's variant, tiles "
                         "from its ':states' entries); 0: one chunk")
    ap.add_argument("--sections", action="store_true",
                    help="also a table of instructions (barriers, MMAs) before, in and after the loops")
    args = ap.parse_args()
    print(f"Triton {triton.__version__}, sm_{args.arch}, DH={args.dh}, S={args.seq}, bf16, FAST_EXP2")
    print("| kernel | tiles | regs | spill stack B | smem KiB | blocks / SM | SASS | MUFU | HGMMA | HMMA | LDL+STL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    one_chunk = args.seq <= function.SINGLE_CHUNK_MAX_SEQ_LEN  # what launch.tiles() is told (short entries)
    sections = {}
    for name in args.kernel:
        tiles = launch.tiles(name, args.dh, args.dh, f"sm{args.arch}", rows=args.seq if one_chunk else 0,
                             with_states=args.chunk > 0)
        tiles.update(_parse_tiles(args.tiles))
        try:
            r = sass_report(compile_kernel(name, args.dh, args.dh, args.seq, tiles, args.arch, chunk=args.chunk))
        except Exception as err:  # a tile shape this GPU cannot hold: report it, keep going
            print(f"| {name} | {tiles} | failed: {type(err).__name__}: {str(err)[:120]} |")
            continue
        c = r["counts"]
        sections[name] = r["sections"]
        print(f"| {name} | {tiles} | {r['regs']} | {r['stack']} | {r['smem'] / 1024:.1f} | "
              f"{blocks_per_sm(r['regs'], r['smem'], tiles.get('num_warps', 4))} | {sum(c.values())} | "
              f"{c['MUFU']} | {c['HGMMA']} | {c['HMMA']} | {c['LDL'] + c['STL']} |", flush=True)
    if args.sections:
        print("\nInstructions (barriers, MMAs) once per program before the loops, per trip of each loop, once after:\n")
        print("| kernel | before the loops | loops, per trip | after the loops |")
        print("|---|---|---|---|")

        def cell(sec):
            return f"{sec['instructions']} ({sec['barriers']} BAR, {sec['mma']} MMA)"

        for name, sec in sections.items():
            loops = ", ".join(cell(lp) for lp in sec["loops"]) or "none"
            print(f"| {name} | {cell(sec['prologue'])} | {loops} | {cell(sec['epilogue'])} |")


if __name__ == "__main__":
    main()
