"""The score-matrix path for wide heads: raw Triton kernels (launch wrappers: launch.py, mlstm_fwd_score_matrix and
mlstm_bwd_score_matrix). One chunk, or (with states) chunk by chunk.

Why: where a head is too wide for one program to hold a row tile of h (or dq, dk, dv) in registers (DH 384 / 512 on
the H200: 64-row tiles of [64, 128] float32), the matrix kernels of kernels.py split the output into column slices,
and every slice forms the tile's scores again, a product over the whole other head dim. At DH 512 that is 20 passes
over the S x S / 2 causal products per fwd+bwd (fwd_h 4 x (1 + 1/4), dq, dk, dv 5 each); here it is 7 (2 forward, 5
backward). The weights are cheap to keep: a bf16 weight costs 2 bytes to write and 2 to read, against 2 x DH flops to
form again. So one kernel forms each weight once, in the input dtype (the same rounding the matrix kernels apply
before their products), and the products that use it are plain matrix products over the stored weights (1.8-2.4x
faster fwd+bwd at DH 384 / 512 on the H200; slower at DH 96 / 192, where one program covers a row tile already:
bench/results/session14/):

    forward:  W = (q k^T) exp(D - m)/sqrt(d)                      mlstm_scores_fwd_kernel (with qn = rowsum W)
              h = (W v) / denominator                             mlstm_score_rows_kernel
    backward: dS = (dh v^T rs + dqn) exp(D - m)/sqrt(d),
              Wr = W rs                                           mlstm_scores_bwd_kernel (with rs, dqn, dm)
              dq = dS k                                           mlstm_score_rows_kernel
              dk = dS^T q,  dv = Wr^T dh                          mlstm_score_cols_kernel

With several chunks (wide heads at S > 1024, and DH 192 there too: launch.SCORE_MATRIX_CHUNKED_MIN_HEAD_DIM) each
chunk has its own triangle of L rows, and the products add the state terms of the matrix kernels (kernels.py's
docstring: g_t, e_j): h += g_t q_t C_c, dq += g_t (rs_t dh_t C_c^T + dqn_t n_c), dk += e_j (v_j dC_{c+1}^T +
dn_{c+1}), dv += e_j k_j dC_{c+1}, and qn += g_t q_t.n_c in the forming kernel. Only the scores within a chunk are
stored; the state products are formed once per output slice, as the matrix kernels form them.

The stored matrices hold the lower triangle only, in row blocks of PACK rows: block i (rows [i PACK, (i+1) PACK))
keeps columns [0, (i+1) PACK), row-major, after the blocks before it (_tri_ptrs); chunk c of (batch, head) bh is
matrix bh * NC + c. A row tile never crosses a block
(PACK is a multiple of every row tile). Kernels that form a matrix write every element on or below the diagonal of
the rows before S; the kernels that read one mask the diagonal tiles (so nothing above the diagonal is read) and, on
the key side, the rows past S. Rows past S of off-diagonal query-side tiles are read but never reach a stored output
(a row of a product depends on that row alone).
"""

import triton
import triton.language as tl

from .kernels import LOG2E, _exp2, _load_rows, _resident, _row_dot, _row_terms, _rows_base, _scores, _weight_tile
from .kernels import _denominator, _entering_weight, _leaving_weight


@triton.jit
def _tri_ptrs(M, mat, TRI, t_lo, t_loc, s_loc, PACK: tl.constexpr):
    """Addresses of the elements [t_loc, s_loc] of packed lower-triangular matrix mat (= bh * NC + c; TRI elements
    each; see the module docstring). t_lo: the row tile's first row, which fixes the row block."""
    blk = t_lo // PACK
    base = M + mat * TRI + PACK * PACK * (blk * (blk + 1) // 2)
    return base + (t_loc[:, None] - blk * PACK) * ((blk + 1) * PACK) + s_loc[None, :]


@triton.jit
def _row_decay_term(FV, MROW, vec, t_loc, t_ok, scale):
    """The row term of the decay, r_t = (F_t - m_t) log2(e) + log2(scale) (kernels.py's docstring)."""
    f_t = tl.load(FV + vec + t_loc, mask=t_ok, other=0.0)
    m_t = tl.load(MROW + vec + t_loc, mask=t_ok, other=0.0)
    return (f_t - m_t) * LOG2E + tl.log2(scale)


@triton.jit
def _chunk_program(pid_bc, row_tile, S, L, NC, SP, ROWS: tl.constexpr):
    """Where a program works inside its chunk: (batch, head), chunk, first global row, the chunk's length Lc, the
    matrix index bh * NC + c, the tile's first local row, its local rows and their mask, and the row vectors'
    offset of the chunk's first row."""
    bh = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    row0 = c * L
    lo = row_tile * ROWS
    rows = lo + tl.arange(0, ROWS)
    Lc = tl.minimum(L, S - row0)
    return bh, c, row0, Lc, pid_bc.to(tl.int64), lo, rows, rows < Lc, bh * SP + row0


@triton.jit
def _score_program(Q, K, S, L, NC, SP, DQK: tl.constexpr, NHT: tl.constexpr, BT: tl.constexpr):
    """Where a program of the kernels that form a matrix works (grid: query tiles of BT, B*NH*NC): _chunk_program's
    values and q's and k's bases at the chunk's first row."""
    bh, c, row0, Lc, mat, t_lo, t_loc, t_ok, vec = _chunk_program(tl.program_id(1), tl.program_id(0), S, L, NC, SP,
                                                                   BT)
    return (bh, c, row0, Lc, mat, t_lo, t_loc, t_ok, _rows_base(Q, bh, row0, S, DQK, NHT),
            _rows_base(K, bh, row0, S, DQK, NHT), vec)


@triton.jit
def _state_product(acc, A, ST, bh, row0, rows, r_ok, offs_o, S, st, DA: tl.constexpr, DO: tl.constexpr,
                   ST_D: tl.constexpr, ST_O: tl.constexpr, BD: tl.constexpr,
                   PREC: tl.constexpr, NHT: tl.constexpr):
    """acc + sum_d a[row, d] X[d, o] [rows, offs_o] (float32) for a [*, S, DA] operand a and a slice of chunk state
    st seen as X [DA, DO]: element [d, o] at d * ST_D + o * ST_O of the state ([DQK, DHV], rows DHV apart), so
    that (ST_D, ST_O) = (DHV, 1) is the state and (1, DHV) its transpose. The state goes to a's dtype for the product,
    as in the matrix kernels (a no-op where it is stored in that dtype: function.LOW_PRECISION_STATES)."""
    a_base = _rows_base(A, bh, row0, S, DA, NHT)
    st_base = ST + st * (DA * DO)
    o_ok = offs_o < DO
    for d0 in range(0, DA, BD):
        offs_d = d0 + tl.arange(0, BD)
        d_ok = offs_d < DA
        a = tl.load(a_base + rows[:, None] * (NHT * DA) + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0)
        x = tl.load(st_base + offs_d[:, None] * ST_D + offs_o[None, :] * ST_O, mask=d_ok[:, None] & o_ok[None, :],
                    other=0.0)
        acc += tl.dot(a, x.to(a.dtype), input_precision=PREC)
    return acc


@triton.jit
def _store_weights(W, mat, TRI, t_lo, t_loc, t_ok, s_loc, w, PACK: tl.constexpr, EVERY_ROW: tl.constexpr):
    """Store a tile of weights into packed matrix mat: the rows before the chunk's end, or (EVERY_ROW) every row of
    the tile, zeros past the end (a select, not a product: such a row's weight may be inf times a zero score)."""
    if EVERY_ROW:
        w = tl.where(t_ok[:, None], w, 0.0)
        tl.store(_tri_ptrs(W, mat, TRI, t_lo, t_loc, s_loc, PACK), w.to(W.dtype.element_ty))
    else:
        tl.store(_tri_ptrs(W, mat, TRI, t_lo, t_loc, s_loc, PACK), w.to(W.dtype.element_ty), mask=t_ok[:, None])


@triton.jit
def mlstm_scores_fwd_kernel(
    Q, K, FV, AV, MROW, QN, W, NST, MST,
    S, L, NC, SP, TRI, scale,
    DQK: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, FAST_EXP2: tl.constexpr, NHT: tl.constexpr, PACK: tl.constexpr,
    HAS_STATE: tl.constexpr = False, ZERO_REST: tl.constexpr = False,
):
    """W[t, j] for one query tile of one chunk (the weights of kernels._weight_tile, in W's dtype; zeros above the
    diagonal of the diagonal tiles) and qn_t = sum_j W[t, j] of the float32 weights, plus g_t q_t.n_c with
    HAS_STATE (NST, MST: the chunk states' n and m). BT is a multiple of BS.
    ZERO_REST (the weights kept for the backward, launch.KEEP_SCORES): the program also writes zeros into the rest of
    its rows' part of the row block (the columns right of the diagonal tiles, and the rows past the chunk's end), so
    that no element of W is left unwritten: kept, W is an output of the registered op, which must not depend on what
    its memory held before. The launch then covers every row of the last row block (programs past the chunk's end
    write zeros only)."""
    RQK = NHT * DQK
    bh, c, row0, Lc, mat, t_lo, t_loc, t_ok, q_base, k_base, vec = _score_program(Q, K, S, L, NC, SP, DQK, NHT, BT)
    r_t = _row_decay_term(FV, MROW, vec, t_loc, t_ok, scale)
    q_res, q_res2 = _resident(q_base, t_loc, t_ok, DQK, RQK, BK, 0, Q.dtype.element_ty)
    qn = tl.zeros((BT,), dtype=tl.float32)
    live = t_lo < Lc  # False only for ZERO_REST's programs past the chunk's end
    for j0 in range(0, tl.where(live, t_lo, 0), BS):
        w, s_loc, _ = _weight_tile(q_res, q_res2, j0, q_base, k_base, FV, AV, vec, t_loc, t_ok, r_t, Lc, DQK, RQK,
                                   BS, BK, 0, False, PREC, FAST_EXP2)
        qn += tl.sum(w, 1)
        _store_weights(W, mat, TRI, t_lo, t_loc, t_ok, s_loc, w, PACK, ZERO_REST)
    diag_end = tl.minimum(t_lo + BT, Lc)
    for j0 in range(t_lo, diag_end, BS):
        w, s_loc, _ = _weight_tile(q_res, q_res2, j0, q_base, k_base, FV, AV, vec, t_loc, t_ok, r_t, Lc, DQK, RQK,
                                   BS, BK, 0, True, PREC, FAST_EXP2)
        qn += tl.sum(w, 1)
        _store_weights(W, mat, TRI, t_lo, t_loc, t_ok, s_loc, w, PACK, ZERO_REST)
    if ZERO_REST:
        # the columns from the first one the diagonal tiles left (all of them past the chunk's end) to the block's end
        zero_from = tl.where(live, t_lo + tl.cdiv(diag_end - t_lo, BS) * BS, 0)
        zeros = tl.zeros((BT, BS), dtype=W.dtype.element_ty)
        for j0 in range(zero_from, (t_lo // PACK + 1) * PACK, BS):
            tl.store(_tri_ptrs(W, mat, TRI, t_lo, t_loc, j0 + tl.arange(0, BS), PACK), zeros)
    if HAS_STATE:
        st = bh * (NC + 1) + c
        qn_c = tl.zeros((BT,), dtype=tl.float32)
        for d0 in range(0, DQK, BK):
            offs_d = d0 + tl.arange(0, BK)
            d_ok = offs_d < DQK
            q_t = tl.load(q_base + t_loc[:, None] * RQK + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                          other=0.0)
            qn_c += tl.sum(q_t.to(tl.float32) * tl.load(NST + st * DQK + offs_d, mask=d_ok, other=0.0)[None, :], 1)
        qn += _entering_weight(FV, MROW, MST, vec, t_loc, t_ok, st, scale) * qn_c
    tl.store(QN + vec + t_loc, qn, mask=t_ok)


@triton.jit
def mlstm_scores_bwd_kernel(
    Q, K, V, DH, H, FV, AV, MROW, QN, RS, DQN, DMROW, DS, WR,
    S, L, NC, SP, TRI, scale, eps,
    DQK: tl.constexpr, DHV: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, FAST_EXP2: tl.constexpr, NHT: tl.constexpr, PACK: tl.constexpr,
    NORMALIZE: tl.constexpr, EXP_GATE: tl.constexpr, DO_DS: tl.constexpr = True, DO_WR: tl.constexpr = True,
    ROW_TERMS: tl.constexpr = True,
):
    """For one query tile of one chunk: the per-row terms rs, dqn, dm (from delta = dh.h, as the dq kernel's
    ROW_TERMS; without ROW_TERMS they are inputs, written by mlstm_bwd_rows_kernel for the state pass), then
    dS[t, j] = (dh_t.v_j rs_t + dqn_t) exp(D_tj - m_t)/sqrt(d) and Wr[t, j] = (q_t.k_j) exp(D_tj - m_t)/sqrt(d) rs_t,
    in the input dtype (what the dq, dk and dv kernels of kernels.py cast the same values to before their
    products). BT is a multiple of BS. DO_DS / DO_WR: only one of the two (launch.SPLIT_SCORES_BWD: two launches,
    one accumulator each); the row terms come with dS, and a launch without it reads rs."""
    RQK = NHT * DQK
    RHV = NHT * DHV
    bh, c, row0, Lc, mat, t_lo, t_loc, t_ok, q_base, k_base, vec = _score_program(Q, K, S, L, NC, SP, DQK, NHT, BT)
    v_base = _rows_base(V, bh, row0, S, DHV, NHT)
    dh_base = _rows_base(DH, bh, row0, S, DHV, NHT)
    if DO_DS and ROW_TERMS:
        delta = _row_dot(H, DH, bh, row0 + t_loc, t_ok, S, DHV, BV, NHT)
        rs_t, dqn_t, dm_t = _row_terms(delta, QN, MROW, vec + t_loc, t_ok, eps, NORMALIZE, EXP_GATE)
        tl.store(RS + vec + t_loc, rs_t, mask=t_ok)
        tl.store(DQN + vec + t_loc, dqn_t, mask=t_ok)
        tl.store(DMROW + vec + t_loc, dm_t, mask=t_ok)
    else:
        rs_t = tl.load(RS + vec + t_loc, mask=t_ok, other=0.0)
        if DO_DS:
            dqn_t = tl.load(DQN + vec + t_loc, mask=t_ok, other=0.0)
        else:
            dqn_t = rs_t
    r_t = _row_decay_term(FV, MROW, vec, t_loc, t_ok, scale)
    q_res, q_res2 = _resident(q_base, t_loc, t_ok, DQK, RQK, BK, 0, Q.dtype.element_ty)
    dh_res, dh_res2 = _resident(dh_base, t_loc, t_ok, DHV, RHV, BV, 0, DH.dtype.element_ty)
    for j0 in range(0, t_lo, BS):
        _bwd_score_tile(q_res, q_res2, dh_res, dh_res2, j0, q_base, k_base, v_base, dh_base, FV, AV, DS, WR, mat,
                        TRI, vec, t_lo, t_loc, t_ok, r_t, rs_t, dqn_t, Lc, DQK, DHV, RQK, RHV, BS, BK, BV, False,
                        PREC, FAST_EXP2, PACK, DO_DS, DO_WR)
    for j0 in range(t_lo, tl.minimum(t_lo + BT, Lc), BS):
        _bwd_score_tile(q_res, q_res2, dh_res, dh_res2, j0, q_base, k_base, v_base, dh_base, FV, AV, DS, WR, mat,
                        TRI, vec, t_lo, t_loc, t_ok, r_t, rs_t, dqn_t, Lc, DQK, DHV, RQK, RHV, BS, BK, BV, True,
                        PREC, FAST_EXP2, PACK, DO_DS, DO_WR)


@triton.jit
def _bwd_score_tile(q_res, q_res2, dh_res, dh_res2, j0, q_base, k_base, v_base, dh_base, FV, AV, DS, WR, mat, TRI,
                    vec, t_lo, t_loc, t_ok, r_t, rs_t, dqn_t, Lc, DQK: tl.constexpr, DHV: tl.constexpr,
                    RQK: tl.constexpr, RHV: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    DIAG: tl.constexpr, PREC: tl.constexpr, FAST_EXP2: tl.constexpr, PACK: tl.constexpr,
                    DO_DS: tl.constexpr, DO_WR: tl.constexpr):
    s_loc = j0 + tl.arange(0, BS)
    s_ok = s_loc < Lc
    f_s = tl.load(FV + vec + s_loc, mask=s_ok, other=0.0)
    a_s = tl.load(AV + vec + s_loc, mask=s_ok, other=0.0)
    p = _exp2(r_t[:, None] + ((a_s - f_s) * LOG2E)[None, :], FAST_EXP2)
    keep = (s_loc[None, :] <= t_loc[:, None]) & s_ok[None, :]
    if DO_DS:
        dw = _scores(dh_res, dh_res2, dh_base, t_loc, t_ok, v_base, s_loc, s_ok, DHV, RHV, BV, 0, True, DIAG, PREC)
        ds = (dw * rs_t[:, None] + dqn_t[:, None]) * p
        if DIAG:
            ds = tl.where(keep, ds, 0.0)
        tl.store(_tri_ptrs(DS, mat, TRI, t_lo, t_loc, s_loc, PACK), ds.to(DS.dtype.element_ty), mask=t_ok[:, None])
    if DO_WR:
        sc = _scores(q_res, q_res2, q_base, t_loc, t_ok, k_base, s_loc, s_ok, DQK, RQK, BK, 0, True, DIAG, PREC)
        wr = sc * (p * rs_t[:, None])
        if DIAG:
            wr = tl.where(keep, wr, 0.0)
        tl.store(_tri_ptrs(WR, mat, TRI, t_lo, t_loc, s_loc, PACK), wr.to(WR.dtype.element_ty), mask=t_ok[:, None])


@triton.jit
def _product_program(X, S, L, NC, SP, D: tl.constexpr, NHT: tl.constexpr, ROWS: tl.constexpr, BO: tl.constexpr):
    """Where a program of the products kernels works (grid: row tiles of ROWS inside a chunk, output slices of BO,
    B*NH*NC): its slice index, _chunk_program's values, output columns, x's base at the chunk's first row and a zero
    accumulator."""
    pid_o = tl.program_id(1)
    bh, c, row0, Lc, mat, r_lo, rows, r_ok, vec = _chunk_program(tl.program_id(2), tl.program_id(0), S, L, NC, SP,
                                                                  ROWS)
    return (pid_o, bh, c, row0, Lc, mat, r_lo, rows, r_ok, vec, pid_o * BO + tl.arange(0, BO),
            _rows_base(X, bh, row0, S, D, NHT), tl.zeros((ROWS, BO), dtype=tl.float32))


@triton.jit
def _store_slice(OUT, Y, RSUM, acc, bh, row0, pid_o, rows, r_ok, offs_o, vec, S, NC, SP, D: tl.constexpr,
                 NHT: tl.constexpr, ROW_DOT: tl.constexpr):
    """Store an output slice [rows, offs_o] of the products kernels (rows local to the chunk at row0); with ROW_DOT
    also sum_o y[row, o] out[row, o] (float32) at RSUM[pid_o, bh, row] ([slices, BNH, SP]: the gate gradients add the
    slices up)."""
    R = NHT * D
    out_ok = r_ok[:, None] & (offs_o[None, :] < D)
    tl.store(_rows_base(OUT, bh, row0, S, D, NHT) + rows[:, None] * R + offs_o[None, :],
             acc.to(OUT.dtype.element_ty), mask=out_ok)
    if ROW_DOT:
        y = tl.load(_rows_base(Y, bh, row0, S, D, NHT) + rows[:, None] * R + offs_o[None, :], mask=out_ok,
                    other=0.0)
        tl.store(RSUM + pid_o * (tl.num_programs(2) // NC) * SP + vec + rows, tl.sum(y.to(tl.float32) * acc, 1),
                 mask=r_ok)


@triton.jit
def mlstm_score_rows_kernel(
    M, X, OUT, Y, RSUM,
    S, L, NC, SP, TRI, QN, MROW, eps,
    A, ST, NV, FV, MST, RS, DQN, scale,
    D: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BO: tl.constexpr,
    PREC: tl.constexpr, NHT: tl.constexpr, PACK: tl.constexpr,
    NORMALIZE: tl.constexpr, EXP_GATE: tl.constexpr, ROW_DOT: tl.constexpr,
    STATE: tl.constexpr = 0, DA: tl.constexpr = 16, SW: tl.constexpr = 16, BD: tl.constexpr = 64,
):
    """out[t, o-slice] = sum_{j <= t} M[t, j] x[j, o-slice] for one query tile of one chunk and output slice: h = W v
    in the forward (NORMALIZE: divided by the denominator from qn and m), dq = dS k in the backward (ROW_DOT: with the
    row sums y.out of this slice, y = q, stored at RSUM[pid_o]). BT is a multiple of BS.
    STATE adds the entering chunk state's term, g_t times: 1 (h) q_t C_c[:, o-slice]; 2 (dq)
    rs_t dh_t C_c^T[:, o-slice] + dqn_t n_c[o-slice]. A: q or dh (DA wide), ST: C ([DQK, DHV], rows SW apart),
    NV: n, FV / MST: the gate vector F and the chunks' max states, RS / DQN: rs and dqn."""
    R = NHT * D
    pid_o, bh, c, row0, Lc, mat, t_lo, t_loc, t_ok, vec, offs_o, x_base, acc = _product_program(X, S, L, NC, SP, D,
                                                                                                NHT, BT, BO)
    # The state term first, weighted in place, so that the products over the matrix add to the same accumulator: one
    # [BT, BO] float32 tile live instead of two. For sm_90 (Triton 3.6, DH 512, shipped tiles) 194 -> 158 registers,
    # three blocks per SM instead of two: 536 -> 473 us per call on the H100 at S 4096 (score_cols 521 -> 481). The
    # 128-row tiles the freed registers also allow did not win (bench/results/session19/).
    if STATE != 0:
        st = bh * (NC + 1) + c
        g = _entering_weight(FV, MROW, MST, vec, t_loc, t_ok, st, scale)
        if STATE == 1:  # h: q [*, DQK] times C [DQK, DHV = D]
            acc = _state_product(acc, A, ST, bh, row0, t_loc, t_ok, offs_o, S, st, DA, D, SW, 1, BD, PREC, NHT)
            acc = acc * g[:, None]
        else:  # dq: dh [*, DHV] times C^T [DHV, DQK = D]
            acc = _state_product(acc, A, ST, bh, row0, t_loc, t_ok, offs_o, S, st, DA, D, 1, SW, BD, PREC, NHT)
            rs_t = tl.load(RS + vec + t_loc, mask=t_ok, other=0.0)
            dqn_t = tl.load(DQN + vec + t_loc, mask=t_ok, other=0.0)
            n_o = tl.load(NV + st * D + offs_o, mask=offs_o < D, other=0.0)
            acc = acc * (g * rs_t)[:, None] + (g * dqn_t)[:, None] * n_o[None, :]
    for j0 in range(0, t_lo, BS):
        s_loc = j0 + tl.arange(0, BS)
        m = tl.load(_tri_ptrs(M, mat, TRI, t_lo, t_loc, s_loc, PACK))
        x = _load_rows(x_base, s_loc, s_loc < Lc, offs_o, D, R, False, D % BO != 0)
        acc += tl.dot(m, x, input_precision=PREC)
    for j0 in range(t_lo, tl.minimum(t_lo + BT, Lc), BS):
        s_loc = j0 + tl.arange(0, BS)
        s_ok = s_loc < Lc
        m = tl.load(_tri_ptrs(M, mat, TRI, t_lo, t_loc, s_loc, PACK),
                    mask=(s_loc[None, :] <= t_loc[:, None]) & s_ok[None, :], other=0.0)
        x = _load_rows(x_base, s_loc, s_ok, offs_o, D, R, True, D % BO != 0)
        acc += tl.dot(m, x, input_precision=PREC)
    if NORMALIZE:
        qn = tl.load(QN + vec + t_loc, mask=t_ok, other=0.0)
        m_t = tl.load(MROW + vec + t_loc, mask=t_ok, other=0.0)
        acc = acc / _denominator(qn, m_t, eps, EXP_GATE)[:, None]
    _store_slice(OUT, Y, RSUM, acc, bh, row0, pid_o, t_loc, t_ok, offs_o, vec, S, NC, SP, D, NHT, ROW_DOT)


@triton.jit
def _scaled_rows(x_base, XS, vec, t_loc, t_ok, offs_o, D: tl.constexpr, R: tl.constexpr, BO: tl.constexpr,
                 X_ROW_SCALE: tl.constexpr):
    """Rows t_loc of x's output slice (mlstm_score_cols_kernel), times XS[vec + t] with X_ROW_SCALE."""
    x = _load_rows(x_base, t_loc, t_ok, offs_o, D, R, True, D % BO != 0)
    if X_ROW_SCALE:
        xs = tl.load(XS + vec + t_loc, mask=t_ok, other=0.0)
        x = (x.to(tl.float32) * xs[:, None]).to(x.dtype)
    return x


@triton.jit
def mlstm_score_cols_kernel(
    M, X, OUT, Y, RSUM, XS,
    S, L, NC, SP, TRI,
    A, ST, NV, FV, AV, MROW,
    D: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BO: tl.constexpr,
    PREC: tl.constexpr, NHT: tl.constexpr, PACK: tl.constexpr, ROW_DOT: tl.constexpr,
    STATE: tl.constexpr = 0, DA: tl.constexpr = 16, SW: tl.constexpr = 16, BD: tl.constexpr = 64,
    X_ROW_SCALE: tl.constexpr = False,
):
    """out[j, o-slice] = sum_{t >= j} M[t, j] x[t, o-slice] for one key tile of one chunk and output slice:
    dk = dS^T q and dv = Wr^T dh in the backward (ROW_DOT: with the row sums y.out of this slice, y = k, stored at
    RSUM[pid_o]). BS is a multiple of BT: the query tiles inside the key tile's rows take the causal mask.
    X_ROW_SCALE: x's rows scaled by XS ([BNH, SP], float32) before the products, rounded to x's dtype: dv = W^T (rs dh)
    from the forward's kept weights W (launch.KEEP_SCORES), which is Wr^T dh without forming Wr.
    STATE adds the leaving chunk state's gradient term, e_j times: 1 (dk) v_j dC_{c+1}^T[:, o-slice] +
    dn_{c+1}[o-slice]; 2 (dv) k_j dC_{c+1}[:, o-slice]. A: v or k (DA wide), ST: dC ([DQK, DHV], rows SW apart),
    NV: dn, FV / AV / MROW: the gate vectors."""
    R = NHT * D
    pid_o, bh, c, row0, Lc, mat, s_lo, s_loc, s_ok, vec, offs_o, x_base, acc = _product_program(X, S, L, NC, SP, D,
                                                                                                NHT, BS, BO)
    if STATE != 0:  # first, into the one accumulator (as in mlstm_score_rows_kernel)
        st = bh * (NC + 1) + c + 1
        if STATE == 1:  # dk: v [*, DHV] times dC^T [DHV, DQK = D], plus dn
            acc = _state_product(acc, A, ST, bh, row0, s_loc, s_ok, offs_o, S, st, DA, D, 1, SW, BD, PREC, NHT)
            acc += tl.load(NV + st * D + offs_o, mask=offs_o < D, other=0.0)[None, :]
        else:  # dv: k [*, DQK] times dC [DQK, DHV = D]
            acc = _state_product(acc, A, ST, bh, row0, s_loc, s_ok, offs_o, S, st, DA, D, SW, 1, BD, PREC, NHT)
        acc = acc * _leaving_weight(FV, AV, MROW, vec, s_loc, s_ok, Lc)[:, None]
    for t0 in range(s_lo, tl.minimum(s_lo + BS, Lc), BT):
        t_loc = t0 + tl.arange(0, BT)
        t_ok = t_loc < Lc
        m = tl.load(_tri_ptrs(M, mat, TRI, t0, t_loc, s_loc, PACK),
                    mask=(s_loc[None, :] <= t_loc[:, None]) & t_ok[:, None], other=0.0)
        x = _scaled_rows(x_base, XS, vec, t_loc, t_ok, offs_o, D, R, BO, X_ROW_SCALE)
        acc += tl.dot(tl.trans(m), x, input_precision=PREC)
    for t0 in range(s_lo + BS, Lc, BT):
        t_loc = t0 + tl.arange(0, BT)
        t_ok = t_loc < Lc
        m = tl.load(_tri_ptrs(M, mat, TRI, t0, t_loc, s_loc, PACK), mask=t_ok[:, None], other=0.0)
        x = _scaled_rows(x_base, XS, vec, t_loc, t_ok, offs_o, D, R, BO, X_ROW_SCALE)
        acc += tl.dot(tl.trans(m), x, input_precision=PREC)
    _store_slice(OUT, Y, RSUM, acc, bh, row0, pid_o, s_loc, s_ok, offs_o, vec, S, NC, SP, D, NHT, ROW_DOT)
