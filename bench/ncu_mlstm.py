"""Hardware counters of the Triton mLSTM's kernels (Nsight Compute), one fwd+bwd per shape, and a short table of them.

Usage (CUDA machine with ncu, repo root):
    ncu --clock-control none --profile-from-start off --csv --page raw \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        python bench/ncu_mlstm.py 96:196 192:1024 > ncu_raw.csv
    python bench/ncu_mlstm.py --summarize ncu_raw.csv

The first form runs each shape once to compile (outside the profiled range), then one profiled fwd+bwd with
bf16 inputs, NH = 4 and B = round(50000 / S) as in bench_mlstm.py. The second prints per kernel: time, SM and memory
throughput, tensor-pipe use, registers, shared memory, occupancy, and the three largest warp-stall reasons: whether a
kernel waits on memory, on its own instruction latency, or on too few warps.
"""

from __future__ import annotations

import argparse
import csv
import sys


def run(shapes: list[str], gate: str) -> None:
    import torch

    from mlstm_bench_utils import mlstm_inputs
    from tfla.triton import mlstm_triton

    for shape in shapes:
        DH, S = (int(x) for x in shape.split(":"))
        B = max(1, round(50_000 / S))
        q, k, v, i, f, dh = mlstm_inputs(B, 4, S, DH, requires_grad=True)

        def step():
            mlstm_triton(q, k, v, i, f, gate=gate).backward(dh)
            for x in (q, k, v, i, f):
                x.grad = None

        step()  # compile outside the profiled range
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"# profiled DH={DH} S={S} B={B}", file=sys.stderr)


# (column title, raw metric name, scale): what the table shows of each kernel.
COLUMNS = [
    ("us", "gpu__time_duration.sum", 1e-3),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("mem %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("DRAM %", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("L2 %", "lts__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("L1 %", "l1tex__throughput.avg.pct_of_peak_sustained_active", 1),
    ("regs", "launch__registers_per_thread", 1),
    ("smem KiB", "launch__shared_mem_per_block_dynamic", 1 / 1024),
    ("occ. theor. %", "sm__maximum_warps_per_active_cycle_pct", 1),
    ("occ. achieved %", "sm__warps_active.avg.pct_of_peak_sustained_active", 1),
    ("waves", "launch__waves_per_multiprocessor", 1),
    ("issue active %", "sm__inst_issued.avg.pct_of_peak_sustained_active", 1),
]
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize(path: str) -> None:
    with open(path, newline="") as fh:
        lines = [ln for ln in fh if ln.startswith('"')]  # ncu's own log lines are not CSV
    rows = list(csv.reader(lines))
    header, units, data = rows[0], rows[1], rows[2:]
    col = {name: n for n, name in enumerate(header)}
    name_col = col.get("Kernel Name", col.get("Function Name"))
    tensor_cols = [n for n, h in enumerate(header) if "pipe_tensor" in h and h.endswith("pct_of_peak_sustained_active")]
    stall_cols = [n for n, h in enumerate(header) if h.startswith(STALL_PREFIX) and h.endswith(STALL_SUFFIX)]
    titles = ["kernel", "grid"] + [t for t, _, _ in COLUMNS] + ["tensor pipe %", "top stalls (cycles per issue)"]
    print("| " + " | ".join(titles) + " |")
    print("|" + "---|" * len(titles))
    for row in data:
        cells = [row[name_col].split("(")[0].replace("mlstm_", ""), row[col["Grid Size"]] if "Grid Size" in col else ""]
        for _, metric, scale in COLUMNS:
            value = _number(row[col[metric]]) if metric in col else None
            cells.append("n/a" if value is None else f"{value * scale:.1f}")
        tensor = [_number(row[n]) for n in tensor_cols]
        tensor = [t for t in tensor if t is not None]
        cells.append(f"{max(tensor):.1f}" if tensor else "n/a")
        stalls = sorted(((_number(row[n]) or 0.0, header[n][len(STALL_PREFIX):-len(STALL_SUFFIX)]) for n in stall_cols),
                        reverse=True)[:3]
        cells.append(", ".join(f"{name} {value:.1f}" for value, name in stalls))
        print("| " + " | ".join(cells) + " |")
    del units


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", default=["96:196"], help="DH:S")
    ap.add_argument("--gate", default="exp")
    ap.add_argument("--summarize", metavar="CSV", help="print the table of an ncu --csv --page raw report")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        run(args.shapes, args.gate)


if __name__ == "__main__":
    main()
