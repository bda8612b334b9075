"""The public mLSTM op: input checks, then dispatch to a backend.

Backends:
- "parallel"  quadratic pure-PyTorch form (what ViL trains with); fastest on CPU for short sequences.
- "chunkwise" pure PyTorch, O(S * chunk) memory; any chunk size, any S.
- "recurrent" pure PyTorch, one step at a time; the definition, for checking and streaming.
- "triton"    the TFLA Triton kernels (CUDA only).
- "auto"      triton on CUDA when the kernels support the shapes, otherwise parallel for short sequences and
              chunkwise for long ones. CPU and meta tensors always take the reference path.
"""

from __future__ import annotations

from typing import Optional

import torch

from .reference import MLSTMState, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent

GATES = ("exp", "sig")
BACKENDS = ("auto", "parallel", "chunkwise", "recurrent", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Above this length the quadratic form's S x S matrices cost more memory than they save in speed.
PARALLEL_MAX_SEQ_LEN = 1024
DEFAULT_CHUNK_SIZE = 64


def _check_inputs(q, k, v, i, f, gate, normalize, backend, chunk_size, initial_state) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"mlstm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"mlstm: {name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
    if q.dim() != 4:
        raise ValueError(f"mlstm: q must be [B, NH, S, DQK], got shape {tuple(q.shape)}")
    B, NH, S, _ = q.shape
    if k.shape != q.shape:
        raise ValueError(f"mlstm: k must have q's shape {tuple(q.shape)} [B, NH, S, DQK], got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, NH, S):
        raise ValueError(f"mlstm: v must be [B, NH, S, DHV] = [{B}, {NH}, {S}, DHV], got {tuple(v.shape)}")
    for name, t in (("i", i), ("f", f)):
        if tuple(t.shape) != (B, NH, S):
            raise ValueError(
                f"mlstm: {name} (gate pre-activations) must be [B, NH, S] = [{B}, {NH}, {S}], got {tuple(t.shape)}"
            )
    if S < 1 or q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"mlstm: empty sequence or head dim (q {tuple(q.shape)}, v {tuple(v.shape)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"mlstm: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; cast with .to()"
        )
    for name, t in (("k", k), ("v", v), ("i", i), ("f", f)):
        if t.device != q.device:
            raise ValueError(f"mlstm: {name} is on {t.device} but q is on {q.device}; move all inputs to one device")
    if gate not in GATES:
        raise ValueError(f"mlstm: gate must be one of {GATES}, got {gate!r}")
    if backend not in BACKENDS:
        raise ValueError(f"mlstm: backend must be one of {BACKENDS}, got {backend!r}")
    if not normalize and gate == "exp":
        raise ValueError("mlstm: normalize=False is defined only for gate='sig' (the exp gate needs its normaliser)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"mlstm: chunk_size must be a positive int or None, got {chunk_size!r}")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
            raise ValueError("mlstm: initial_state must be a tuple (C, n, m) as returned with return_state=True")
        dqk, dhv = q.shape[-1], v.shape[-1]
        expected = {"C": (B, NH, dqk, dhv), "n": (B, NH, dqk), "m": (B, NH)}
        for (name, shape), t in zip(expected.items(), initial_state):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"mlstm: initial_state.{name} must have shape {shape}, got {got}")
            if t.device != q.device:
                raise ValueError(f"mlstm: initial_state.{name} is on {t.device}, q on {q.device}")


def _triton_backend():
    """The Triton subpackage, or None where triton is not importable (then everything runs on the reference)."""
    try:
        from . import triton as tfla_triton
    except ImportError:
        return None
    return tfla_triton


def _triton_supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton backend can run these inputs: CUDA, fp16/bf16/fp32, head dims 16..512, triton present."""
    if not q.is_cuda:
        return False
    backend = _triton_backend()
    return backend is not None and backend.supports(q, v)


def _resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    if backend != "auto":
        return backend
    if _triton_supports(q, v):
        return "triton"
    return "parallel" if q.shape[-2] <= PARALLEL_MAX_SEQ_LEN else "chunkwise"


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    gate: str = "exp",
    normalize: bool = True,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    initial_state: Optional[MLSTMState] = None,
    return_state: bool = False,
    eps: float = 1e-6,
):
    """Matrix LSTM over a sequence.

    Args:
        q, k: [B, NH, S, DQK] queries and keys (q is scaled by 1/sqrt(DQK) inside).
        v: [B, NH, S, DHV] values.
        i, f: [B, NH, S] input- and forget-gate pre-activations.
        gate: "exp" (exponential input gate, max-state stabilised; ViL) or "sig" (sigmoid input gate).
        normalize: divide by max(|q.n|, lower bound) + eps. Only gate="sig" may turn it off.
        backend: "auto", "parallel", "chunkwise", "recurrent" or "triton".
        chunk_size: chunk length of the chunkwise forms; None picks one.
        initial_state: (C [B, NH, DQK, DHV], n [B, NH, DQK], m [B, NH]) to continue from; None starts from
            C = 0, n = 0, m = -inf.
        return_state: also return the final state (fp32, or fp64 for fp64 inputs).

    Returns:
        h [B, NH, S, DHV] in v's dtype, or (h, MLSTMState) with return_state=True.
    """
    _check_inputs(q, k, v, i, f, gate, normalize, backend, chunk_size, initial_state)
    if initial_state is not None:
        initial_state = MLSTMState(*initial_state)
    common = dict(gate=gate, normalize=normalize, eps=eps, initial_state=initial_state, return_state=return_state)
    resolved = _resolve_backend(backend, q, v)
    if resolved == "parallel":
        return mlstm_parallel(q, k, v, i, f, **common)
    if resolved == "chunkwise":
        return mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE, **common)
    if resolved == "recurrent":
        return mlstm_recurrent(q, k, v, i, f, **common)
    tfla_triton = _triton_backend()
    if tfla_triton is None:
        raise ValueError("mlstm: backend='triton' needs the triton package; install it or use backend='auto'")
    if not tfla_triton.supports(q, v):
        raise ValueError(
            f"mlstm: backend='triton' takes float16/bfloat16/float32 and head dims {tfla_triton.MIN_HEAD_DIM}.."
            f"{tfla_triton.MAX_HEAD_DIM}, got {q.dtype}, DQK={q.shape[-1]}, DHV={v.shape[-1]}; use backend='auto'"
        )
    # Off CUDA the kernels run only under TRITON_INTERPRET=1 (the CPU tests); 'auto' never picks them there.
    return tfla_triton.mlstm_triton(q, k, v, i, f, chunk_size=chunk_size, **common)
