"""The Triton mLSTM as one autograd-aware torch.library op (opaque to torch.compile, no graph breaks).

Math (see ../../../shared/spec/mlstm-kernels.md and ../reference.py). Per (batch, head), inside chunk c of L rows
with entering state (C_c, n_c, m_c): a_j = log input gate (i_j, or logsigmoid(i_j) for gate="sig"),
F_t = sum_{s<=t in chunk} logsigmoid(f_s), D_tj = F_t - F_j + a_j, M_t = max_{j<=t} (a_j - F_j) (a cummax).
The max state needs only the gates: m_t = F_t + max(m_c, M_t), so it is computed here in PyTorch, O(S), before any
kernel runs; the kernels then never rescale accumulators (no online max), and every weight exp(D_tj - m_t) <= 1.
gate="sig": m = 0 everywhere.

Backward. With delta_t = dh_t.h_t, denom_t = max(|qn_t|, lb_t) + eps (lb = exp(-m_t), or 1 for "sig"):
  dh~_t = dh_t / denom_t,  dqn_t = -delta_t/denom_t sign(qn_t) [|qn_t| > lb_t],
  dm_t = -delta_t - dqn_t qn_t + delta_t/denom_t lb_t [|qn_t| <= lb_t]     (derivative through the stabiliser)
The kernels give dq, dk, dv (state terms included) and the row sums q.dq, k.dk. The log-gate gradients follow from
D_tj = F_t - F_j + a_j:  dF_t = q_t.dq_t + dm_t - k_t.dk_t - I_t,  da_j = k_j.dk_j + I_j, where I_j routes dm_t to
the argmax j of row t's max (the cummax index) exactly as autograd routes it through amax, and the entering state
m_c takes the rows whose max is the state term. State transitions add <C_{c+1}, dC_{c+1}> + <n, dn> to dF at the
chunk's last row. Then dlogsigmoid(f) is the reverse cumsum of dF inside each chunk.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import launch
from .launch import ChunkLayout, chunk_layout, mlstm_bwd, mlstm_bwd_delta, mlstm_fwd

# Fused kernels: the gate bookkeeping (_gate_vectors and the backward's gate-gradient routing) as three small Triton
# kernels, and dk + dv as one kernel where the tuned table says it wins. They are the default everywhere: checked on an
# H100 against the float64 reference for one chunk (bench/results/mlstm_check_fused_h100.log) and for chunked and
# stateful calls (bench/results/mlstm_check_fused_long_h100.log: S = 4096 and 16384, random shapes with states), and
# 2-2.5x faster fwd+bwd than the PyTorch gate bookkeeping on chunked calls (bench/results/sweep_chunk_*_h100.log).
# The unfused path (PyTorch gate bookkeeping, separate dk and dv kernels) stays as a cross-check: FUSED_KERNELS =
# False, or TFLA_FUSED_KERNELS=0 in the environment.
FUSED_KERNELS: bool = os.environ.get("TFLA_FUSED_KERNELS", "1") != "0"

# Sequences up to this length run as one chunk (the whole sequence, tiled inside): what ViL at 224-512 px needs.
# Longer ones take chunks of 256 rows: the fastest of 128-1024 at S = 4096 with DH = 192 / 384 / 512 on the H100
# (bench/sweep_chunk_mlstm.py; bench/results/session18/sweep_s4096_h100.log, session21/sweep_chunk_dh384_s4096.log),
# and within 1 % of 128 at DH 64. Head dims that pad to 128 (65-128) take chunks of 128: on an H100 at S 4096,
# fwd+bwd GPU time 0.744 -> 0.703 ms at DH 96 (exp gate), 0.756 -> 0.738 (sig), 0.804 -> 0.788 at DH 128, and
# 0.530 -> 0.535 at DH 64 (bench/results/session22/sweep_chunk_dh96.log, sweep_chunk_dh64_128.log).
SINGLE_CHUNK_MAX_SEQ_LEN = 1024
DEFAULT_LONG_CHUNK_SIZE = 256
NARROW_HEAD_CHUNK_SIZE = 128
NARROW_HEAD_DIMS = (65, 128)  # head dims (the wider of DQK, DHV) that take NARROW_HEAD_CHUNK_SIZE


def default_chunk_size(S: int, head_dim: int) -> int:
    """Rows per chunk for a sequence of S rows whose widest head dim (of DQK, DHV) is head_dim."""
    if S <= SINGLE_CHUNK_MAX_SEQ_LEN:
        return S
    low, high = NARROW_HEAD_DIMS
    return NARROW_HEAD_CHUNK_SIZE if low <= head_dim <= high else DEFAULT_LONG_CHUNK_SIZE


def _gate_vectors(i: torch.Tensor, f: torch.Tensor, m0: Optional[torch.Tensor], exp_gate: bool, lay: ChunkLayout):
    """F, a, mrow [BNH, NC, L]; mst [BNH, NC+1]; plus the cummax pieces the backward routes dm with."""
    BNH = i.shape[0]
    pad = lay.SP - lay.S
    log_input = i.float() if exp_gate else F.logsigmoid(i.float())
    log_forget = F.pad(F.logsigmoid(f.float()), (0, pad)).view(BNH, lay.NC, lay.L)
    Fc = log_forget.cumsum(-1)  # [BNH, NC, L]
    a = F.pad(log_input, (0, pad)).view(BNH, lay.NC, lay.L)
    last = [lay.L - 1] * (lay.NC - 1) + [lay.S - (lay.NC - 1) * lay.L - 1]
    if not exp_gate:
        mst = torch.zeros(BNH, lay.NC + 1, device=i.device, dtype=torch.float32)
        return Fc, a, torch.zeros_like(Fc), mst, None, None, last
    M, idx = torch.cummax(a - Fc, dim=-1)
    ms = [m0.float() if m0 is not None else torch.full((BNH,), float("-inf"), device=i.device)]
    for c in range(lay.NC):
        ms.append(Fc[:, c, last[c]] + torch.maximum(ms[c], M[:, c, last[c]]))
    mst = torch.stack(ms, dim=1)  # [BNH, NC+1]
    mrow = Fc + torch.maximum(mst[:, : lay.NC, None], M)
    return Fc, a, mrow, mst, M, idx, last


def _fused_gates(lay: ChunkLayout) -> bool:
    if lay.L > launch.FUSED_GATES_MAX_CHUNK:
        return False
    return bool(FUSED_KERNELS)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[2:])


# Layout of q, k, v, h and their gradients in the kernels (launch.heads_per_row): contiguous [B, NH, S, D], or
# token-major, a [B, NH, S, D] view of a contiguous [B, S, NH, D]. A model's projections give the token-major
# views (vil's MatrixLSTM splits heads off [B, S, NH * D] with a transpose); the kernels read and write them in place,
# where a .contiguous() would copy q, k, v, h and dh and the gradients (13 copies per ViL block and step,
# bench/results/profile_model_vil_tiny_dense_by_shape_h200.log). The fused path takes the layout of q; the unfused
# cross-check path stays contiguous.
# On by default since it passed bench/check_token_major_gpu.py on an H200 (results equal to the contiguous run, float64
# reference; bench/results/token_major_check_h200.log) and cut ViL-T's fwd+bwd GPU time from 71.5 to 63.5 ms
# (bench/results/models_tiny_token_major_h200.md). TFLA_TOKEN_MAJOR=0 or TOKEN_MAJOR_IN_PLACE = False turns it off.
TOKEN_MAJOR_IN_PLACE: bool = os.environ.get("TFLA_TOKEN_MAJOR", "1") != "0"


def _is_token_major(x: torch.Tensor) -> bool:
    B, NH, S, D = x.shape
    return NH > 1 and S > 1 and x.stride() == (S * NH * D, D, NH * D, 1)


def _token_major(q: torch.Tensor, lay: ChunkLayout) -> bool:
    return TOKEN_MAJOR_IN_PLACE and _fused_gates(lay) and _is_token_major(q)


def _in_layout(x: torch.Tensor, token_major: bool) -> torch.Tensor:
    if not token_major:
        return x.contiguous()
    return x if _is_token_major(x) else x.transpose(1, 2).contiguous().transpose(1, 2)


def _new_in_layout(like: torch.Tensor, shape, token_major: bool) -> torch.Tensor:
    """An empty tensor of `shape` [B, NH, S, D] in the given layout (what the fake kernels promise)."""
    if not token_major:
        return like.new_empty(shape)
    B, NH, S, D = shape
    return like.new_empty(B, S, NH, D).transpose(1, 2)


# The two ops are defined with torch.library's low-level API rather than @torch.library.custom_op: custom_op wraps
# every call in a Python layer (output aliasing checks and more). With the kernels stubbed out, one fwd + bwd op call
# pair cost 35 us of op layer on this project's CPU with custom_op and 22 us with this registration (torch 2.14); a
# cProfile of torch 2.11 on the H100 machine showed about 1 ms per call inside custom_op's wrapper
# (bench/results/tuning/cprofile_h100_custom_op.log). torch.compile calls these ops once per layer and step, so the
# wrapper would be paid in every compiled training step. The kernels' outputs are fresh tensors, never views of
# inputs: what the skipped aliasing check verifies (torch.library.opcheck passes, tests/kernels).
_LIB = torch.library.Library("tfla", "DEF")
_LIB.define(
    "mlstm_fwd(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, Tensor? C0, Tensor? n0, Tensor? m0, bool exp_gate, "
    "bool normalize, SymInt chunk_size, float eps, bool return_state, bool keep_scores=False) -> (Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),
)
_LIB.define(
    "mlstm_bwd(Tensor dh, Tensor? dC, Tensor? dn, Tensor? dm, Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, "
    "Tensor? C0, Tensor? n0, Tensor? m0, Tensor h, Tensor Cst, Tensor nst, Tensor qn, Tensor mst, Tensor gate_rows, "
    "Tensor scores, bool exp_gate, bool normalize, SymInt chunk_size, float eps) -> (Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),
)


def _mlstm_fwd_kernels(q, k, v, i, f, C0, n0, m0, exp_gate, normalize, chunk_size, eps, return_state,
                       keep_scores=False):
    """h [B,NH,S,DHV]; states C [B,NH,NC+1,DQK,DHV], n [B,NH,NC+1,DQK], m [B,NH,NC+1] (empty when not kept); qn;
    the gate vectors F, a, m [3,B,NH,SP] for the backward (empty on the unfused path, whose backward makes its own);
    the score-matrix path's packed weights for the backward where keep_scores asks for them (_keeps_scores; empty
    where none are kept)."""
    return _fwd_impl(q, k, v, i, f, C0, n0, m0, exp_gate, normalize, chunk_size, eps, return_state, keep_scores)


def _keeps_scores(needs_grad: bool) -> bool:
    """Whether a forward keeps the score-matrix path's weights for its backward (launch.KEEP_SCORES): only where a
    backward will run, since keeping them costs memory and the zeros written into the elements without a weight
    (launch.mlstm_fwd_score_matrix)."""
    return launch.KEEP_SCORES and needs_grad


def _keeps_states(lay: ChunkLayout, has_init: bool, return_state: bool) -> bool:
    return lay.NC > 1 or return_state or has_init


# Chunk states C (and in the backward their gradients dC) stored in the input dtype (bf16 / fp16) where only products
# read them: a chunked call (S above SINGLE_CHUNK_MAX_SEQ_LEN) without an initial state and without return_state.
# Every kernel that multiplies by a state rounds it to the input dtype before its dot, so h, dq, dk and dv come out
# bit for bit as with float32 states; the state kernels keep their recurrences in float32 registers and round only
# what they store. What changes: half the bytes written by the state kernels and read by the products (at DH 384 a
# chunk's float32 state is three times the size of its k), half the states' memory kept for the backward, and the
# log-gate gradients' state dots <C_c, dC_c> take C rounded (the input dtype's rounding, as the products).
# Float32 states stay where a state leaves or enters the op (return_state, initial_state: the caller's float32
# state), on the unfused path and with launch.PARALLEL_CHUNK_STATES (whose scan adds in place).
# TFLA_LOW_PRECISION_STATES=0 (or LOW_PRECISION_STATES = False) keeps float32 everywhere. On an H100, bf16, S 4096,
# eager fwd+bwd off -> on (with the weighted state rows, launch._state_rows): DH 96 0.861 -> 0.784 ms, DH 192
# 2.057 -> 1.792, DH 384 4.055 -> 3.319, DH 512 6.045 -> 4.905
# (bench/results/session17/ab_low_precision_states_h100.log; GPU check: check_lp_prescaled_s4096_h100.log).
LOW_PRECISION_STATES: bool = os.environ.get("TFLA_LOW_PRECISION_STATES", "1") != "0"


def _state_dtype(dtype: torch.dtype, lay: ChunkLayout, has_init: bool, return_state: bool) -> torch.dtype:
    """dtype of the chunk states C kept between the forward and the backward (see LOW_PRECISION_STATES)."""
    if (LOW_PRECISION_STATES and dtype in (torch.bfloat16, torch.float16) and not has_init and not return_state
            and _fused_gates(lay) and not launch.PARALLEL_CHUNK_STATES):
        return dtype
    return torch.float32


def _fwd_impl(q, k, v, i, f, C0, n0, m0, exp_gate, normalize, chunk_size, eps, return_state, keep_scores=False):
    (h, Cst, nst, mst, qn), gates, scores = _fwd_with_gates(q, k, v, i, f, C0, n0, m0, exp_gate, normalize,
                                                            chunk_size, eps, return_state, keep_scores)
    if Cst is None:  # the op's schema returns tensors: empty ones stand for states that were not kept
        Cst, nst = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    gate_rows = gates.rows if gates is not None else q.new_empty(0, dtype=torch.float32)
    return h, Cst, nst, mst, qn, gate_rows, scores if scores is not None else q.new_empty(0)


def _fwd_with_gates(q, k, v, i, f, C0, n0, m0, exp_gate, normalize, chunk_size, eps, return_state,
                    keep_scores=False):
    """The op's outputs (with None for the states C, n when they are not kept; _fwd_impl gives the op empty tensors
    there), the gate vectors (launch.GateVectors) where the fused backward can reuse them (else None): both paths
    keep them for the backward (one launch less there, and the backward sees the forward's own vectors), and the
    score-matrix path's weights where keep_scores asks for them and the fused backward takes them (else None).
    Tensors keep their [B, NH, ...] shape on the fused path: the launch wrappers take any leading dims, and every
    reshape is one more dispatch of host time (this op is host-bound at ViL-T's shapes, bench/results)."""
    B, NH, S, DQK = q.shape
    DHV = v.shape[-1]
    lay = chunk_layout(S, chunk_size)
    has_init = C0 is not None
    token_major = _token_major(q, lay)
    q, k, v = (_in_layout(t, token_major) for t in (q, k, v))
    fused = _fused_gates(lay)
    keeps_states = _keeps_states(lay, has_init, return_state)
    gates = gates_from = state_gates_from = None
    if fused:
        if launch.folds_gate_vectors(DQK, DHV, launch.gpu_arch(q.device), lay, keeps_states=keeps_states):
            gates = launch.gate_vector_buffers(i, lay)  # the fwd_h kernel writes them, from the gates
            gates_from = (i.contiguous(), f.contiguous())
        elif launch.folds_gate_vectors_into_state_rows(DQK, lay, keeps_states=keeps_states):
            gates = launch.gate_vector_buffers(i, lay)  # the state-rows launch writes them, from the gates
            state_gates_from = (i.contiguous(), f.contiguous(), m0.contiguous() if m0 is not None else None)
        else:
            gates = launch.mlstm_gates_fwd(i, f, m0, lay, exp_gate=exp_gate)  # [B, NH, ...]
        fv, av, mrow, mst = gates[:4]
    else:
        fv, av, mrow, mst, _, _, _ = _gate_vectors(_flat(i), _flat(f), _flat(m0) if m0 is not None else None,
                                                 exp_gate, lay)
        mst = mst.view(B, NH, lay.NC + 1)
    Cst = nst = None
    if keeps_states:
        Cst = torch.empty(B, NH, lay.NC + 1, DQK, DHV, device=q.device,
                          dtype=_state_dtype(q.dtype, lay, has_init, return_state))
        nst = torch.empty(B, NH, lay.NC + 1, DQK, device=q.device, dtype=torch.float32)
        if launch.POISON_OUTPUTS:
            Cst.fill_(float("nan"))
            nst.fill_(float("nan"))
        if has_init:
            Cst[:, :, 0] = C0.float()
            nst[:, :, 0] = n0.float()
    h, qn, scores = mlstm_fwd(q, k, v, fv, av, mrow, mst, Cst, nst, lay, exp_gate=exp_gate, normalize=normalize,
                              eps=eps, has_init=has_init, gates_from=gates_from, state_gates_from=state_gates_from,
                              keep_scores=keep_scores and fused)
    return (h, Cst, nst, mst, qn), gates, scores


@torch.library.register_fake("tfla::mlstm_fwd", lib=_LIB)
def _(q, k, v, i, f, C0, n0, m0, exp_gate, normalize, chunk_size, eps, return_state, keep_scores=False):
    B, NH, S, DQK = q.shape
    DHV = v.shape[-1]
    lay = chunk_layout(S, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    if _keeps_states(lay, C0 is not None, return_state):
        Cst = q.new_empty(B, NH, lay.NC + 1, DQK, DHV, device=q.device,
                          dtype=_state_dtype(q.dtype, lay, C0 is not None, return_state))
        nst = q.new_empty(B, NH, lay.NC + 1, DQK, **f32)
    else:
        Cst = q.new_empty(0, **f32)
        nst = q.new_empty(0, **f32)
    mst = q.new_empty(B, NH, lay.NC + 1, **f32)
    h = _new_in_layout(v, (B, NH, S, DHV), _token_major(q, lay))
    fused = _fused_gates(lay)
    gate_rows = q.new_empty(3, B, NH, lay.SP, **f32) if fused else q.new_empty(0, **f32)
    kept = launch.kept_scores_numel(DQK, DHV, B * NH, lay, keeps_states=_keeps_states(lay, C0 is not None,
                                                                                         return_state))
    scores = q.new_empty(kept if fused and keep_scores else 0)
    return h, Cst, nst, mst, q.new_empty(B, NH, lay.SP, **f32), gate_rows, scores


def _mlstm_bwd_kernels(dh, dC, dn, dm, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, mst, gate_rows, scores, exp_gate,
                       normalize, chunk_size, eps):
    """dq, dk, dv, di, df, dC0, dn0, dm0 (the last three empty without an initial state), all contiguous."""
    gates = launch.GateVectors(*gate_rows.unbind(0), mst, gate_rows) if gate_rows.numel() else None
    grads = _bwd_any(dh, dC, dn, dm, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, exp_gate, normalize, chunk_size, eps,
                     gates=gates, scores=scores if scores.numel() else None)
    return tuple(q.new_empty(0, dtype=torch.float32) if g is None else g for g in grads)


def _bwd_any(dh, dC, dn, dm, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, exp_gate, normalize, chunk_size, eps,
             gates=None, scores=None):
    lay = chunk_layout(q.shape[2], chunk_size)
    args = (dh, dC, dn, dm, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, exp_gate, normalize, chunk_size, eps)
    grads = _bwd_impl_fused(*args, gates=gates, scores=scores) if _fused_gates(lay) else _bwd_impl(*args)
    # Some come back as slices of padded or per-chunk buffers; the fake kernel (and so torch.compile) promises
    # dq, dk, dv in the layout of the kernels (_token_major) and the rest contiguous, whatever the inputs' strides.
    token_major = _token_major(q, lay)
    return tuple(None if g is None else _in_layout(g, token_major and n < 3) for n, g in enumerate(grads))


def _state_grad_buffers(dC, dn, lay: ChunkLayout, BNH: int, DQK: int, DHV: int, device, needed: bool,
                        zeroed: bool = True, final_read: bool = True, dtype: torch.dtype = torch.float32):
    """Per-chunk-boundary state gradients [BNH, NC+1, ...], seeded at the end with the final state's gradient.
    zeroed=False where the sequential state kernel writes every boundary (launch.mlstm_bwd): only the seed is set,
    which skips a fill of the whole buffer (855 MB at DH 512 / S 4096 with the benchmark's 48 heads). The kernel
    reads the seed row when any final-state gradient is given (final_read); a part without one is then zeroed.
    dtype: dC's, the forward states' (LOW_PRECISION_STATES); dn stays float32."""
    if not needed:
        return None, None
    new = torch.zeros if zeroed else torch.empty
    dCst = new(BNH, lay.NC + 1, DQK, DHV, device=device, dtype=dtype)
    dnst = new(BNH, lay.NC + 1, DQK, device=device, dtype=torch.float32)
    if launch.POISON_OUTPUTS and not zeroed:  # a boundary nobody writes shows as NaN (bench/check_mlstm_gpu.py, tests)
        dCst.fill_(float("nan"))
        dnst.fill_(float("nan"))
    for buffer, seed in ((dCst, dC), (dnst, dn)):
        if seed is not None:
            buffer[:, lay.NC] = _flat(seed[:, :, lay.NC]).float()
        elif not zeroed and final_read:
            buffer[:, lay.NC].zero_()
    return dCst, dnst


def _bwd_impl(dh, dC, dn, dm, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, exp_gate, normalize, chunk_size, eps):
    B, NH, S, DQK = q.shape
    DHV = v.shape[-1]
    BNH = B * NH
    lay = chunk_layout(S, chunk_size)
    has_init = C0 is not None
    has_final_grad = dC is not None or dn is not None or dm is not None
    qf, kf, vf = (_flat(t.contiguous()) for t in (q, k, v))
    dhf = _flat(dh.to(v.dtype).contiguous())
    i2, f2 = _flat(i), _flat(f)
    fv, av, mrow, mst, M, idx, last = _gate_vectors(i2, f2, _flat(m0) if m0 is not None else None, exp_gate, lay)
    qn = qn.reshape(BNH, lay.NC, lay.L)

    # Per-row normaliser terms.
    delta = mlstm_bwd_delta(_flat(h.contiguous()), dhf, lay).view(BNH, lay.NC, lay.L)
    if normalize:
        lower = torch.exp(-mrow) if exp_gate else torch.ones_like(qn)
        rs = 1.0 / (torch.maximum(qn.abs(), lower) + eps)
        active = qn.abs() > lower
        d_denom = -delta * rs
        dqn = torch.where(active, d_denom * torch.sign(qn), torch.zeros_like(qn))
        dm_row = -delta - dqn * qn - torch.where(active, torch.zeros_like(qn), d_denom * lower)
    else:
        rs = torch.ones_like(qn)
        dqn = torch.zeros_like(qn)
        dm_row = -delta

    keeps = Cst is not None and Cst.numel() > 0
    state_pass = has_init or lay.NC > 1
    dCst, dnst = _state_grad_buffers(dC, dn, lay, BNH, DQK, DHV, q.device, state_pass or has_final_grad)
    Cf = _flat(Cst) if keeps else None
    nf = _flat(nst) if keeps else None
    dqf, dkf, dvf, qdq, kdk = mlstm_bwd(
        qf, kf, vf, dhf, fv.reshape(BNH, -1), av.reshape(BNH, -1), mrow.reshape(BNH, -1), rs.reshape(BNH, -1),
        dqn.reshape(BNH, -1), mst,
        Cf, nf, dCst, dnst, lay, has_final_grad=has_final_grad, state_pass=state_pass,
    )
    qdq = qdq.view(BNH, lay.NC, lay.L)
    kdk = kdk.view(BNH, lay.NC, lay.L)

    # A_c = <C_c, dC_c> + <n_c, dn_c>: what the state at boundary c contributes to the log gates.
    A = None
    if dCst is not None and keeps:
        A = (Cf * dCst).sum((-2, -1)) + (nf * dnst).sum(-1)  # [BNH, NC+1]

    dm_eff = dm_row.clone()
    route = torch.zeros_like(dm_row)
    dm0 = None
    if exp_gate:
        init_arg = mst[:, : lay.NC, None] > M  # the row's max is the entering-state term
        DM = torch.zeros(BNH, device=q.device, dtype=torch.float32)
        if dm is not None:
            DM = DM + _flat(dm[:, :, lay.NC]).float()
        if A is not None:
            DM = DM - A[:, lay.NC]
        for c in reversed(range(lay.NC)):
            dm_eff[:, c, last[c]] += DM
            DM = (dm_eff[:, c] * init_arg[:, c]).sum(-1)
        if has_init:
            dm0 = DM + A[:, 0]
        # Deterministic segment sums: rows t whose argmax is j form one run of the (sorted) cummax indices.
        local = torch.where(init_arg, torch.zeros_like(dm_eff), dm_eff).view(-1, lay.L)
        idx2 = idx.reshape(-1, lay.L).contiguous()
        cols = torch.arange(lay.L, device=q.device).expand_as(idx2).contiguous()
        right = torch.searchsorted(idx2, cols, right=True)  # rows t with idx_t <= j
        csum = torch.cumsum(local, -1)
        prev = F.pad(csum, (1, 0))[:, :-1]
        seg = csum.gather(-1, (right - 1).clamp(min=0)) - prev
        route = torch.where(idx2 == cols, seg, torch.zeros_like(seg)).view(BNH, lay.NC, lay.L)
    else:
        dm_eff.zero_()

    dF = qdq + dm_eff - kdk - route
    if A is not None:
        last_t = torch.tensor(last, device=q.device)
        dF[:, torch.arange(lay.NC, device=q.device), last_t] += A[:, 1:]
    da = kdk + route
    dlf = dF.flip(-1).cumsum(-1).flip(-1).reshape(BNH, -1)[:, :S]
    da = da.reshape(BNH, -1)[:, :S]
    df = dlf * torch.sigmoid(-f2.float())
    di = da if exp_gate else da * torch.sigmoid(-i2.float())

    dC0 = dn0 = dm0_out = None
    if has_init:
        dC0 = dCst[:, 0].reshape(B, NH, DQK, DHV)
        dn0 = dnst[:, 0].reshape(B, NH, DQK)
        dm0_out = (dm0 if dm0 is not None else torch.zeros(BNH, device=q.device)).reshape(B, NH)
    return (dqf.view(B, NH, S, DQK), dkf.view(B, NH, S, DQK), dvf.view(B, NH, S, DHV),
            di.reshape(B, NH, S).to(i.dtype), df.reshape(B, NH, S).to(f.dtype), dC0, dn0, dm0_out)


def _bwd_impl_fused(dh, dC, dn, dm, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, exp_gate, normalize, chunk_size,
                    eps, gates=None, scores=None):
    """_bwd_impl with the gate bookkeeping in kernels (the default, see FUSED_KERNELS): same math, same dq, dk, dv
    kernels. Tensors keep their [B, NH, ...] shape (see _fwd_with_gates); the state terms work on [B*NH, ...] views.
    gates: the forward's launch.GateVectors when it kept them; recomputed otherwise. scores: the forward's weights
    on the score-matrix path (launch.KEEP_SCORES), or None."""
    B, NH, S, DQK = q.shape
    DHV = v.shape[-1]
    BNH = B * NH
    lay = chunk_layout(S, chunk_size)
    has_init = C0 is not None
    has_final_grad = dC is not None or dn is not None or dm is not None
    token_major = _token_major(q, lay)
    q, k, v = (_in_layout(t, token_major) for t in (q, k, v))
    dh = _in_layout(dh.to(v.dtype), token_major)
    if gates is None:
        gates = launch.mlstm_gates_fwd(i, f, m0, lay, exp_gate=exp_gate)
    fv, av, mrow, mst = gates[:4]
    keeps = Cst is not None and Cst.numel() > 0
    state_pass = has_init or lay.NC > 1
    from_rows = launch.STATE_TERMS_FROM_ROWS and (exp_gate or launch.SIG_STATE_TERMS_FROM_ROWS)
    state_row_terms = tickets = None
    if state_pass and launch.row_terms_in_state_rows(DQK):  # the state pass's first launch makes rs, dqn and dm
        rs, dqn, dm_row, tickets = launch._row_sums(4, B, NH, lay.SP, device=q.device, zeroed=False).unbind(0)
        state_row_terms = launch.RowTermInputs(_in_layout(h, token_major), qn, dm_row, normalize, exp_gate, eps)
        row_terms = None
    elif state_pass:  # the state pass reads rs and dqn before the dq kernel runs
        rs, dqn, dm_row = launch.mlstm_bwd_rows(_in_layout(h, token_major), dh, qn, mrow, lay, exp_gate=exp_gate,
                                                normalize=normalize, eps=eps)
        row_terms = None
    else:  # the dq kernel computes them for its rows: one launch less (a fourth row holds the gate tickets)
        rs, dqn, dm_row, tickets = launch._row_sums(4, B, NH, lay.SP, device=q.device, zeroed=False).unbind(0)
        row_terms = launch.RowTermInputs(_in_layout(h, token_major), qn, dm_row, normalize, exp_gate, eps)
    gate_grads = None
    if launch.folds_gate_grads(DQK, DHV, launch.gpu_arch(q.device), lay, state_pass=state_pass,
                               has_final_grad=has_final_grad, has_init=has_init, state_terms_from_rows=from_rows):
        if tickets is None:
            tickets = launch._row_sums(B, NH, lay.SP, device=q.device, zeroed=False)
        i, f = i.contiguous(), f.contiguous()
        gate_grads = launch.GateGradsInDkdv(i, f, mst, torch.empty_like(i), torch.empty_like(f), tickets, exp_gate,
                                            dm_row)
    # The sequential state kernel writes every boundary of the state gradients (and, unless the gate kernel takes
    # the state terms from the row sums, launch.STATE_TERMS_FROM_ROWS, the shares of A_c).
    kernel_states = state_pass and not launch.PARALLEL_CHUNK_STATES
    dCst, dnst = _state_grad_buffers(dC, dn, lay, BNH, DQK, DHV, q.device, state_pass or has_final_grad,
                                     zeroed=not kernel_states, final_read=has_final_grad,
                                     dtype=Cst.dtype if keeps else torch.float32)
    Cf = _flat(Cst) if keeps else None
    nf = _flat(nst) if keeps else None
    dq, dk, dv, qdq, kdk, *shares = mlstm_bwd(
        q, k, v, dh, fv, av, mrow, rs, dqn, mst, Cf, nf, dCst, dnst, lay,
        has_final_grad=has_final_grad, state_pass=state_pass, sum_slices=False, fused_dkdv=True,
        row_terms_from=row_terms, state_dots=not from_rows, gate_grads=gate_grads, state_row_terms=state_row_terms,
        scores=scores,
    )
    if gate_grads is not None:  # the dk + dv kernel wrote di and df (no initial state, so no dm0 nor dC0, dn0)
        return dq, dk, dv, gate_grads.di, gate_grads.df, None, None, None
    A = shares[0] if shares else None
    if not from_rows and A is None and dCst is not None and keeps:  # no sequential state pass: A_c as one share
        A = ((Cf.float() * dCst.float()).sum((-2, -1)) + (nf * dnst).sum(-1)).unsqueeze(-1)  # [BNH, NC+1, 1]
    a_ends = None  # the end states' terms of the gate gradients; the gate kernel has the others from the row sums
    if from_rows and keeps and (has_init or has_final_grad):
        ends = [0] * has_init + [lay.NC] * has_final_grad  # float32 states at both ends (_state_dtype)
        a_ends = torch.zeros(BNH, 2, device=q.device, dtype=torch.float32)
        dots = (Cf[:, ends].float() * dCst[:, ends].float()).sum((-2, -1)) + (nf[:, ends] * dnst[:, ends]).sum(-1)
        a_ends[:, [0] * has_init + [1] * has_final_grad] = dots
    dm_final = _flat(dm[:, :, lay.NC]).float().contiguous() if dm is not None else None
    di, df, dm0 = launch.mlstm_gates_bwd(qdq, kdk, dm_row, fv, av, mst, a_ends, A, dm_final, i, f, lay,
                                         exp_gate=exp_gate, has_init=has_init)

    dC0 = dn0 = dm0_out = None
    if has_init:
        dC0 = dCst[:, 0].reshape(B, NH, DQK, DHV)
        dn0 = dnst[:, 0].reshape(B, NH, DQK)
        dm0_out = dm0.reshape(B, NH)
    return dq, dk, dv, di, df, dC0, dn0, dm0_out


@torch.library.register_fake("tfla::mlstm_bwd", lib=_LIB)
def _(dh, dC, dn, dm, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, mst, gate_rows, scores, exp_gate, normalize,
      chunk_size, eps):
    f32 = dict(dtype=torch.float32)
    if C0 is not None:
        dC0, dn0, dm0 = C0.new_empty(C0.shape, **f32), n0.new_empty(n0.shape, **f32), m0.new_empty(m0.shape, **f32)
    else:
        dC0, dn0, dm0 = (q.new_empty(0, **f32) for _ in range(3))
    # The real op returns fresh contiguous gradients whatever the inputs' strides (the model passes transposed views):
    # empty_like would copy those strides and torch.compile's stride asserts would fail.
    def fresh(t):
        return t.new_empty(t.shape)

    token_major = _token_major(q, chunk_layout(q.shape[2], chunk_size))
    dq, dk, dv = (_new_in_layout(t, t.shape, token_major) for t in (q, k, v))
    return dq, dk, dv, fresh(i), fresh(f), dC0, dn0, dm0


# One implementation for every device: the Triton kernels run on CUDA, and on CPU under TRITON_INTERPRET=1 (tests).
_LIB.impl("mlstm_fwd", _mlstm_fwd_kernels, "CompositeExplicitAutograd")
_LIB.impl("mlstm_bwd", _mlstm_bwd_kernels, "CompositeExplicitAutograd")
mlstm_fwd_op = torch.ops.tfla.mlstm_fwd.default
mlstm_bwd_op = torch.ops.tfla.mlstm_bwd.default


def _setup_context(ctx, inputs, output):
    q, k, v, i, f, C0, n0, m0, exp_gate, normalize, chunk_size, eps, return_state, *_ = inputs
    h, Cst, nst, mst, qn, gate_rows, scores = output
    ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, mst, gate_rows, scores)
    ctx.cfg = (exp_gate, normalize, chunk_size, eps)
    ctx.init_dtypes = None if C0 is None else (C0.dtype, n0.dtype, m0.dtype)
    ctx.return_state = return_state
    # Outputs nobody used get None, not zeros: a zero gradient of the final max state would switch on the backward's
    # final-state terms (extra products and a zero-filled state buffer) for nothing.
    ctx.set_materialize_grads(False)


def _backward(ctx, dh, dCst, dnst, dmst, dqn, dgate_rows, dscores):
    *saved, mst, gate_rows, scores = ctx.saved_tensors
    grads = _input_grads(ctx, saved, dh, dCst, dnst, dmst,
                         functools.partial(_bwd_op, mst=mst, gate_rows=gate_rows, scores=scores))
    return (*grads, None)  # keep_scores


def _bwd_op(dh, dC, dn, dm, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, exp_gate, normalize, chunk_size, eps, *, mst,
            gate_rows, scores):
    return mlstm_bwd_op(dh, dC, dn, dm, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, mst, gate_rows, scores, exp_gate,
                        normalize, chunk_size, eps)


def _input_grads(ctx, saved, dh, dCst, dnst, dmst, bwd):
    """The gradients of the op's first 13 inputs (the callers add keep_scores' None), from the forward's tensors
    saved = (q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn) and ctx's settings (_setup_context, _EagerMLSTM.forward);
    bwd computes them (the op, or _bwd_any)."""
    q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn = saved
    exp_gate, normalize, chunk_size, eps = ctx.cfg
    if dh is None:
        dh = torch.zeros_like(h)
    if not ctx.return_state:  # the states were internal (saved for the backward), never handed out
        dCst = dnst = dmst = None
    if dCst is not None and dCst.numel() == 0:
        dCst = None
    if dnst is not None and dnst.numel() == 0:
        dnst = None
    dq, dk, dv, di, df, dC0, dn0, dm0 = bwd(
        dh, dCst, dnst, dmst, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, exp_gate, normalize, chunk_size, eps
    )
    if C0 is None:
        dC0 = dn0 = dm0 = None
    else:
        dC0, dn0, dm0 = dC0.to(ctx.init_dtypes[0]), dn0.to(ctx.init_dtypes[1]), dm0.to(ctx.init_dtypes[2])
    return dq, dk, dv, di, df, dC0, dn0, dm0, None, None, None, None, None


torch.library.register_autograd("tfla::mlstm_fwd", _backward, setup_context=_setup_context, lib=_LIB)


class _EagerMLSTM(torch.autograd.Function):
    """The same forward and backward without the custom-op machinery, for eager calls: on an H100 a custom-op call
    cost about 1 ms of host time (bench/results/tuning/cprofile_h100_custom_op.log), more than the kernels of a ViL
    layer. torch.compile still sees the registered op (mlstm_triton picks it while compiling).
    It returns h alone, or h and the state (C, n, m per chunk boundary) with return_state: every output of an
    autograd.Function costs host time, and so does every output saved for the backward (a detach each way). The
    normaliser sums and internal states are kept on ctx as intermediates (no reference cycle: they are not outputs)."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, exp_gate, normalize, chunk_size, eps, return_state, keep_scores):
        inputs = (q, k, v, i, f, C0, n0, m0, exp_gate, normalize, chunk_size, eps, return_state)
        (h, Cst, nst, mst, qn), ctx.gates, ctx.scores = _fwd_with_gates(*inputs, keep_scores)
        ctx.cfg = (exp_gate, normalize, chunk_size, eps)
        ctx.init_dtypes = None if C0 is None else (C0.dtype, n0.dtype, m0.dtype)
        ctx.return_state = return_state
        ctx.set_materialize_grads(False)  # as _setup_context: unused outputs get None, not zeros
        ctx.qn = qn
        if return_state:
            ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, h, Cst, nst)
            # A view: ctx.gates holds mst itself, and an output held by its own ctx would be a reference cycle.
            return h, Cst, nst, mst.view(mst.shape)
        ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, h)
        ctx.states = (Cst, nst)
        return h

    @staticmethod
    def backward(ctx, dh, dCst=None, dnst=None, dmst=None):
        saved = ctx.saved_tensors if ctx.return_state else (*ctx.saved_tensors, *ctx.states)
        grads = _input_grads(ctx, (*saved, ctx.qn), dh, dCst, dnst, dmst,
                             functools.partial(_bwd_any, gates=ctx.gates, scores=ctx.scores))
        return (*grads, None)  # keep_scores


def mlstm_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    gate: str = "exp",
    normalize: bool = True,
    chunk_size: Optional[int] = None,
    initial_state=None,
    return_state: bool = False,
    eps: float = 1e-6,
):
    """TFLA mLSTM on the Triton kernels; same contract as tfla.mlstm (inputs already checked there)."""
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    S = q.shape[-2]
    L = default_chunk_size(S, max(q.shape[-1], v.shape[-1])) if chunk_size is None else int(chunk_size)
    C0 = n0 = m0 = None
    if initial_state is not None:
        C0, n0, m0 = initial_state
    # whether a backward will run (known here: an autograd.Function's forward runs with grad mode off)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, i, f, C0, n0, m0))
    args = (q, k, v, i, f, C0, n0, m0, gate == "exp", normalize, L, eps, return_state, _keeps_scores(needs_grad))
    if torch.compiler.is_compiling():
        h, Cst, nst, mst, *_ = mlstm_fwd_op(*args)
    elif return_state:
        h, Cst, nst, mst = _EagerMLSTM.apply(*args)
    else:
        return _EagerMLSTM.apply(*args)
    if not return_state:
        return h
    from ..reference import MLSTMState

    NC = mst.shape[-1] - 1
    return h, MLSTMState(Cst[:, :, NC], nst[:, :, NC], mst[:, :, NC])
