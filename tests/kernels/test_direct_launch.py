"""direct_launch: after a variant's first launch through Triton, launches with the same specialisation go straight to
its compiled launcher with the arguments Triton would pass; anything Triton would compile differently goes back
through Triton. Runs without a GPU: a stand-in kernel records both kinds of launch."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch

from tfla.triton import direct_launch as dl


def kernel_fn(x_ptr, out_ptr, n, scale, BLOCK, FLAG=True):  # the stand-in kernel's signature (constexprs last)
    pass


class FakeCompiled:
    def __init__(self, launches):
        self.function, self.packed_metadata = 1234, ("packed",)
        self.run = lambda *a: launches.append(("direct", a))


class FakeJIT:
    """Stands in for a JITFunction: kernel[grid](...) is a launch through Triton, which returns the compiled kernel."""

    def __init__(self):
        self.fn = kernel_fn
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append(("triton", (grid, args, kwargs)))
            return FakeCompiled(self.launches)

        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(dl, "_JITFunction", FakeJIT)
    monkeypatch.setattr(dl, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(dl, "_COMPILED", {})
    monkeypatch.setattr(dl, "_current_device_and_stream", lambda: (0, 77))
    monkeypatch.setattr(dl, "_profiler_hooks_set", lambda: False)
    monkeypatch.setattr(dl, "_GPU_TENSORS_ONLY", False)  # CPU tensors stand for GPU ones
    return FakeJIT()


def kinds(kernel):
    return [kind for kind, _ in kernel.launches]


def test_second_launch_is_direct_with_the_arguments_triton_passes(kernel):
    x, out = torch.zeros(64), torch.zeros(64)
    dl.direct_launch(kernel, (3, 2), x, out, 48, 0.25, BLOCK=32, num_warps=4)
    dl.direct_launch(kernel, (3, 2), x, out, 48, 0.25, BLOCK=32, num_warps=4)
    assert kinds(kernel) == ["triton", "direct"]
    # grid padded to 3 dims, the current stream, the compiled function and metadata, no launch metadata or hooks,
    # then every parameter in order: positional arguments (tensors as addresses), keyword constexprs, defaults (FLAG).
    assert kernel.launches[1][1] == (3, 2, 1, 77, 1234, ("packed",), None, None, None, x.data_ptr(), out.data_ptr(),
                                     48, 0.25, 32, True)


# Ints and floats are keyed by value (finer than Triton): 1, multiples of 16, 64-bit ints and other floats all count.
@pytest.mark.parametrize("change", ["dtype", "alignment", "int_one", "int_multiple_of_16", "int64", "float",
                                    "constexpr", "option", "device"])
def test_what_triton_specialises_on_goes_back_through_triton(kernel, monkeypatch, change):
    x, out = torch.zeros(64), torch.zeros(64)
    args, kwargs = [x, out, 33, 0.5], dict(BLOCK=32, num_warps=4)  # 33: neither 1 nor a multiple of 16
    dl.direct_launch(kernel, (1,), *args, **kwargs)
    if change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "alignment":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "int_one":
        args[2] = 1
    elif change == "int_multiple_of_16":
        args[2] = 32
    elif change == "int64":
        args[2] = 2**32 + 1
    elif change == "float":
        args[3] = 0.25
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        monkeypatch.setattr(dl, "_current_device_and_stream", lambda: (1, 77))
    dl.direct_launch(kernel, (1,), *args, **kwargs)
    assert kinds(kernel) == ["triton", "triton"]
    dl.direct_launch(kernel, (1,), *args, **kwargs)  # and that variant is remembered in turn
    assert kinds(kernel) == ["triton", "triton", "direct"]


def test_unmodelled_arguments_profiler_hooks_and_switch_off_use_triton(kernel, monkeypatch):
    x = torch.zeros(64)
    for _ in range(2):
        dl.direct_launch(kernel, (1,), x, x, 48, [1, 2], BLOCK=32)  # a list: not a type modelled here
    assert kinds(kernel) == ["triton", "triton"]
    monkeypatch.setattr(dl, "_GPU_TENSORS_ONLY", True)  # a CPU tensor: Triton checks its address every time
    for _ in range(2):
        dl.direct_launch(kernel, (1,), x, x, 48, 0.5, BLOCK=32)
    assert kinds(kernel) == ["triton"] * 4
    monkeypatch.setattr(dl, "_GPU_TENSORS_ONLY", False)
    kernel.launches.clear()
    dl.direct_launch(kernel, (1,), x, x, 48, 0.5, BLOCK=32)
    monkeypatch.setattr(dl, "_profiler_hooks_set", lambda: True)  # a profiler must see every launch
    dl.direct_launch(kernel, (1,), x, x, 48, 0.5, BLOCK=32)
    monkeypatch.setattr(dl, "_profiler_hooks_set", lambda: False)
    monkeypatch.setattr(dl, "DIRECT_LAUNCH", False)
    dl.direct_launch(kernel, (1,), x, x, 48, 0.5, BLOCK=32)
    assert kinds(kernel) == ["triton"] * 3


def test_interpreted_kernels_and_failed_launches_are_not_cached(kernel, monkeypatch):
    x = torch.zeros(64)

    class Interpreted(FakeJIT):  # not a JITFunction: Triton's interpreter
        pass

    monkeypatch.setattr(dl, "_JITFunction", type("OtherJIT", (), {}))
    interpreted = Interpreted()
    for _ in range(2):
        dl.direct_launch(interpreted, (1,), x, x, 48, 0.5, BLOCK=32)
    assert kinds(interpreted) == ["triton", "triton"] and dl._COMPILED == {}

    monkeypatch.setattr(dl, "_JITFunction", FakeJIT)

    class Failing(FakeJIT):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise RuntimeError("out of resources")

            return run

    with pytest.raises(RuntimeError, match="out of resources"):
        dl.direct_launch(Failing(), (1,), x, x, 48, 0.5, BLOCK=32)
    assert dl._COMPILED == {}


def test_missing_constexpr_is_left_to_triton(kernel):
    x = torch.zeros(64)
    for _ in range(2):
        dl.direct_launch(kernel, (1,), x, x, 48, 0.5)  # BLOCK not given: Triton raises, here the fake accepts it
    assert kinds(kernel) == ["triton", "triton"]
