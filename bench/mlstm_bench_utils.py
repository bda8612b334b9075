"""What the mLSTM benchmark scripts share: the benchmark's inputs and GPU-only timing from a CUDA graph.
Imported by sibling scripts (`python bench/<script>.py` puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Sequence

import torch
from triton.testing import do_bench


def mlstm_inputs(B: int, NH: int, S: int, DH: int, dtype=torch.bfloat16, seed: int = 0, requires_grad=False):
    """q, k, v [B, NH, S, DH] in `dtype`, gate pre-activations i, f [B, NH, S] in float32 (forget gates around
    sigmoid(3), open as in a trained model) and an output gradient dh, all fresh random numbers (never zeros)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, NH, S, DH, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    i = torch.randn(B, NH, S, device="cuda", generator=g)
    f = torch.randn(B, NH, S, device="cuda", generator=g) + 3.0
    dh = torch.randn(B, NH, S, DH, device="cuda", generator=g, dtype=dtype)
    leaves = [t.requires_grad_(requires_grad) for t in (q, k, v, i, f)]
    return (*leaves, dh)


def cuda_graph_ms(step: Callable[[], object], leaves: Sequence[torch.Tensor] = (), warmup=20, rep=200) -> float:
    """GPU time of `step` replayed from a CUDA graph: no host launch cost, which at small shapes swamps the kernels.
    `leaves`' gradients are cleared before every warm-up run and before the capture, so a backward inside `step`
    writes fresh gradients rather than accumulating."""

    def fresh_step():
        for x in leaves:
            x.grad = None
        step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (allocator, autotuning, lazy init) off the capture stream
        for _ in range(3):
            fresh_step()
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    del graph
    return ms


def median_issue_us(fn: Callable[[], object], leaves: Sequence[torch.Tensor] = (), n: int = 40, reps: int = 5) -> float:
    """Host microseconds to issue fn once, without synchronising: median over reps of n calls, with `leaves`'
    gradients cleared before each. n stays small so that the GPU's launch queue does not fill up and turn this into
    a GPU time."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            for x in leaves:
                x.grad = None
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def no_launch(kernel, grid, *args, **kwargs) -> None:
    """A stand-in for tfla's launch.direct_launch that launches nothing: what the op's host time is without kernels."""


@contextlib.contextmanager
def launches_through(replacement: Callable) -> Iterator[Callable]:
    """Inside the block every kernel launch of the Triton op calls replacement(kernel, grid, *args, **kwargs) instead
    of tfla's launch.direct_launch, which the block yields (to time, record or re-issue launches)."""
    from tfla.triton import launch

    real = launch.direct_launch
    launch.direct_launch = replacement
    try:
        yield real
    finally:
        launch.direct_launch = real
