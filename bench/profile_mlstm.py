"""Where one Triton mLSTM fwd+bwd spends its time: GPU kernels (torch.profiler), host-side launch cost, and the same
step replayed from a CUDA graph (no host cost at all).

Usage: PYTHONPATH=kernels python bench/profile_mlstm.py 96:196 512:196 192:1024 192:4096 [--gate exp] [--table]
       [--cprofile] [--launch-floor] [--host-split] [--host-timeline] [--launch-ab] [--ab SWITCH]

Per shape it prints: wall ms of one fwd+bwd (do_bench), host ms to issue one step (no synchronisation; if this is
close to the wall time, the step is launch-bound, not GPU-bound), CUDA-graph replay ms (GPU time alone), and with
--table the per-kernel CUDA time table, with --cprofile the host functions that take the time. --launch-floor
first prints the host cost of launching an empty Triton kernel with as many arguments as ours, and of small torch
calls, on this machine: the floor under any Triton op's host time. --host-split splits one fwd+bwd's host time into the
Triton launches and everything else (PyTorch glue, allocations, autograd), with SDPA's host time beside it.
--host-timeline times each Triton launch where it happens inside the step (a launch cost the H200's host about three
times as much there as re-issued in a loop: bench/results/session11/host_timeline_h200.log). --launch-ab compares
the eager wall time with launches through Triton and through tfla's direct_launch, alternating in one process; --ab
does the same for another switch of the op (fold_gates_fwd / fold_gates_bwd: a gate kernel folded into a matrix
kernel or not).
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
import triton
import triton.language as tl
from triton.testing import do_bench

from mlstm_bench_utils import cuda_graph_ms, launches_through, median_issue_us, mlstm_inputs, no_launch
from tfla.triton import launch, mlstm_triton


def _short_name(kernel) -> str:
    return kernel.fn.__name__.replace("mlstm_", "").replace("_kernel", "")


@triton.jit
def _empty_kernel(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17,
                  C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr,
                  C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr, C8: tl.constexpr, C9: tl.constexpr):
    pass


def launch_floor(n: int = 2000) -> None:
    """Host microseconds per call: an empty Triton kernel with 13 tensors, 5 ints and 10 constexprs (fwd_h's
    signature size), and torch.empty / a tiny torch kernel for comparison."""
    x = torch.empty(1024, device="cuda")
    args = [x] * 13 + [196, 196, 1, 196, 0.1]
    consts = dict(C0=96, C1=96, C2=False, C3=True, C4=True, C5=64, C6=64, C7=128, C8=128, C9="tf32")

    def per_call_us(fn) -> float:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        return us

    rows = [
        ("empty Triton kernel, 18 args + 10 constexprs", per_call_us(lambda: _empty_kernel[(4, 1, 1020)](
            *args, **consts, num_warps=4, num_stages=2))),
        ("the same through tfla's direct_launch", per_call_us(lambda: launch.direct_launch(
            _empty_kernel, (4, 1, 1020), *args, **consts, num_warps=4, num_stages=2))),
        ("torch.empty(255*4, 196, 96, bf16)", per_call_us(lambda: torch.empty(1020, 196, 96, device="cuda",
                                                                             dtype=torch.bfloat16))),
        ("x.add_(1) on 1024 floats", per_call_us(lambda: x.add_(1))),
    ]
    print("| host cost of | us per call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    print()


def host_split(DH: int, S: int, gate: str) -> None:
    """One row: host us of fwd+bwd as shipped; the same with every Triton launch replaced by a no-op (what the
    PyTorch side costs); the Triton launches per step and their host cost each (re-issued with the recorded
    arguments); the GPU time (CUDA graph); and SDPA causal's host us for the same fwd+bwd."""
    B, NH = max(1, round(50_000 / S)), 4
    q, k, v, i, f, dh = mlstm_inputs(B, NH, S, DH, requires_grad=True)
    leaves = (q, k, v, i, f)

    def step():
        mlstm_triton(q, k, v, i, f, gate=gate).backward(dh)

    for _ in range(3):
        step()
    shipped = median_issue_us(step, leaves)
    gpu = cuda_graph_ms(step, leaves) * 1e3

    recorded = []
    real_launch = launch.direct_launch

    def record(kernel, grid, *args, **kwargs):
        recorded.append((kernel, grid, args, kwargs))
        return real_launch(kernel, grid, *args, **kwargs)

    with launches_through(record):
        step()
    torch.cuda.synchronize()
    per_launch = []
    for kernel, grid, args, kwargs in recorded:
        per_launch.append(median_issue_us(lambda: real_launch(kernel, grid, *args, **kwargs), (), n=40))

    with launches_through(no_launch):
        stubbed = median_issue_us(step, leaves)

    qs, ks, vs, dhs = (x.detach().clone().requires_grad_(x is not dh) for x in (q, k, v, dh))

    def sdpa_step():
        torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(dhs)

    for _ in range(3):
        sdpa_step()
    sdpa = median_issue_us(sdpa_step, (qs, ks, vs))
    names = ", ".join(f"{_short_name(kernel)} {us:.0f}" for (kernel, _, _, _), us in zip(recorded, per_launch))
    print(f"| {DH} | {S} | {gate} | {shipped:.0f} | {stubbed:.0f} | {len(recorded)} | {sum(per_launch):.0f} "
          f"({names}) | {gpu:.0f} | {sdpa:.0f} |", flush=True)


def host_timeline(DH: int, S: int, gate: str) -> None:
    """Two lines: host us of one eager fwd+bwd (as shipped, and once more with every Triton launch timed where it
    runs), of the forward alone with and without autograd, with the launches stubbed, and SDPA causal's fwd+bwd;
    then each kernel's launch us inside the step."""
    import collections

    B, NH = max(1, round(50_000 / S)), 4
    q, k, v, i, f, dh = mlstm_inputs(B, NH, S, DH, requires_grad=True)
    leaves = (q, k, v, i, f)

    def step():
        mlstm_triton(q, k, v, i, f, gate=gate).backward(dh)

    def fwd_no_grad():
        with torch.no_grad():
            mlstm_triton(q, k, v, i, f, gate=gate)

    for _ in range(5):
        step()
    shipped = median_issue_us(step, leaves, n=30, reps=7)
    fwd_only = median_issue_us(lambda: mlstm_triton(q, k, v, i, f, gate=gate), leaves, n=30, reps=7)
    no_grad = median_issue_us(fwd_no_grad, (), n=30, reps=7)
    real_launch = launch.direct_launch
    spent, n = collections.defaultdict(float), 30

    def timed(kernel, grid, *args, **kwargs):
        t0 = time.perf_counter()
        out = real_launch(kernel, grid, *args, **kwargs)
        spent[_short_name(kernel)] += time.perf_counter() - t0
        return out

    with launches_through(timed):
        in_context = median_issue_us(step, leaves, n=n, reps=1)  # one pass of n steps: `spent` holds n steps' worth
    with launches_through(no_launch):
        stubbed = median_issue_us(step, leaves, n=30, reps=7)
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def sdpa_step():
        torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(dh)

    for _ in range(3):
        sdpa_step()
    sdpa = median_issue_us(sdpa_step, (qs, ks, vs), n=30, reps=7)
    print(f"DH {DH} S {S}: host us fwd+bwd {shipped:.0f} (timed-in-context run {in_context:.0f}); fwd with grad "
          f"{fwd_only:.0f}; fwd no_grad {no_grad:.0f}; launches stubbed {stubbed:.0f}; SDPA fwd+bwd {sdpa:.0f}")
    per_launch = {name: us / n * 1e6 for name, us in spent.items()}
    print("   in-context launch us: " + ", ".join(f"{name} {us:.0f}" for name, us in per_launch.items())
          + f"; sum {sum(per_launch.values()):.0f}", flush=True)


def _ab_switches() -> dict:
    """--ab's switches: name -> (module, attribute or a tuple of them, switched together), each a bool the op reads
    on every call."""
    from tfla.triton import direct_launch, function

    return {"direct_launch": (direct_launch, "DIRECT_LAUNCH"), "fold_gates_fwd": (launch, "FOLD_GATES_FWD"),
            "fold_gates_bwd": (launch, "FOLD_GATES_BWD"), "score_matrix": (launch, "SCORE_MATRIX"),
            "split_scores_bwd": (launch, "SPLIT_SCORES_BWD"),
            "score_matrix_states": (launch, "SCORE_MATRIX_STATES"), "keep_scores": (launch, "KEEP_SCORES"),
            "low_precision_states": (function, "LOW_PRECISION_STATES"),
            "state_terms_from_rows": (launch, "STATE_TERMS_FROM_ROWS"),
            "row_terms_in_state_rows": (launch, "ROW_TERMS_IN_STATE_ROWS"),
            "fold_gates_fwd_chunked": (launch, "FOLD_GATES_FWD_CHUNKED"),
            "fold_gates_bwd_chunked": (launch, "FOLD_GATES_BWD_CHUNKED"),
            "chunked_folds": (launch, ("ROW_TERMS_IN_STATE_ROWS", "FOLD_GATES_FWD_CHUNKED", "FOLD_GATES_BWD_CHUNKED")),
            "chunked_gate_folds": (launch, ("FOLD_GATES_FWD_CHUNKED", "FOLD_GATES_BWD_CHUNKED"))}


def switch_ab(switch: str, DH: int, S: int, gate: str, rounds: int = 5) -> None:
    """One row: eager fwd+bwd wall ms (do_bench median) with a switch of the op off and on (direct_launch: every
    launch through Triton's kernel[grid] vs tfla's direct_launch; fold_gates_fwd / _bwd: launch.FOLD_GATES_FWD /
    _BWD; score_matrix: launch.SCORE_MATRIX forced off / on; score_matrix_states: launch.SCORE_MATRIX_STATES, the
    path chunk by chunk with states; keep_scores: launch.KEEP_SCORES, the forward's weights kept for the backward
    (6 products instead of 7 on the score-matrix path); low_precision_states: function.LOW_PRECISION_STATES, chunk
    states stored in the input dtype; state_terms_from_rows: launch.STATE_TERMS_FROM_ROWS, the gate gradients' A_c
    from the row sums; row_terms_in_state_rows: launch.ROW_TERMS_IN_STATE_ROWS, the backward's row terms from the
    state-rows launch; fold_gates_fwd_chunked / _bwd_chunked: launch.FOLD_GATES_FWD_CHUNKED / _BWD_CHUNKED;
    chunked_folds: those three together; chunked_gate_folds: the two gate folds together, the row terms as shipped),
    alternating `rounds` times in this one process, since this host's speed drifts between processes
    more than the difference (bench/results/session12/host_timeline_direct_ab*_h200.log); then the GPU time of each (a
    CUDA-graph replay)."""
    module, attributes = _ab_switches()[switch]
    attributes = attributes if isinstance(attributes, tuple) else (attributes,)

    def set_switch(on):
        for attribute in attributes:
            setattr(module, attribute, on)

    B, NH = max(1, round(50_000 / S)), 4
    q, k, v, i, f, dh = mlstm_inputs(B, NH, S, DH, requires_grad=True)
    leaves = (q, k, v, i, f)

    def step():
        mlstm_triton(q, k, v, i, f, gate=gate).backward(dh)

    shipped = {attribute: getattr(module, attribute) for attribute in attributes}
    walls = {False: [], True: []}
    graphs = {}
    try:
        for _ in range(rounds):
            for on in (False, True):
                set_switch(on)
                for _ in range(3):
                    step()
                walls[on].append(do_bench(step, warmup=20, rep=200, grad_to_none=leaves, return_mode="median"))
        for on in (False, True):
            set_switch(on)
            graphs[on] = cuda_graph_ms(step, leaves)
    finally:
        for attribute, value in shipped.items():
            setattr(module, attribute, value)
    off_ms, on_ms = (sorted(w)[len(w) // 2] for w in (walls[False], walls[True]))
    spread = " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(walls[False], walls[True]))
    print(f"| {DH} | {S} | {B} | {gate} | {off_ms:.3f} | {on_ms:.3f} | {off_ms / on_ms:.2f} | {graphs[False]:.3f} | "
          f"{graphs[True]:.3f} | {spread} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", default=["96:196"], help="DH:S")
    ap.add_argument("--gate", nargs="*", default=["exp"])
    ap.add_argument("--table", action="store_true", help="print the per-kernel CUDA time table")
    ap.add_argument("--cprofile", action="store_true", help="print where the host's time goes (cProfile, 20 steps)")
    ap.add_argument("--launch-floor", action="store_true", help="first time an empty Triton launch on this machine")
    ap.add_argument("--host-split", action="store_true",
                    help="only the split of the host time: Triton launches vs the rest, per shape (see host_split)")
    ap.add_argument("--host-timeline", action="store_true",
                    help="only the host time per launch inside the step, per shape (see host_timeline)")
    ap.add_argument("--ab", choices=sorted(_ab_switches()),
                    help="only eager fwd+bwd wall ms with this switch off and on, alternating (see switch_ab)")
    ap.add_argument("--launch-ab", action="store_true", help="--ab direct_launch (launches through Triton or not)")
    args = ap.parse_args()

    def per_shape_and_gate(measure) -> None:
        for spec in args.shapes:
            for gate in args.gate:
                measure(*map(int, spec.split(":")), gate)

    switch = "direct_launch" if args.launch_ab else args.ab
    if switch:
        print(f"| DH | S | B | gate | wall ms, {switch} off | wall ms, on | speed-up | GPU ms off | GPU ms on | "
              "each round (off/on) |\n|---|---|---|---|---|---|---|---|---|---|")
        per_shape_and_gate(lambda DH, S, gate: switch_ab(switch, DH, S, gate))
        return
    if args.host_timeline:
        per_shape_and_gate(host_timeline)
        return
    if args.launch_floor:
        launch_floor()
    if args.host_split:
        print("| DH | S | gate | host us fwd+bwd | host us, Triton launches stubbed | Triton launches | their host us "
              "(each) | GPU us (CUDA graph) | SDPA causal host us |\n|---|---|---|---|---|---|---|---|---|")
        per_shape_and_gate(host_split)
        return
    print("| DH | S | B | gate | wall fwd+bwd ms | host issue ms | CUDA-graph replay ms | kernels' CUDA ms |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.shapes:
        DH, S = map(int, spec.split(":"))
        B, NH = max(1, round(50_000 / S)), 4
        q, k, v, i, f, dh = mlstm_inputs(B, NH, S, DH, requires_grad=True)
        leaves = (q, k, v, i, f)
        for gate in args.gate:
            def step():
                h = mlstm_triton(q, k, v, i, f, gate=gate)
                h.backward(dh)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            wall = do_bench(step, warmup=20, rep=200, grad_to_none=leaves, return_mode="median")

            host = median_issue_us(step, leaves) / 1e3

            replay = cuda_graph_ms(step, leaves)

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    # fresh gradients, as do_bench's grad_to_none: accumulating into the last step's would add an
                    # elementwise add per leaf (at DH 384 / S 4096, 3 x 146 us a step: the "vectorized_elementwise"
                    # rows of the tables before session 25)
                    for x in leaves:
                        x.grad = None
                    step()
                torch.cuda.synchronize()
            cuda_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
            print(f"| {DH} | {S} | {B} | {gate} | {wall:.3f} | {host:.3f} | {replay:.3f} | {cuda_ms:.3f} |", flush=True)
            if args.table:
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
            if args.cprofile:
                import cProfile
                import pstats

                torch.cuda.synchronize()
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(20):
                    for x in leaves:
                        x.grad = None
                    step()
                pr.disable()
                torch.cuda.synchronize()
                pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
