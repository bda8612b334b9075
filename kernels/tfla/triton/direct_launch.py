"""Kernel launches without the per-call work of Triton's JITFunction.run: `direct_launch(kernel, grid, *args,
**kwargs)` does what `kernel[grid](*args, **kwargs)` does.

Why: the mLSTM op is host-bound at ViL's shapes (one fwd+bwd at DH 96 / S 196 issues in about 1.06 ms on the H200
machine against 0.39 ms of GPU time, bench/results/session11/host_timeline_h200.log). JITFunction.run spends most of
a launch before the launcher runs: it binds every argument into a dict, specialises each one, builds its cache key
(with a str() of the launch options), reads knobs, checks the kernel's globals and builds launch metadata for the
profiler hooks. Inside a step each of our launches cost 35-160 us of host time there; the five launches of a fwd+bwd
took 338-528 us through Triton and 230-351 us through direct_launch, at DH 96 / S 196, DH 192 / S 196 and DH 96 /
S 1024 (bench/results/session12/host_timeline_direct_ab*_h200.log, two runs each).

How: the first launch of a variant goes through Triton (it compiles, raises OutOfResources, warns as usual) and its
compiled kernel is kept under a key that covers everything Triton specialises a compiled kernel on: the constexprs and
launch options (the keyword arguments), a tensor's dtype and 16-byte alignment, any other argument's value, and the
current device (_key_and_values). Later launches with the same key call that kernel's launcher directly on the
current stream, with tensors passed as their addresses.

The fallback, kernel[grid], serves every launch that cannot take the direct path: Triton's interpreter (its launches
return no compiled kernel), profiler launch hooks (knobs.runtime.launch_enter_hook; the direct path would skip them),
arguments of other types, and DIRECT_LAUNCH = False (TFLA_DIRECT_LAUNCH=0 in the environment).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, NamedTuple, Sequence

import torch
import triton

try:
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:
    _knobs = _HookChain = _JITFunction = None


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


# The launcher's call form used below (CompiledKernel.run(gx, gy, gz, stream, function, packed metadata, launch
# metadata, enter hook, exit hook, *every parameter)), int addresses for pointers and the launch hooks as HookChains in
# knobs were read in the sources of Triton 3.6 (the H200 machine's) and 3.8; other versions launch through Triton.
_LAUNCHER_READ = _knobs is not None and (3, 6) <= _triton_version() <= (3, 8)
DIRECT_LAUNCH: bool = os.environ.get("TFLA_DIRECT_LAUNCH", "1") != "0" and _LAUNCHER_READ


class _Uncacheable(Exception):
    """An argument whose specialisation this module does not model: the launch goes through Triton."""


_Tensor = torch.Tensor
# Tests set this False to stand CPU tensors in for GPU ones. A flag, not a function: a call per tensor and launch
# cost about 3 of the key's 9 us on this project's CPU.
_GPU_TENSORS_ONLY = True


def _key_and_values(args: tuple) -> tuple[tuple, list]:
    """The cache key of the positional arguments, and the values the launcher gets for them.

    Key: per tensor its dtype and whether its address is 16-byte aligned (what Triton specialises a pointer on); any
    other argument by its value. Values are finer than Triton's specialisation of ints (1, multiples of 16, 32 or 64
    bits), bools and floats (all fp32), so a new value takes one launch through Triton, which finds its compiled kernel
    in its own cache, and is then remembered here as well; and the key needs no rules of Triton's that could change
    between versions. It is built on every launch: about 6 us for 21 arguments on this project's CPU.
    Values: a tensor goes to the launcher as its address. Triton's launchers take an int as the pointer itself, where
    for a tensor they call data_ptr() and ask the driver about the pointer (cuPointerGetAttribute), per tensor and
    launch. Only GPU tensors take this path; the first launch through Triton has checked the key's pointers."""
    keys, values = [], []
    for arg in args:
        if isinstance(arg, _Tensor):
            if _GPU_TENSORS_ONLY and not arg.is_cuda:
                raise _Uncacheable("a tensor not on the GPU")
            ptr = arg.data_ptr()
            keys.append((arg.dtype, not ptr & 15))
            values.append(ptr)
        elif arg is None or isinstance(arg, (int, float)):  # bool is an int
            keys.append(arg)
            values.append(arg)
        else:
            raise _Uncacheable(type(arg).__name__)
    return tuple(keys), values


class _Compiled(NamedTuple):
    """What a direct launch of one compiled variant needs."""

    launcher: Callable  # CompiledKernel.run: (gx, gy, gz, stream, function, packed metadata, metadata, hooks, *args)
    function: int  # the loaded CUfunction
    packed_metadata: Any
    tail: tuple  # the values of the parameters after the positional arguments (constexprs), in signature order


# (kernel, keyword items, argument keys, device) -> _Compiled. Variants per process: a few per kernel and shape family.
_COMPILED: dict[tuple, _Compiled] = {}


def _current_device_and_stream() -> tuple[int, int]:
    """The device and raw stream Triton itself would launch on (triton.backends.driver: torch's current ones). The
    first launch went through Triton, which initialised CUDA: torch.cuda.current_device's lazy-init check is skipped."""
    device = torch._C._cuda_getDevice()
    return device, torch._C._cuda_getCurrentRawStream(device)


def _profiler_hooks_set() -> bool:
    hooks = _knobs.runtime.launch_enter_hook
    # A HookChain is empty unless a profiler (e.g. proton) added a hook; anything else set counts as a hook.
    return hooks is not None and (not isinstance(hooks, _HookChain) or bool(hooks.calls))


def _tail_values(kernel, n_positional: int, kwargs: dict) -> tuple:
    """The launcher takes every parameter in signature order, constexprs included (it skips them): the keyword
    values, or the parameter's default."""
    params = list(inspect.signature(kernel.fn).parameters.values())[n_positional:]
    values = []
    for param in params:
        if param.name in kwargs:
            values.append(kwargs[param.name])
        elif param.default is not inspect.Parameter.empty:
            values.append(param.default)
        else:
            raise _Uncacheable(f"parameter {param.name} not given")
    return tuple(values)


def direct_launch(kernel, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
    """kernel[grid](*args, **kwargs), directly through the compiled kernel's launcher after the first launch of a
    variant (see the module's docstring). grid: 1 to 3 program counts."""
    # Under TRITON_INTERPRET=1 kernels are InterpretedFunctions (no compiled kernel, no CUDA device to ask for).
    if not DIRECT_LAUNCH or not isinstance(kernel, _JITFunction):
        kernel[grid](*args, **kwargs)
        return
    try:
        device, stream = _current_device_and_stream()
        keys, values = _key_and_values(args)
        key = (kernel, tuple(kwargs.items()), keys, device)
        compiled = _COMPILED.get(key)
    except (_Uncacheable, TypeError):  # an argument type not modelled here, an unhashable keyword value
        compiled = key = None
    if compiled is None or _profiler_hooks_set():  # a profiler's hooks must see every launch: Triton calls them
        result = kernel[grid](*args, **kwargs)
        if compiled is None and key is not None and _is_compiled_kernel(result):
            try:
                _COMPILED[key] = _Compiled(result.run, result.function, result.packed_metadata,
                                           _tail_values(kernel, len(args), kwargs))
            except _Uncacheable:
                pass
        return
    gx = grid[0]
    gy = grid[1] if len(grid) > 1 else 1
    gz = grid[2] if len(grid) > 2 else 1
    compiled.launcher(gx, gy, gz, stream, compiled.function, compiled.packed_metadata, None, None, None, *values,
                      *compiled.tail)


def _is_compiled_kernel(result: Any) -> bool:
    # A CompiledKernel after its first launch has its launcher loaded; the interpreter and test doubles return None.
    return result is not None and getattr(result, "function", None) is not None and hasattr(result, "packed_metadata")
