"""Model throughput: ViL against timm's ViT/DeiT of the same size, measured in one process.

Usage:
    python bench/bench_models.py --device cuda --pairs tiny,small,base --batch 256 --img-size 224
    python bench/bench_models.py --device cpu --pairs tiny,base --batch 8 --steps 3     # CPU, fp32
    python bench/bench_models.py --device cuda --compile --out bench/results/models_h100.md

For each pair (vil_X, vit_X_patch16_224) it reports a full training step (forward, backward, fused AdamW) in
images/s, forward+backward time per batch, inference images/s, and peak memory in training (CUDA), then the ratio
ViL / ViT. CUDA runs use bf16 autocast as the paper's recipe does; CPU runs use fp32.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import timm
import torch

import vil  # noqa: F401  (registers the ViL models in timm)
from vil.layers import linear

PEERS = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224", "base": "vit_base_patch16_224"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=args.img_size, num_classes=1000).to(device)
    if args.compile or args.compile_mode:
        model = torch.compile(model, mode=args.compile_mode)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    use_amp = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def fwd_bwd_into_grads(cast_cache: bool = True):
        # Leaves the grads in place: a captured graph accumulates into the .grad buffers its warm-up made, and must
        # not keep autocast's cast cache (cast_cache=False).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=cast_cache):
            loss = model(x).float().mean()
        loss.backward()

    def fwd_bwd():
        fwd_bwd_into_grads()
        model.zero_grad(set_to_none=True)

    def graph_replay_s() -> float:
        """GPU time of one fwd+bwd replayed from a CUDA graph: the step without any host launch cost."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fwd_bwd_into_grads(cast_cache=False)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fwd_bwd_into_grads(cast_cache=False)
        seconds = time_it(graph.replay, device, args.warmup, args.steps)
        del graph
        model.zero_grad(set_to_none=True)
        return seconds

    @torch.no_grad()
    def infer():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            model(x)

    row = {"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row["train_s"] = time_it(train_step, device, args.warmup, args.steps)
        if device.type == "cuda":
            row["train_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["fwd_bwd_s"] = time_it(fwd_bwd, device, args.warmup, args.steps)
        row["infer_s"] = time_it(infer, device, args.warmup, args.steps)
        if args.cuda_graph and device.type == "cuda":
            row["graph_fwd_bwd_s"] = graph_replay_s()
        row["train_img_s"] = args.batch / row["train_s"]
        row["infer_img_s"] = args.batch / row["infer_s"]
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    model = optimizer = None  # the closures above share these cells: this frees the model before the next one
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", default="tiny,small,base", help="comma list of tiny/small/base")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode (implies --compile). reduce-overhead replays each step from CUDA "
                             "graphs: no host launch cost, which bounds ViL's eager step (README, Measured speed)")
    parser.add_argument("--qkv-impl", choices=linear.BLOCK_DIAGONAL_IMPLS, default=linear.BLOCK_DIAGONAL_IMPL,
                        help="how ViL's block-diagonal q/k/v maps are computed (vil.layers.linear)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time fwd+bwd replayed from a CUDA graph (eager kernels, no host launch cost)")
    parser.add_argument("--out", default=None, help="write a markdown table (and a .json beside it) here")
    args = parser.parse_args()
    linear.BLOCK_DIAGONAL_IMPL = args.qkv_impl
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())

    rows = []
    for pair in args.pairs.split(","):
        for name in (f"vil_{pair}", PEERS[pair]):
            row = measure(name, args, device)
            rows.append(row)
            print(json.dumps(row), flush=True)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"device: {gpu}; torch {torch.__version__}; timm {timm.__version__}; batch {args.batch}; "
        f"{args.img_size}px; {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; "
        f"compile={args.compile_mode or args.compile}; qkv maps: {args.qkv_impl}; "
        f"{torch.get_num_threads()} CPU threads\n"
    )
    graphed = any("graph_fwd_bwd_s" in row for row in rows)
    lines = [
        header,
        "| model | params (M) | train img/s | fwd+bwd ms | infer img/s | train peak GiB | ViL/ViT train time | "
        "ViL/ViT fwd+bwd time | ViL/ViT infer time |" + (" fwd+bwd ms, CUDA graph | ViL/ViT, CUDA graph |" if graphed
                                                          else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if graphed else ""),
    ]
    for vil_row, vit_row in zip(rows[0::2], rows[1::2]):
        for row in (vil_row, vit_row):
            if "error" in row:
                lines.append(f"| {row['model']} | {row['params_m']:.2f} | {row['error']} | | | | | | |")
                continue
            ratios = ["", "", ""]
            if row is vil_row and "error" not in vit_row:
                ratios = [
                    f"{row[key] / vit_row[key]:.2f}x" for key in ("train_s", "fwd_bwd_s", "infer_s")
                ]
            if graphed:
                ratios.append(f"{row['graph_fwd_bwd_s'] * 1e3:.1f}" if "graph_fwd_bwd_s" in row else "-")
                both = row is vil_row and "graph_fwd_bwd_s" in row and "graph_fwd_bwd_s" in vit_row
                ratios.append(f"{row['graph_fwd_bwd_s'] / vit_row['graph_fwd_bwd_s']:.2f}x" if both else "")
            peak = f"{row['train_peak_gib']:.1f}" if "train_peak_gib" in row else "-"
            lines.append(
                f"| {row['model']} | {row['params_m']:.2f} | {row['train_img_s']:.1f} | {row['fwd_bwd_s'] * 1e3:.1f} | "
                f"{row['infer_img_s']:.1f} | {peak} | {' | '.join(ratios)} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(f"Command: python {' '.join(__import__('sys').argv)}\n\n{table}\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as fh:
            json.dump({"header": header, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
