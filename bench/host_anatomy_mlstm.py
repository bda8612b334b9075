"""Where the host time of one eager Triton mLSTM fwd+bwd goes: autograd against the op's own work, with the kernel
launches real and stubbed. A diagnosis script (one CUDA GPU), not a benchmark.

Usage: PYTHONPATH=kernels python bench/host_anatomy_mlstm.py 96:196 192:196 96:1024 [--thread]

Per shape, host microseconds to issue one step without synchronising (median of 9 passes of 30 steps):
- step: mlstm_triton(...).backward(dh), as a model runs it;
- Function: the op's forward and backward inside a minimal autograd.Function (no custom-op layer);
- direct fwd+bwd: the op's forward and backward functions called directly, no autograd;
- trivial / trivial 13 args + saves: autograd.Functions that do no work but allocate the gradients, with the op's
  five tensor inputs, and with all 13 inputs and its saved tensors: the floor autograd sets;
- the same three first rows with every kernel launch stubbed (mlstm_bench_utils.no_launch);
- whether the backward ran on the calling thread (autograd runs CUDA backward on its own device thread).
--thread instead times the op's backward called directly, in a loop on the main thread and on a second thread, real
and stubbed, and a one-op torch call, at DH 96 / S 196: whether launches cost more off the main thread.
"""

from __future__ import annotations

import argparse
import threading

import torch

from mlstm_bench_utils import launches_through, median_issue_us, mlstm_inputs, no_launch
from tfla.triton import direct_launch, function, mlstm_triton


def issue_us(fn, leaves=()) -> float:
    return median_issue_us(fn, leaves, n=30, reps=9)


class Trivial(torch.autograd.Function):
    """The op's five tensor inputs; the backward allocates their gradients and does nothing else."""

    @staticmethod
    def forward(ctx, q, k, v, i, f):
        ctx.save_for_backward(i, f)
        return q.new_empty(q.shape)

    @staticmethod
    def backward(ctx, dh):
        i, f = ctx.saved_tensors
        return dh.new_empty(dh.shape), dh.new_empty(dh.shape), dh.new_empty(dh.shape), torch.empty_like(i), \
            torch.empty_like(f)


class TrivialWithSaves(torch.autograd.Function):
    """Trivial with the op's 13 inputs and its saved tensors (inputs and the output)."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, exp_gate, normalize, chunk_size, eps, return_state):
        h = q.new_empty(q.shape)
        ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, h)
        ctx.cfg = (exp_gate, normalize, chunk_size, eps)
        ctx.set_materialize_grads(False)
        return h

    @staticmethod
    def backward(ctx, dh):
        q, k, v, i, f, *_ = ctx.saved_tensors
        return (dh.new_empty(dh.shape), dh.new_empty(dh.shape), dh.new_empty(dh.shape), torch.empty_like(i),
                torch.empty_like(f)) + (None,) * 8


BACKWARD_THREAD = {}


class OpInFunction(torch.autograd.Function):
    """The op's forward and backward functions (exp gate, one chunk, no states) in a minimal autograd.Function."""

    @staticmethod
    def forward(ctx, q, k, v, i, f):
        args = (q, k, v, i, f, None, None, None, True, True, q.shape[2], 1e-6, False)
        (h, Cst, nst, _, qn), gates, scores = function._fwd_with_gates(*args, function._keeps_scores(True))
        ctx.kept = (args, h, Cst, nst, qn, gates, scores)
        return h

    @staticmethod
    def backward(ctx, dh):
        BACKWARD_THREAD["ident"] = threading.get_ident()
        args, h, Cst, nst, qn, gates, scores = ctx.kept
        grads = function._bwd_any(dh, None, None, None, *args[:8], h, Cst, nst, qn, True, True, args[10], 1e-6,
                                  gates=gates, scores=scores)
        return grads[:5]


def _direct_fns(q, k, v, i, f, dh, S: int):
    """The op's forward and backward called directly (no autograd), on detached inputs."""
    args = (q.detach(), k.detach(), v.detach(), i.detach(), f.detach(), None, None, None, True, True,
            function.default_chunk_size(S, q.shape[-1]), 1e-6, False)
    (h, Cst, nst, _, qn), gates, scores = function._fwd_with_gates(*args, function._keeps_scores(True))

    def bwd():
        function._bwd_any(dh, None, None, None, *args[:8], h, Cst, nst, qn, True, True, args[10], 1e-6, gates=gates,
                          scores=scores)

    def fwd_bwd():
        function._fwd_with_gates(*args, function._keeps_scores(True))
        bwd()

    return fwd_bwd, bwd


def _stubbed(rows):
    """Time (name, fn, leaves) rows with every kernel launch replaced by a no-op."""
    with launches_through(no_launch):
        return {name: issue_us(fn, leaves) for name, fn, leaves in rows}


def anatomy(DH: int, S: int) -> None:
    B, NH = max(1, round(50_000 / S)), 4
    q, k, v, i, f, dh = mlstm_inputs(B, NH, S, DH, requires_grad=True)
    leaves = (q, k, v, i, f)

    def step():
        mlstm_triton(q, k, v, i, f).backward(dh)

    def in_function():
        OpInFunction.apply(q, k, v, i, f).backward(dh)

    def trivial():
        Trivial.apply(q, k, v, i, f).backward(dh)

    def trivial_with_saves():
        TrivialWithSaves.apply(q, k, v, i, f, None, None, None, True, True, S, 1e-6, False).backward(dh)

    direct, _ = _direct_fns(q, k, v, i, f, dh, S)
    rows = [("step", step, leaves), ("Function", in_function, leaves), ("direct fwd+bwd", direct, ()),
            ("trivial", trivial, leaves), ("trivial 13 args + saves", trivial_with_saves, leaves)]
    for _, fn, leaves_ in rows:
        for _ in range(5):
            for x in leaves_:
                x.grad = None
            fn()
    times = {name: issue_us(fn, leaves_) for name, fn, leaves_ in rows}
    times.update({f"{name} stubbed": us for name, us in _stubbed(rows[:3]).items()})
    on_main = BACKWARD_THREAD.get("ident") == threading.get_ident()
    print(f"DH {DH} S {S} direct_launch={direct_launch.DIRECT_LAUNCH}: "
          + "; ".join(f"{name} {us:.0f}" for name, us in times.items())
          + f"; backward on the calling thread: {on_main}", flush=True)


def _on_second_thread(fn) -> float:
    out = {}

    def body():
        torch.cuda.set_device(0)
        out["us"] = issue_us(fn)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    return out["us"]


def thread_experiment(DH: int = 96, S: int = 196) -> None:
    B, NH = max(1, round(50_000 / S)), 4
    q, k, v, i, f, dh = mlstm_inputs(B, NH, S, DH)
    _, bwd = _direct_fns(q, k, v, i, f, dh, S)
    for _ in range(5):
        bwd()
    times = {}
    for rep in range(2):
        times[f"bwd main {rep}"] = issue_us(bwd)
        times[f"bwd thread {rep}"] = _on_second_thread(bwd)
    with launches_through(no_launch):
        times["bwd main stubbed"] = issue_us(bwd)
        times["bwd thread stubbed"] = _on_second_thread(bwd)
    x = torch.zeros(1024, device="cuda")
    times["add_ main"] = issue_us(lambda: x.add_(1))
    times["add_ thread"] = _on_second_thread(lambda: x.add_(1))
    print(f"thread experiment DH {DH} S {S} (host us): " + "; ".join(f"{k_} {v_:.0f}" for k_, v_ in times.items()),
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", default=["96:196"], help="DH:S")
    ap.add_argument("--thread", action="store_true", help="the main-thread / second-thread comparison instead")
    args = ap.parse_args()
    if args.thread:
        thread_experiment()
        return
    for spec in args.shapes:
        anatomy(*map(int, spec.split(":")))


if __name__ == "__main__":
    main()
