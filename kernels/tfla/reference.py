"""Pure-PyTorch mLSTM: the parallel, chunkwise and recurrent forms.

These are the ground truth that the Triton kernels are tested against. They run on any device (CPU, CUDA, meta),
in any float dtype, and their gradients come from autograd through every step, including the max-state stabiliser
and the normaliser's lower bound: exact for any downstream loss (checked with float64 gradcheck in the tests).

Conventions shared by all three forms (see ../../shared/spec/mlstm-kernels.md):
- q, k: [B, NH, S, DQK]; v: [B, NH, S, DHV]; i, f: [B, NH, S] gate pre-activations.
- q is scaled by 1/sqrt(DQK) here; k enters the state unscaled.
- gate="exp": log input gate = i, stabilised by the max state m.
- gate="sig": log input gate = logsigmoid(i), no stabiliser; m stays 0, so the exp formulas hold with m = 0 and the
  normaliser's lower bound exp(-m) becomes 1.
- State (C [B, NH, DQK, DHV], n [B, NH, DQK], m [B, NH]). Without an initial state a sequence starts from C = 0,
  n = 0, m = -inf: only then do all three forms equal the parallel form that ViL trains with.
- Arithmetic runs in float32 (float64 if any input is float64); h comes back in v's dtype, states in the compute dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class MLSTMState(NamedTuple):
    """Recurrent mLSTM state after (or before) a sequence."""

    C: torch.Tensor  # [B, NH, DQK, DHV]
    n: torch.Tensor  # [B, NH, DQK]
    m: torch.Tensor  # [B, NH]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_gates(i: torch.Tensor, f: torch.Tensor, gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    log_input = i if gate == "exp" else F.logsigmoid(i)
    return log_input, F.logsigmoid(f)


def _normalise(
    h_tilde: torch.Tensor, qn: torch.Tensor, m: torch.Tensor, gate: str, normalize: bool, eps: float
) -> torch.Tensor:
    """h = h_tilde / (max(|q·n|, exp(-m)) + eps); for gate='sig' m == 0 so the lower bound is 1."""
    if not normalize:
        return h_tilde
    lower_bound = torch.exp(-m) if gate == "exp" else torch.ones_like(qn)
    return h_tilde / (torch.maximum(qn.abs(), lower_bound) + eps).unsqueeze(-1)


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    gate: str = "exp",
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: Optional[MLSTMState] = None,
    return_state: bool = False,
):
    """Quadratic (attention-like) form over the whole sequence; O(S^2) memory, the form ViL trains with."""
    out_dtype = v.dtype
    dt = compute_dtype(q, k, v, i, f)
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    S, dqk = q.shape[-2], q.shape[-1]
    q = q * (1.0 / math.sqrt(dqk))
    log_input, log_forget = _log_gates(i, f, gate)

    forget_cumsum = torch.cumsum(log_forget, dim=-1)  # [B, NH, S]
    # log_decay[t, j] = sum_{j<s<=t} logsigmoid(f_s) + log_input_j, for j <= t
    log_decay = forget_cumsum.unsqueeze(-1) - forget_cumsum.unsqueeze(-2) + log_input.unsqueeze(-2)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_decay = log_decay.masked_fill(~causal, float("-inf"))  # [B, NH, S, S]

    if gate == "exp":
        m = log_decay.amax(dim=-1)  # [B, NH, S]
        if initial_state is not None:
            m = torch.maximum(m, forget_cumsum + initial_state.m.to(dt).unsqueeze(-1))
    else:
        m = torch.zeros_like(forget_cumsum)

    weights = (q @ k.transpose(-2, -1)) * torch.exp(log_decay - m.unsqueeze(-1))  # [B, NH, S, S]
    h_tilde = weights @ v  # [B, NH, S, DHV]
    qn = weights.sum(dim=-1)  # [B, NH, S]
    if initial_state is not None:
        C0, n0, m0 = (t.to(dt) for t in initial_state)
        state_scale = torch.exp(forget_cumsum + (m0.unsqueeze(-1) if gate == "exp" else 0.0) - m)  # [B, NH, S]
        h_tilde = h_tilde + state_scale.unsqueeze(-1) * (q @ C0)
        qn = qn + state_scale * (q @ n0.unsqueeze(-1)).squeeze(-1)
    h = _normalise(h_tilde, qn, m, gate, normalize, eps).to(out_dtype)
    if not return_state:
        return h
    return h, _final_state(k, v, log_input, forget_cumsum, gate, initial_state, dt)


def _final_state(
    k: torch.Tensor,
    v: torch.Tensor,
    log_input: torch.Tensor,
    forget_cumsum: torch.Tensor,
    gate: str,
    initial_state: Optional[MLSTMState],
    dt: torch.dtype,
) -> MLSTMState:
    """State after the last step: C_S = decay * C_0 + sum_j exp(a_j - m_S) k_j v_j^T, a_j = F_S - F_j + log_input_j."""
    total_forget = forget_cumsum[..., -1]  # [B, NH]
    a = total_forget.unsqueeze(-1) - forget_cumsum + log_input  # [B, NH, S]
    if gate == "exp":
        m_last = a.amax(dim=-1)
        if initial_state is not None:
            m_last = torch.maximum(m_last, total_forget + initial_state.m.to(dt))
    else:
        m_last = torch.zeros_like(total_forget)
    w = torch.exp(a - m_last.unsqueeze(-1))  # [B, NH, S]
    C = (k * w.unsqueeze(-1)).transpose(-2, -1) @ v  # [B, NH, DQK, DHV]
    n = (k * w.unsqueeze(-1)).sum(dim=-2)  # [B, NH, DQK]
    if initial_state is not None:
        C0, n0, m0 = (t.to(dt) for t in initial_state)
        carry = torch.exp(total_forget + (m0 if gate == "exp" else 0.0) - m_last)  # [B, NH]
        C = C + carry[..., None, None] * C0
        n = n + carry[..., None] * n0
    return MLSTMState(C, n, m_last)


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    gate: str = "exp",
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: Optional[MLSTMState] = None,
    return_state: bool = False,
):
    """Chunkwise form: the parallel form inside each chunk, the recurrent state carried across chunk boundaries.

    Any chunk size and any S (the last chunk may be short). Memory is O(S * chunk_size) instead of O(S^2).
    """
    S = q.shape[-2]
    outputs = []
    state = initial_state
    for start in range(0, S, chunk_size):
        end = min(start + chunk_size, S)
        h, state = mlstm_parallel(
            q[..., start:end, :], k[..., start:end, :], v[..., start:end, :], i[..., start:end], f[..., start:end],
            gate=gate, normalize=normalize, eps=eps, initial_state=state, return_state=True,
        )
        outputs.append(h)
    h = torch.cat(outputs, dim=-2)
    return (h, state) if return_state else h


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    gate: str = "exp",
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: Optional[MLSTMState] = None,
    return_state: bool = False,
):
    """Step-by-step recurrence: the definition itself, for checking the other forms and for streaming inference."""
    out_dtype = v.dtype
    dt = compute_dtype(q, k, v, i, f)
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    B, NH, S, dqk = q.shape
    dhv = v.shape[-1]
    q = q * (1.0 / math.sqrt(dqk))
    log_input, log_forget = _log_gates(i, f, gate)
    if initial_state is None:
        C = q.new_zeros(B, NH, dqk, dhv)
        n = q.new_zeros(B, NH, dqk)
        m = q.new_full((B, NH), float("-inf") if gate == "exp" else 0.0)
    else:
        C, n, m = (t.to(dt) for t in initial_state)
        if gate == "sig":
            m = torch.zeros_like(m)
    outputs = []
    for t in range(S):
        if gate == "exp":
            m_new = torch.maximum(log_forget[..., t] + m, log_input[..., t])
            forget = torch.exp(log_forget[..., t] + m - m_new)
            inp = torch.exp(log_input[..., t] - m_new)
            m = m_new
        else:
            forget = torch.exp(log_forget[..., t])
            inp = torch.exp(log_input[..., t])
        k_t, v_t, q_t = k[..., t, :], v[..., t, :], q[..., t, :]
        C = forget[..., None, None] * C + inp[..., None, None] * (k_t.unsqueeze(-1) * v_t.unsqueeze(-2))
        n = forget[..., None] * n + inp[..., None] * k_t
        h_tilde = (q_t.unsqueeze(-2) @ C).squeeze(-2)  # [B, NH, DHV]
        qn = (q_t * n).sum(dim=-1)  # [B, NH]
        outputs.append(_normalise(h_tilde, qn, m, gate, normalize, eps))
    h = torch.stack(outputs, dim=-2).to(out_dtype)
    return (h, MLSTMState(C, n, m)) if return_state else h
