"""mLSTM kernel benchmark: our Triton TFLA against SDPA causal, the PyTorch parallel mLSTM and mlstm_kernels' TFLA.

Usage (CUDA machine, repo root):
    PYTHONPATH=kernels python bench/bench_mlstm.py --out bench/results/mlstm_h100.md
    PYTHONPATH=kernels python bench/bench_mlstm.py --dh 192 --seq 1024 --no-torch     # one shape, no slow peer
    PYTHONPATH=kernels python bench/bench_mlstm.py --seq 196 --graph   # plus GPU time alone (CUDA-graph replay)
    PYTHONPATH=kernels python bench/bench_mlstm.py --seq 196 --graph --graph-peers  # and mlstm_kernels' GPU time
    PYTHONPATH=kernels python bench/bench_mlstm.py --unfused --no-torch --dh 96 192 512 --seq 196 1024

The ours_* rows run the op as shipped: the fused kernels (gate bookkeeping and dk+dv in Triton) everywhere.
--unfused adds rows ours_exp_unfused / ours_sig_unfused with the PyTorch gate bookkeeping
(tfla.triton.function.FUSED_KERNELS = False), same inputs, same process, and prints a shipped-vs-unfused table
(speedup = unfused time / shipped time).

Shapes: DH in {96, 192, 384, 512} x S in {196, 1024, 4096}, NH = 4, B = round(50k / S) (B*S ~ 50k tokens),
bf16 inputs, fresh random data (never zeros). Each implementation runs in the same process on the same inputs;
times are medians of triton.testing.do_bench (CUDA events). Reported: forward and forward+backward ms, peak memory
of forward+backward, achieved bandwidth against the memory floor (fwd: read q, k, v and write h; fwd+bwd: 12 such
tensors) and the ratios to each peer. mlstm_kernels is measured when installed; otherwise its row uses the anchor
numbers of shared/spec/mlstm-kernels.md (H100, torch 2.11, Triton 3.6, sigmoid-gate TFLA) and says so. It is pure
Python: on a machine without internet, `pip download --no-deps mlstm_kernels` elsewhere and install the wheel with
`pip install --no-deps --target DIR`, DIR on PYTHONPATH (it also imports einops).
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from mlstm_bench_utils import cuda_graph_ms, mlstm_inputs
from tfla import mlstm_parallel
from tfla.triton import function, mlstm_triton

# (DH, S) -> (fwd ms, fwd+bwd ms) of mlstm_kernels' sigmoid-gate TFLA, from shared/spec/mlstm-kernels.md.
TFLA_SIG_ANCHOR = {
    (96, 196): (0.614, 2.422), (96, 1024): (0.398, 2.200), (192, 196): (1.033, 3.668), (192, 1024): (0.777, 2.749),
    (192, 4096): (0.784, 2.777), (384, 196): (3.133, 10.69), (384, 1024): (2.341, 7.964), (512, 196): (5.176, 17.25),
    (512, 1024): (3.939, 13.06), (512, 4096): (3.838, 12.84),
}
COPY_BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy measured on this H100 (read + write)


def mlstm_kernels_peers() -> dict:
    """mlstm_kernels' TFLA kernels (the xl_chunk kernels, chunk 128) when the package is installed: {} otherwise.
    They need S to be a multiple of their chunk size, so inputs are zero-padded at the end (rows past S do not reach
    earlier rows in a causal op) and h is cut back; the padding copies are part of their time, as in the spec's
    anchors. Inputs stay bf16 (autocast_kernel_dtype = the input dtype), like ours."""
    try:
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk_siging import mlstm_siging_chunkwise__xl_chunk
    except Exception:  # not installed, or it does not import on this Triton: the anchors stand in
        return {}

    def padded(kernel):
        def run(q, k, v, i, f):
            S = q.shape[2]
            pad = -S % 128
            if pad:
                q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
                i, f = (F.pad(t, (0, pad)) for t in (i, f))
            h = kernel(q, k, v, i, f, chunk_size=128, autocast_kernel_dtype=q.dtype)
            return h[:, :, :S]

        return run

    return {"tfla_sig": padded(mlstm_siging_chunkwise__xl_chunk), "tfla_exp": padded(mlstm_chunkwise__xl_chunk)}


SHIPPED_FUSED = function.FUSED_KERNELS  # the default path, whatever the benchmark switches later


def ours(gate: str, fused: bool = SHIPPED_FUSED):
    """Our op on the fused (True) or unfused (False) path, as shipped by default; the flag stays set through the
    backward of the step."""

    def fn(q, k, v, i, f):
        function.FUSED_KERNELS = fused
        return mlstm_triton(q, k, v, i, f, gate=gate)

    return fn


def timed(fn, args, grad_args, backward: bool):
    if backward:
        dh = None

        def step():
            nonlocal dh
            out = fn(*args)
            if dh is None:
                dh = torch.randn_like(out)
            out.backward(dh)
    else:
        def step():
            with torch.no_grad():
                fn(*args)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = do_bench(step, warmup=50, rep=300, grad_to_none=grad_args if backward else None, return_mode="median")
    return ms, peak


def graph_ms(fn, args) -> float:
    """GPU time alone of one fwd+bwd (see mlstm_bench_utils.cuda_graph_ms): what a model compiled with CUDA graphs
    pays. At small shapes the host, not the GPU, sets do_bench's wall time."""
    leaves = [t.detach().requires_grad_() for t in args]
    dh = torch.randn_like(fn(*leaves))
    return cuda_graph_ms(lambda: fn(*leaves).backward(dh), leaves)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dh", type=int, nargs="*", default=[96, 192, 384, 512])
    ap.add_argument("--seq", type=int, nargs="*", default=[196, 1024, 4096])
    ap.add_argument("--nh", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--no-torch", action="store_true", help="skip the (slow) PyTorch parallel mLSTM peer")
    ap.add_argument("--unfused", action="store_true", help="also time the unfused path (shipped vs unfused)")
    ap.add_argument("--out", default=None, help="markdown table path; a .png plot and .json are written beside it")
    ap.add_argument("--graph", action="store_true",
                    help="also GPU time alone (CUDA-graph replay, fwd+bwd) of ours (exp) and SDPA causal")
    ap.add_argument("--graph-peers", action="store_true",
                    help="with --graph, mlstm_kernels' TFLA kernels too (when installed): a GPU-time ratio to them. "
                         "Opt-in: a peer that fails inside a graph capture may leave the process unusable")
    args = ap.parse_args()

    ext = mlstm_kernels_peers()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), mlstm_kernels="installed" if ext else "not installed",
                peer_errors={})
    print(json.dumps(meta), flush=True)
    results = []
    for S in args.seq:
        for DH in args.dh:
            B = max(1, round(args.tokens / S))
            NH = args.nh
            q, k, v, i, f, _ = mlstm_inputs(B, NH, S, DH)
            row = dict(DH=DH, S=S, B=B)
            impls = {
                "ours_exp": (ours("exp"), (q, k, v, i, f)),
                "ours_sig": (ours("sig"), (q, k, v, i, f)),
                "sdpa_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v)),
            }
            if args.unfused:
                impls["ours_exp_unfused"] = (ours("exp", False), (q, k, v, i, f))
                impls["ours_sig_unfused"] = (ours("sig", False), (q, k, v, i, f))
            if not args.no_torch:
                impls["torch_parallel"] = (lambda q, k, v, i, f: mlstm_parallel(q, k, v, i, f, gate="exp"),
                                           (q, k, v, i, f))
            for name, fn in ext.items():
                impls[name] = (fn, (q, k, v, i, f))
            for name, (fn, a) in impls.items():
                grads = [t.detach().requires_grad_() for t in a]
                try:
                    fwd, _ = timed(fn, [t.detach() for t in a], None, backward=False)
                    fb, peak = timed(fn, grads, grads, backward=True)
                except torch.OutOfMemoryError:
                    fwd = fb = peak = float("nan")
                    torch.cuda.empty_cache()
                except Exception as err:  # a peer's kernel that does not compile here is a result: report it
                    if name.startswith("ours"):
                        raise
                    fwd = fb = peak = float("nan")
                    meta["peer_errors"][f"{name} DH={DH} S={S}"] = f"{type(err).__name__}: {str(err)[:200]}"
                    print(f"{name} failed at DH={DH} S={S}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                    torch.cuda.empty_cache()
                row[name] = (fwd, fb, peak)
                del grads
                torch.cuda.empty_cache()
            if args.graph:
                row["graph_fb_ms"] = {name: graph_ms(*impls[name]) for name in ("ours_exp", "sdpa_causal")}
                for name in ext if args.graph_peers else ():  # one that cannot be captured is reported
                    try:
                        row["graph_fb_ms"][name] = graph_ms(*impls[name])
                    except Exception as err:
                        row["graph_fb_ms"][name] = float("nan")
                        why = f"{type(err).__name__}: {str(err)[:200]}"
                        meta["peer_errors"][f"{name} CUDA graph DH={DH} S={S}"] = why
                    torch.cuda.empty_cache()
            if not ext and (DH, S) in TFLA_SIG_ANCHOR:
                row["tfla_sig"] = (*TFLA_SIG_ANCHOR[(DH, S)], float("nan"))
            elem = B * NH * S * DH * 2
            row["floor_fwd_ms"] = 4 * elem / COPY_BANDWIDTH * 1e3
            row["floor_fb_ms"] = 12 * elem / COPY_BANDWIDTH * 1e3
            results.append(row)
            o = row["ours_exp"]
            line = f"DH={DH:3d} S={S:5d} B={B:3d} | ours exp {o[0]:.3f}/{o[1]:.3f} ms {o[2]:.2f} GiB"
            peers = ("ours_exp_unfused", "ours_sig", "ours_sig_unfused", "sdpa_causal", "torch_parallel", "tfla_sig",
                     "tfla_exp")
            for peer in peers:
                if peer in row:
                    p = row[peer]
                    line += f" | {peer} {p[0]:.3f}/{p[1]:.3f} (x{p[1] / o[1]:.2f})"
            if "graph_fb_ms" in row:
                g = row["graph_fb_ms"]
                line += f" | GPU time ours {g['ours_exp']:.3f}, SDPA {g['sdpa_causal']:.3f}"
                line += "".join(f", {name} {g[name]:.3f}" for name in ("tfla_sig", "tfla_exp") if name in g)
            print(line, flush=True)
            del q, k, v, i, f
            torch.cuda.empty_cache()
            if args.out:  # after every shape: a run cut short by a time limit still leaves its table
                write_outputs(args, results, meta, with_plot=False)

    function.FUSED_KERNELS = SHIPPED_FUSED
    print(write_outputs(args, results, meta, with_plot=bool(args.out)))


def write_outputs(args, results, meta, with_plot: bool) -> str:
    """The markdown table of results so far; with --out, also written there with a .json (and a .png plot) beside."""
    table = render(results, meta)
    if args.graph:
        table += "\n" + render_graph(results)
    if args.unfused:
        table += "\n" + render_unfused(results)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table)
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as fh:
            json.dump(dict(meta=meta, results=results), fh, indent=1)
        if with_plot:
            plot(results, args.out.rsplit(".", 1)[0] + ".png", meta)
    return table


def render_graph(results) -> str:
    lines = [
        "GPU time alone, fwd+bwd from a CUDA-graph replay (no host launch cost; ours = exp gate). mlstm_kernels' TFLA "
        "kernels appear when installed (n/a: not installed or not capturable); the TFLA anchors are wall times and "
        "are not comparable with this table.",
        "",
        "| DH | S | B | ours exp ms | SDPA causal ms | x SDPA (GPU time) | TFLA sig ms | x TFLA sig (GPU time) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        g = r["graph_fb_ms"]
        sig = g.get("tfla_sig", float("nan"))
        sig_cells = "n/a | n/a" if math.isnan(sig) else f"{sig:.3f} | {sig / g['ours_exp']:.2f}"
        lines.append(f"| {r['DH']} | {r['S']} | {r['B']} | {g['ours_exp']:.3f} | {g['sdpa_causal']:.3f} | "
                     f"{g['sdpa_causal'] / g['ours_exp']:.2f} | {sig_cells} |")
    return "\n".join(lines) + "\n"


def render(results, meta) -> str:
    tfla_note = "measured" if meta["mlstm_kernels"] == "installed" else "not installed: spec anchor numbers (H100)"
    lines = [
        f"GPU {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}; bf16, NH=4, B*S~50k tokens; median ms "
        f"(do_bench). mlstm_kernels TFLA sig: {tfla_note}; with mlstm_kernels installed, S is zero-padded to a "
        "multiple of its chunk (128) for its kernels.",
        "Ratios are peer time / our time (fwd+bwd, ours = exp gate, the ViL gate); > 1 means ours is faster.",
        "",
        "| DH | S | B | ours exp fwd / fwd+bwd | ours sig fwd / fwd+bwd | peak GiB | BW fwd / fwd+bwd (% of 3.0 TB/s) "
        "| SDPA causal fwd / fwd+bwd | x SDPA | torch parallel fwd / fwd+bwd | x torch | TFLA sig fwd / fwd+bwd "
        "| x TFLA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pair(p):
        return f"{p[0]:.3f} / {p[1]:.3f}" if p else "n/a"

    for r in results:
        o = r["ours_exp"]
        bw_f = 100 * r["floor_fwd_ms"] / o[0]
        bw_fb = 100 * r["floor_fb_ms"] / o[1]
        ratio = {p: (f"{r[p][1] / o[1]:.2f}" if p in r and not math.isnan(r[p][1]) else "n/a")
                 for p in ("sdpa_causal", "torch_parallel", "tfla_sig")}
        lines.append(
            f"| {r['DH']} | {r['S']} | {r['B']} | {pair(o)} | {pair(r.get('ours_sig'))} | {o[2]:.2f} | "
            f"{bw_f:.0f}% / {bw_fb:.0f}% | {pair(r.get('sdpa_causal'))} | {ratio['sdpa_causal']} | "
            f"{pair(r.get('torch_parallel'))} | {ratio['torch_parallel']} | {pair(r.get('tfla_sig'))} | "
            f"{ratio['tfla_sig']} |"
        )
    def exp_cell(r):
        t = r["tfla_exp"][1]
        return "failed" if math.isnan(t) else f"{t:.3f} ({t / r['ours_exp'][1]:.2f}x)"

    exp_rows = [r for r in results if "tfla_exp" in r]
    if exp_rows:  # the exponential-gate TFLA kernel: the spec reports that it does not compile on Triton 3.6
        lines += ["", "mlstm_kernels TFLA exp (the gate ViL uses), fwd+bwd ms (x TFLA exp): "
                  + "; ".join(f"DH={r['DH']} S={r['S']}: {exp_cell(r)}" for r in exp_rows)]
    for name, err in meta.get("peer_errors", {}).items():
        lines.append(f"- {name} failed: {err}")
    return "\n".join(lines) + "\n"


def render_unfused(results) -> str:
    lines = [
        "Shipped (fused: gate bookkeeping + dk/dv in Triton) vs the unfused path; speedup = unfused / shipped.",
        "",
        ("| DH | S | B | exp unfused fwd / fwd+bwd | exp shipped fwd / fwd+bwd | speedup fwd / fwd+bwd "
         "| sig unfused fwd / fwd+bwd | sig shipped fwd / fwd+bwd | speedup fwd / fwd+bwd |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = []
        for gate in ("exp", "sig"):
            f, d = r[f"ours_{gate}"], r[f"ours_{gate}_unfused"]
            cells += [f"{d[0]:.3f} / {d[1]:.3f}", f"{f[0]:.3f} / {f[1]:.3f}",
                      f"{d[0] / f[0]:.2f}x / {d[1] / f[1]:.2f}x"]
        lines.append(f"| {r['DH']} | {r['S']} | {r['B']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['DH']}/{r['S']}" for r in results]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.16
    for n, (key, name) in enumerate([("ours_exp", "ours (exp)"), ("ours_sig", "ours (sig)"),
                                     ("sdpa_causal", "SDPA causal"), ("torch_parallel", "torch parallel"),
                                     ("tfla_sig", "mlstm_kernels TFLA sig")]):
        vals = [r[key][1] if key in r else float("nan") for r in results]
        ax.bar([p + (n - 2) * width for p in x], vals, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels)
    ax.set_xlabel("DH / S")
    ax.set_ylabel("fwd+bwd ms (median, log)")
    ax.set_title(f"mLSTM fwd+bwd, bf16, NH=4, B*S~50k, {meta['gpu']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
