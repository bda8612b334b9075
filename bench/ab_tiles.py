"""Tile and launch-option variants against the shipped choices, in one process: fwd+bwd GPU time of the Triton mLSTM
(CUDA-graph replays, no host cost) in alternating rounds, and how far each variant's gradients sit from the shipped
path's.

Usage (CUDA machine, repo root):
    PYTHONPATH=kernels python bench/ab_tiles.py DH S GATE NAME='{"kernel": {tiles}, "_option": value}' ...
    PYTHONPATH=kernels python bench/ab_tiles.py 96 4096 exp \\
        'session21={"_chunk": 256, "_row_terms": false, "fwd_h": {"BK": 128, "BK2": 0, "BV": 128, "BV2": 0, "BT": 64,
                    "BS": 64, "num_warps": 4, "num_stages": 2}}'

Each variant is a JSON object: kernel names map to tile overrides (launch.TILE_OVERRIDES: every tile a kernel takes,
e.g. {"dkdv": {"BK": 128, "BK2": 0, "BV": 128, "BV2": 0, "BS": 32, "BT": 32, "num_warps": 4, "num_stages": 3}}), and
keys with a leading underscore set launch options: "_chunk" (the chunk size; default function.default_chunk_size),
"_row_terms" (launch.ROW_TERMS_IN_STATE_ROWS), "_pieces_with_states" (launch.PIECES_WITH_STATES). Why one process:
GPU time moves a few per cent between processes and machines; alternating rounds in one process resolve 1 %.
bf16, NH = 4, B = 50k // S, as bench_mlstm.py. A variant the kernels refuse (bad tiles) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json

import torch

from mlstm_bench_utils import cuda_graph_ms, mlstm_inputs
from tfla.triton import launch, mlstm_triton

ROUNDS = 5


def _use(variant: dict, chunk: list) -> None:
    chunk[0] = variant.get("_chunk")
    launch.ROW_TERMS_IN_STATE_ROWS = variant.get("_row_terms")
    launch.PIECES_WITH_STATES = bool(variant.get("_pieces_with_states", False))
    launch.TILE_OVERRIDES.clear()
    launch.TILE_OVERRIDES.update({k: v for k, v in variant.items() if not k.startswith("_")})
    launch.reset_tile_caches()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dh", type=int)
    ap.add_argument("seq", type=int)
    ap.add_argument("gate", choices=["exp", "sig"])
    ap.add_argument("variants", nargs="+", help="NAME=JSON")
    args = ap.parse_args()
    variants = {"shipped": {}}
    for item in args.variants:
        name, _, text = item.partition("=")
        if not text:
            ap.error(f"variant {item!r}: write NAME=JSON")
        variants[name] = json.loads(text)

    B = max(1, 50_000 // args.seq)
    q, k, v, i, f, dh = mlstm_inputs(B, 4, args.seq, args.dh, requires_grad=True)
    leaves = (q, k, v, i, f)
    chunk = [None]

    def step():
        mlstm_triton(q, k, v, i, f, gate=args.gate, chunk_size=chunk[0]).backward(dh)

    reference, diffs = None, {}
    for name, variant in variants.items():
        _use(variant, chunk)
        for t in leaves:
            t.grad = None
        try:
            step()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a refused variant is a result
            diffs[name] = f"failed: {type(e).__name__}: {str(e)[:160]}"
            continue
        grads = [t.grad.float().clone() for t in leaves]
        reference = reference or grads
        diffs[name] = max(((a - b).abs().max() / (b.abs().max() + 1e-9)).item() for a, b in zip(grads, reference))
    if isinstance(diffs["shipped"], str):
        raise SystemExit(f"the shipped path itself {diffs['shipped']}")
    times = {name: [] for name in variants if not isinstance(diffs[name], str)}
    for _ in range(ROUNDS):
        for name in times:
            _use(variants[name], chunk)
            times[name].append(cuda_graph_ms(step, leaves))
    _use({}, chunk)

    print(f"{torch.cuda.get_device_name()}: DH {args.dh}, S {args.seq}, B {B}, NH 4, bf16, gate {args.gate}")
    print("| variant | GPU ms, median (rounds) | shipped / variant | max rel grad diff vs shipped |")
    print("|---|---|---|---|")
    base = sorted(times["shipped"])[ROUNDS // 2]
    for name in variants:
        if name not in times:
            print(f"| {name} | - | - | {diffs[name]} |")
            continue
        med = sorted(times[name])[ROUNDS // 2]
        rounds = " ".join(f"{x:.3f}" for x in times[name])
        print(f"| {name} | {med:.3f} ({rounds}) | {base / med:.3f} | {diffs[name]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
