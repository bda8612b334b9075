"""Raw Triton kernels of the tiled mLSTM (TFLA), forward and backward. Launch wrappers live in launch.py.

Layout shared by every kernel (see function.py for how the vectors are made):
- q, k [B*NH, S, DQK], v, h, dh [B*NH, S, DHV], contiguous, any S; rows are split into NC chunks of L rows
  (the last may be short); a chunk index c and a row t inside it address global row c*L + t.
- Per-row float32 vectors are [B*NH, SP] with SP = NC*L (padded at the end only), so global row s sits at s:
  F_t (log forget gates summed from the chunk's start), a_j (log input gate), m_t (max state; 0 for gate="sig"),
  qn_t (normaliser sum), rs_t = 1/denominator, dqn_t.
  The decay matrix is exp(D_tj - m_t) = exp(F_t - F_j + a_j - m_t) for j <= t inside a chunk, computed in the
  reference's order so that float32 results track it (a factored exp(r_t + u_j) loses digits once |F| is large).
- Chunk states [B*NH, NC+1, DQK, DHV] (C), [B*NH, NC+1, DQK] (n), [B*NH, NC+1] (m): index c is the state entering
  chunk c, index NC the final state. The entering state reaches row t with weight g_t = exp(F_t + m_c - m_t); key j
  enters the leaving state with weight e_j = exp(F_last - F_j + a_j - m_last), the old state with
  carry = exp(F_last + m_c - m_last). C and its gradient are float32, or the input dtype where only products read
  them (function.LOW_PRECISION_STATES): every product rounds a state to the input dtype before its dot, so storing
  it rounded gives the same bits at half the bytes; the state kernels' recurrences stay float32 in registers.
- 1/sqrt(DQK) multiplies the query-key weights (`scale`); q is never rescaled in memory.
- In the matrix kernels the decay is one exp2 per element: exp(D_tj - m_t) = 2^(r_t + b_j) with the row term
  r_t = (F_t - m_t) log2(e) and the key term b_j = (a_j - F_j) log2(e), formed once per tile from the vectors (the
  1/sqrt(DQK) joins one of them as log2(scale)). On CUDA (FAST_EXP2) the exp2 is a single flush-to-zero MUFU.EX2:
  tl.exp would add a multiply and a four-instruction denormal fix-up per element. The kernels wait on the latency of
  this elementwise chain, with the tensor cores 12-33 % busy (bench/results/ncu_mlstm_h100.md). Rows past the
  sequence's end get r_t = -inf in the key-side kernels, so their weights vanish without a per-element mask.
  The exp2 itself is not what they wait on: session 21 took it out of every tile off the diagonal (2^(r_t + b_j) =
  2^(r_t - R) 2^(b_j + R), R the query tile's largest row term, so both factors are <= 1; one factor applied to
  the accumulator once, the other one exp2 per row of a tile: half the MUFU per thread in fwd_h and dq, 15 % fewer
  instructions in dkdv's loop). Exact and GPU-checked, it changed fwd+bwd GPU time by -1.4 to +1.7 % on an H100
  (bench/results/session21/ab_factored_decay.log), so it was removed again (commit b96a6e0 has it).
Matrix products take operands in the input dtype and accumulate in float32. Every output element is written by
exactly one program, with a fixed order of arithmetic, so results are identical run to run. The one atomic is a
ticket counter that picks which program computes a row's gate gradients (mlstm_bwd_dkdv_kernel's GATES_BWD), not
what it computes.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x. FAST (CUDA): one ex2.approx.ftz, written out so that no Triton version's lowering can add a denormal
    fix-up (Triton 3.8 compiles tl.exp2 to the same instruction; the H100 runs were on 3.6 with this form). A weight
    under 2^-126 beside a row maximum of 1 (or, for gate="sig", beside the normaliser's floor of 1) is zero at any
    precision kept here. Else (Triton's CPU interpreter, which has no inline PTX) tl.exp2."""
    if FAST:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def _load_rows(base, rows, row_ok, cols, NCOLS: tl.constexpr, ROWSTRIDE: tl.constexpr, CHECK_ROWS: tl.constexpr,
               CHECK_COLS: tl.constexpr):
    """Tile [rows, cols] of a row-major [*, NCOLS] matrix, zero outside; masks only where a bound can be crossed
    (unmasked loads vectorise, and off-diagonal tiles never cross the sequence's end)."""
    ptrs = base + rows[:, None] * ROWSTRIDE + cols[None, :]
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < NCOLS), other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < NCOLS, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _load_vec(ptr, offs, ok, CHECK: tl.constexpr):
    if CHECK:
        x = tl.load(ptr + offs, mask=ok, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def _rows_base(PTR, bh, row0, S, D: tl.constexpr, NHT: tl.constexpr):
    """Row row0 of (batch, head) bh = b * NH + head of a [B, NH, S, D] tensor stored as [B, S, NHT, D]: NHT = 1 is
    the contiguous [B*NH, S, D] layout (rows D apart), NHT = NH the token-major one, a [B, NH, S, D] view of
    [B, S, NH * D] (rows NH * D apart: what a model's projections produce, read without a transposing copy)."""
    return PTR + ((bh // NHT) * S + row0) * (NHT * D) + (bh % NHT) * D


@triton.jit
def _load_piece(base, rows, row_ok, C0: tl.constexpr, W: tl.constexpr, NCOLS: tl.constexpr, ROWSTRIDE: tl.constexpr,
                CHECK_ROWS: tl.constexpr):
    """Columns [C0, C0 + W) of a row-major [*, NCOLS] matrix (a head-dim piece, see _scores), zero past NCOLS."""
    return _load_rows(base, rows, row_ok, C0 + tl.arange(0, W), NCOLS, ROWSTRIDE, CHECK_ROWS, C0 + W > NCOLS)


@triton.jit
def _scores(a_res, a_res2, a_base, a_rows, a_ok, b_base, b_rows, b_ok, D: tl.constexpr, ROWSTRIDE: tl.constexpr,
            BD: tl.constexpr,
            BD2: tl.constexpr, CHECK_A: tl.constexpr, CHECK_B: tl.constexpr, PREC: tl.constexpr):
    """a b^T over a head dim of D: [len(a_rows), len(b_rows)] in float32. With D <= BD + BD2, a_res (columns [0, BD))
    and, when BD2 > 0, a_res2 (columns [BD, BD + BD2)) hold a's whole tile, loaded once by the caller (_resident).
    Two pieces cover a head dim that is not a power of two without padding it to one: 96 = 64 + 32, 192 = 128 + 64
    (a padded 128 or 256 wastes a quarter to a third of every product). Otherwise both operands are read in BD-wide
    slices."""
    if D <= BD + BD2:
        b = _load_piece(b_base, b_rows, b_ok, 0, BD, D, ROWSTRIDE, CHECK_B)
        acc = tl.dot(a_res, tl.trans(b), input_precision=PREC)
        if BD2 > 0:
            b2 = _load_piece(b_base, b_rows, b_ok, BD, BD2, D, ROWSTRIDE, CHECK_B)
            acc += tl.dot(a_res2, tl.trans(b2), input_precision=PREC)
    else:
        acc = tl.zeros((a_rows.shape[0], b_rows.shape[0]), dtype=tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            a = _load_rows(a_base, a_rows, a_ok, offs_d, D, ROWSTRIDE, CHECK_A, D % BD != 0)
            b = _load_rows(b_base, b_rows, b_ok, offs_d, D, ROWSTRIDE, CHECK_B, D % BD != 0)
            acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    return acc


@triton.jit
def _resident(base, rows, row_ok, D: tl.constexpr, ROWSTRIDE: tl.constexpr, BD: tl.constexpr, BD2: tl.constexpr,
              DTYPE: tl.constexpr):
    """The whole [rows, D] tile as _scores takes it: pieces [rows, BD] and [rows, BD2] (a dummy when BD2 = 0), or two
    dummies when D does not fit them."""
    if D <= BD + BD2:
        x = _load_piece(base, rows, row_ok, 0, BD, D, ROWSTRIDE, True)
        if BD2 > 0:
            x2 = _load_piece(base, rows, row_ok, BD, BD2, D, ROWSTRIDE, True)
        else:
            x2 = tl.zeros((rows.shape[0], 16), dtype=DTYPE)
    else:
        x = tl.zeros((rows.shape[0], 16), dtype=DTYPE)
        x2 = tl.zeros((rows.shape[0], 16), dtype=DTYPE)
    return x, x2


@triton.jit
def _piece_cols(C0: tl.constexpr, W: tl.constexpr):
    """Column indices [C0, C0 + W) of a second head-dim piece; a small unused range when W = 0."""
    if W > 0:
        cols = C0 + tl.arange(0, W)
    else:
        cols = C0 + tl.arange(0, 16)
    return cols


@triton.jit
def _acc_piece(ROWS: tl.constexpr, W: tl.constexpr):
    """A float32 accumulator for a second head-dim piece of width W; a small unused one when W = 0."""
    if W > 0:
        acc = tl.zeros((ROWS, W), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, 16), dtype=tl.float32)
    return acc


@triton.jit
def _product_into_pieces(acc, acc2, w, base, rows, row_ok, offs, D: tl.constexpr, ROWSTRIDE: tl.constexpr,
                         B1: tl.constexpr, B2: tl.constexpr, CHECK_ROWS: tl.constexpr, PREC: tl.constexpr):
    """acc += w x[rows, offs] for the B1-wide output slice at offs; with B2 > 0, one program covers all D columns
    instead: acc += w x[rows, :B1], acc2 += w x[rows, B1:B1 + B2] (the query-side kernels' second output piece)."""
    if B2 > 0:
        x = _load_piece(base, rows, row_ok, 0, B1, D, ROWSTRIDE, CHECK_ROWS)
        x2 = _load_piece(base, rows, row_ok, B1, B2, D, ROWSTRIDE, CHECK_ROWS)
        acc2 += tl.dot(w.to(x2.dtype), x2, input_precision=PREC)
    else:
        x = _load_rows(base, rows, row_ok, offs, D, ROWSTRIDE, CHECK_ROWS, D % B1 != 0)
    acc += tl.dot(w.to(x.dtype), x, input_precision=PREC)
    return acc, acc2


@triton.jit
def _state_piece_dot(a, state, PREC: tl.constexpr):
    """a [R, K] (the input dtype) times a float32 chunk-state slice [K, W] for a second head-dim piece (W = BV2,
    BKO2, BK2 of _scores), computed as (state^T a^T)^T. Why transposed: the plain tl.dot(a, state.to(a.dtype)) with
    W = 32 (DH 96 = 64 + 32) faulted on an H200 with Triton 3.6, an out-of-range shared-memory address in the dkdv
    kernel (compute-sanitizer) and NaN rows in fwd_h, though the interpreter computes it right; with the converted
    state as the left operand (or the product in tf32, or padded to 64 wide) every state variant matches float64
    (bench/results/pieces_states_fault_h200.log)."""
    return tl.trans(tl.dot(tl.trans(state.to(a.dtype)), tl.trans(a), input_precision=PREC))


@triton.jit
def _gate_tile(IG, FG, g_base, rows, ok, F_before, EXP_GATE: tl.constexpr):
    """For mlstm_fwd_h_kernel's GATES_FWD: F (the log forget gates summed from the chunk's start, F_before being the
    sum over the rows before `rows`) and a, the log input gate, of a tile of rows (0 outside `ok`, as
    mlstm_gates_fwd_kernel pads), and the sum to carry to the next tile."""
    lf = tl.where(ok, _logsigmoid(tl.load(FG + g_base + rows, mask=ok, other=0.0).to(tl.float32)), 0.0)
    x = tl.load(IG + g_base + rows, mask=ok, other=0.0).to(tl.float32)
    if EXP_GATE:
        a = tl.where(ok, x, 0.0)
    else:
        a = tl.where(ok, _logsigmoid(x), 0.0)
    return F_before + tl.cumsum(lf, 0), a, F_before + tl.sum(lf, 0)


@triton.jit
def _weight_tile(q_res, q_res2, j0, q_base, k_base, FV, AV, vec, t_loc, t_ok, r_t, Lc, DQK: tl.constexpr,
                 RQK: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr, DIAG: tl.constexpr,
                 PREC: tl.constexpr, FAST_EXP2: tl.constexpr):
    """The forward's weights (q_t.k_j) exp(D_tj - m_t)/sqrt(d) [BT, BS] (float32) of the key tile at j0, zero above
    the diagonal and past the chunk's end, with the key rows and their mask. r_t: the row term, log2(scale) included.
    DIAG: the tile straddles the causal diagonal or the sequence's end, so it takes the masks."""
    s_loc = j0 + tl.arange(0, BS)
    s_ok = s_loc < Lc
    f_s = _load_vec(FV + vec, s_loc, s_ok, DIAG)
    a_s = _load_vec(AV + vec, s_loc, s_ok, DIAG)
    b_s = (a_s - f_s) * LOG2E
    sc = _scores(q_res, q_res2, q_base, t_loc, t_ok, k_base, s_loc, s_ok, DQK, RQK, BK, BK2, True, DIAG, PREC)
    w = sc * _exp2(r_t[:, None] + b_s[None, :], FAST_EXP2)
    if DIAG:
        w = tl.where((s_loc[None, :] <= t_loc[:, None]) & s_ok[None, :], w, 0.0)
    return w, s_loc, s_ok


@triton.jit
def _fwd_h_tile(acc, acc2, qn, q_res, q_res2, j0, q_base, k_base, v_base, FV, AV, vec, t_loc, t_ok, r_t, Lc, offs_v,
                DQK: tl.constexpr, DHV: tl.constexpr, RQK: tl.constexpr, RHV: tl.constexpr,
                BS: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr,
                BV: tl.constexpr, BV2: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr,
                FAST_EXP2: tl.constexpr):
    w, s_loc, s_ok = _weight_tile(q_res, q_res2, j0, q_base, k_base, FV, AV, vec, t_loc, t_ok, r_t, Lc, DQK, RQK, BS,
                                  BK, BK2, DIAG, PREC, FAST_EXP2)
    qn += tl.sum(w, 1)
    acc, acc2 = _product_into_pieces(acc, acc2, w, v_base, s_loc, s_ok, offs_v, DHV, RHV, BV, BV2, DIAG, PREC)
    return acc, acc2, qn


@triton.jit
def _denominator(qn, m_t, eps, EXP_GATE: tl.constexpr):
    """The normaliser's denominator max(|qn_t|, exp(-m_t)) + eps (the floor is 1 for gate="sig")."""
    if EXP_GATE:
        lower = tl.exp(-m_t)
    else:
        lower = tl.full(qn.shape, 1.0, tl.float32)
    return tl.maximum(tl.abs(qn), lower) + eps


@triton.jit
def mlstm_fwd_h_kernel(
    Q, K, V, H, FV, AV, MROW, QN, CST, NST, MST, IG, FG,
    S, L, NC, SP, scale, eps,
    DQK: tl.constexpr, DHV: tl.constexpr,
    HAS_INIT: tl.constexpr, NORMALIZE: tl.constexpr, EXP_GATE: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr, BV2: tl.constexpr,
    PREC: tl.constexpr, FAST_EXP2: tl.constexpr,
    NHT: tl.constexpr, GATES_FWD: tl.constexpr = False, GT: tl.constexpr = 16,
):
    """h[t, v-slice] for one query tile of one chunk: sum_j (q_t.k_j) exp(D_tj-m_t) v_j + g_t q_t C_c, normalised.
    BT is a multiple of BS: key tiles before the query tile's first row need no mask, those from it on do.
    BK2 / BV2 > 0: q and h in two head-dim pieces (_scores); with BV2 one program covers all of h's columns.
    GATES_FWD (one chunk, no states): the gate vectors come from the gates IG, FG [BNH, S] here instead of from a
    mlstm_gates_fwd_kernel launch before. Each program first walks the rows up to its query tile's end in GT-row
    tiles from the chunk's start, writes F and a there (every program that writes a row writes the same bits: a
    row's value depends only on the rows before it and the fixed tiling), and takes the max of a - F before its query
    tile; after a barrier the key loops read the vectors as without GATES_FWD. The programs of h's first column
    slice write m for their rows and the max states, for the backward."""
    RQK = NHT * DQK  # row strides of q / k and v / h (see _rows_base)
    RHV = NHT * DHV
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bc = tl.program_id(2)
    bh = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    row0 = c * L
    Lc = tl.minimum(L, S - row0)
    t_lo = pid_t * BT
    t_loc = t_lo + tl.arange(0, BT)
    t_ok = t_loc < Lc
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DHV
    q_base = _rows_base(Q, bh, row0, S, DQK, NHT)
    k_base = _rows_base(K, bh, row0, S, DQK, NHT)
    v_base = _rows_base(V, bh, row0, S, DHV, NHT)
    vec = bh * SP + row0
    if GATES_FWD:
        g_base = bh * S + row0
        t_hi = tl.minimum(t_lo + BT, Lc)
        F_before = tl.sum(tl.zeros((GT,), dtype=tl.float32), 0)  # tensors: the loop carries them
        M_before = tl.max(tl.full((GT,), -float("inf"), tl.float32), 0)
        for j0 in range(0, t_hi, GT):
            rows = j0 + tl.arange(0, GT)
            ok = rows < t_hi
            f_g, a_g, F_before = _gate_tile(IG, FG, g_base, rows, ok, F_before, EXP_GATE)
            tl.store(FV + vec + rows, f_g, mask=ok)
            tl.store(AV + vec + rows, a_g, mask=ok)
            M_before = tl.maximum(M_before, tl.max(tl.where(rows < t_lo, a_g - f_g, -float("inf")), 0))
        tl.debug_barrier()  # the vectors this program wrote, for all of its threads
        f_t = tl.load(FV + vec + t_loc, mask=t_ok, other=0.0)
        if EXP_GATE:  # m_t = F_t + max_{j <= t} (a_j - F_j): no initial state, so no entering max state
            a_t = tl.load(AV + vec + t_loc, mask=t_ok, other=0.0)
            m_t = f_t + tl.maximum(M_before, tl.associative_scan(a_t - f_t, 0, _maximum))
            m_entering = -float("inf")
        else:
            m_t = tl.zeros((BT,), dtype=tl.float32)
            m_entering = 0.0
        if pid_v == 0:
            tl.store(MROW + vec + t_loc, m_t, mask=t_ok)
            if pid_t == 0:
                tl.store(MST + bh * 2, m_entering)
            tl.store(MST + bh * 2 + 1 + t_loc * 0, m_t, mask=t_loc == Lc - 1)  # the final max state
    else:
        f_t = tl.load(FV + vec + t_loc, mask=t_ok, other=0.0)
        m_t = tl.load(MROW + vec + t_loc, mask=t_ok, other=0.0)
    q_res, q_res2 = _resident(q_base, t_loc, t_ok, DQK, RQK, BK, BK2, Q.dtype.element_ty)
    r_t = (f_t - m_t) * LOG2E + tl.log2(scale)

    acc = tl.zeros((BT, BV), dtype=tl.float32)
    acc2 = _acc_piece(BT, BV2)
    qn = tl.zeros((BT,), dtype=tl.float32)
    for j0 in range(0, t_lo, BS):
        acc, acc2, qn = _fwd_h_tile(acc, acc2, qn, q_res, q_res2, j0, q_base, k_base, v_base, FV, AV, vec, t_loc,
                                    t_ok, r_t, Lc, offs_v, DQK, DHV, RQK, RHV, BS, BK, BK2, BV, BV2, False, PREC,
                                    FAST_EXP2)
    for j0 in range(t_lo, tl.minimum(t_lo + BT, Lc), BS):
        acc, acc2, qn = _fwd_h_tile(acc, acc2, qn, q_res, q_res2, j0, q_base, k_base, v_base, FV, AV, vec, t_loc,
                                    t_ok, r_t, Lc, offs_v, DQK, DHV, RQK, RHV, BS, BK, BK2, BV, BV2, True, PREC,
                                    FAST_EXP2)
    offs_v2 = _piece_cols(BV, BV2)
    v2_ok = offs_v2 < DHV

    if HAS_INIT:
        st = bh * (NC + 1) + c
        m_c = tl.load(MST + st)
        g = tl.where(t_ok, tl.exp(f_t + m_c - m_t) * scale, 0.0)
        acc_c = tl.zeros((BT, BV), dtype=tl.float32)
        acc_c2 = _acc_piece(BT, BV2)
        qn_c = tl.zeros((BT,), dtype=tl.float32)
        for d0 in range(0, DQK, BK):
            offs_d = d0 + tl.arange(0, BK)
            d_ok = offs_d < DQK
            q_t = tl.load(q_base + t_loc[:, None] * RQK + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            c_base = CST + st * DQK * DHV + offs_d[:, None] * DHV
            c_dv = tl.load(c_base + offs_v[None, :], mask=d_ok[:, None] & v_ok[None, :], other=0.0)
            acc_c += tl.dot(q_t, c_dv.to(q_t.dtype), input_precision=PREC)
            if BV2 > 0:
                c_dv2 = tl.load(c_base + offs_v2[None, :], mask=d_ok[:, None] & v2_ok[None, :], other=0.0)
                acc_c2 += _state_piece_dot(q_t, c_dv2, PREC)
            n_d = tl.load(NST + st * DQK + offs_d, mask=d_ok, other=0.0)
            qn_c += tl.sum(q_t.to(tl.float32) * n_d[None, :], 1)
        acc += g[:, None] * acc_c
        acc2 += g[:, None] * acc_c2
        qn += g * qn_c

    if NORMALIZE:
        denom = _denominator(qn, m_t, eps, EXP_GATE)
        acc = acc / denom[:, None]
        acc2 = acc2 / denom[:, None]
    h_base = _rows_base(H, bh, row0, S, DHV, NHT)
    tl.store(h_base + t_loc[:, None] * RHV + offs_v[None, :], acc.to(H.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])
    if BV2 > 0:
        tl.store(h_base + t_loc[:, None] * RHV + offs_v2[None, :], acc2.to(H.dtype.element_ty),
                 mask=t_ok[:, None] & v2_ok[None, :])
    tl.store(QN + vec + t_loc, qn, mask=t_ok & (pid_v == 0))


@triton.jit
def _state_tile(pid_k, pid_v, DQK, DHV, BK: tl.constexpr, BV: tl.constexpr):
    """Rows (along DQK) and columns (along DHV) of state tile (pid_k, pid_v), with their masks."""
    offs_d = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    return offs_d, offs_d < DQK, offs_v, offs_v < DHV


@triton.jit
def _store_state(X, st, acc, offs_d, d_ok, offs_v, v_ok, DQK, DHV):
    """A state tile into X [*, DQK, DHV] at state index st. For the parallel state kernels; the sequential ones keep
    their offsets outside the chunk loop (with this helper inside it, the forward's 32 x 64 tile spilled on sm_90)."""
    tl.store(X + st * DQK * DHV + offs_d[:, None] * DHV + offs_v[None, :], acc, mask=d_ok[:, None] & v_ok[None, :])


@triton.jit
def _chunk_carry(FV, MROW, MST, bh, c, S, L, NC, SP):
    """exp(F_last + m_c - m_last): the decay that a state entering chunk c carries to the chunk's end, where it is
    stabilised by the last row's max state (see mlstm_fwd_state_kernel)."""
    Lc = tl.minimum(L, S - c * L)
    last = bh * SP + c * L + Lc - 1
    return tl.exp(tl.load(FV + last) + tl.load(MST + bh * (NC + 1) + c) - tl.load(MROW + last))


@triton.jit
def _entering_weight(FV, MROW, MST, vec, t_loc, t_ok, st, scale):
    """g_t = exp(F_t + m_c - m_t) / sqrt(d): the weight with which the state entering the chunk (index st of the
    chunk states) reaches query row t (this module's docstring), zero past the chunk."""
    f_t = tl.load(FV + vec + t_loc, mask=t_ok, other=0.0)
    m_t = tl.load(MROW + vec + t_loc, mask=t_ok, other=0.0)
    return tl.where(t_ok, tl.exp(f_t + tl.load(MST + st) - m_t) * scale, 0.0)


@triton.jit
def _leaving_weight(FV, AV, MROW, vec, s_loc, s_ok, Lc):
    """e_j = exp(F_last - F_j + a_j - m_last): the weight with which key row j enters the state leaving the chunk,
    zero past the chunk."""
    f_s = tl.load(FV + vec + s_loc, mask=s_ok, other=0.0)
    a_s = tl.load(AV + vec + s_loc, mask=s_ok, other=0.0)
    f_last = tl.load(FV + vec + Lc - 1)
    m_last = tl.load(MROW + vec + Lc - 1)
    return tl.where(s_ok, tl.exp(f_last - f_s + a_s - m_last), 0.0)


@triton.jit
def _chunk_gate_vectors(IG, FG, M0, FV, AV, MROW, MST, bh, c, S, L, NC, SP, EXP_GATE: tl.constexpr,
                        HAS_M0: tl.constexpr, GL: tl.constexpr, GW: tl.constexpr):
    """Chunk c's gate vectors as mlstm_gates_fwd_kernel makes them (F, a, m for the padded chunk's rows, and the max
    state leaving it; chunk 0 also the entering one), from the gates alone. The max state entering chunk c comes from
    a walk over the rows before it, GW rows a step (m' = max(m + F_last, F_last + max_j (a_j - F_j)) over a step's
    rows, F summed from the step's start): a program of the last chunk at S 4096 takes 2 steps of 2048 rows, where
    one chunk a step took 31 chains of a cumsum and two reductions. The grouping of F's sums differs from
    mlstm_gates_fwd_kernel's by rounding only; m is the stabiliser, and every kernel reads the values written here.
    Every program of the chunk writes the same bits."""
    offs = tl.arange(0, GL)
    full = offs < L
    if EXP_GATE:
        if HAS_M0:
            m_in = tl.load(M0 + bh).to(tl.float32)
        else:
            m_in = tl.max(tl.full((GL,), -float("inf"), tl.float32), 0)
        walk = tl.arange(0, GW)
        before = c * L  # the rows of the chunks before c, all full
        for r0 in range(0, before, GW):
            rows = r0 + walk
            ok = rows < before
            # rows past `before` add 0 to the cumsum: its last entry is the step's total
            fw = tl.cumsum(tl.where(ok, _logsigmoid(tl.load(FG + bh * S + rows, mask=ok, other=0.0).to(tl.float32)),
                                    0.0), 0)
            a = tl.load(IG + bh * S + rows, mask=ok, other=0.0).to(tl.float32)
            f_last = tl.sum(tl.where(walk == GW - 1, fw, 0.0), 0)
            m_in = tl.maximum(m_in + f_last, f_last + tl.max(tl.where(ok, a - fw, -float("inf")), 0))
    else:
        m_in = tl.sum(tl.zeros((GL,), dtype=tl.float32), 0)
    row0 = c * L
    Lc = tl.minimum(L, S - row0)
    ok = offs < Lc
    g_rows = bh * S + row0 + offs
    fc = tl.cumsum(tl.where(ok, _logsigmoid(tl.load(FG + g_rows, mask=ok, other=0.0).to(tl.float32)), 0.0), 0)
    x = tl.load(IG + g_rows, mask=ok, other=0.0).to(tl.float32)
    vec = bh * SP + row0 + offs
    if EXP_GATE:
        a = tl.where(ok, x, 0.0)
        cmax = tl.associative_scan(a - fc, 0, _maximum)
        is_last = offs == Lc - 1
        f_last = tl.sum(tl.where(is_last, fc, 0.0), 0)
        m_out = tl.maximum(m_in + f_last, f_last + tl.max(tl.where(is_last, cmax, -float("inf")), 0))
        mrow = fc + tl.maximum(m_in, cmax)
    else:
        a = tl.where(ok, _logsigmoid(x), 0.0)
        m_out = m_in
        mrow = tl.zeros((GL,), dtype=tl.float32)
    tl.store(FV + vec, fc, mask=full)
    tl.store(AV + vec, a, mask=full)
    tl.store(MROW + vec, mrow, mask=full)
    tl.store(MST + bh * (NC + 1) + c + 1, m_out)
    if c == 0:
        tl.store(MST + bh * (NC + 1), m_in)


@triton.jit
def mlstm_state_rows_kernel(
    X, XS, NSUM, FV, AV, MROW, MST, RS, DQN, H, DH, QN, DMROW, IG, FG, M0,
    S, L, NC, SP, DHV, scale, eps,
    D: tl.constexpr, BACKWARD: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, NHT: tl.constexpr,
    ROW_TERMS: tl.constexpr = False, NORMALIZE: tl.constexpr = True, EXP_GATE: tl.constexpr = True,
    BV: tl.constexpr = 16, GATES_FWD: tl.constexpr = False, HAS_M0: tl.constexpr = False, GL: tl.constexpr = 16,
    GW: tl.constexpr = 16,
):
    """The rows of one chunk weighted for its state sums (one program per head-dim slice and (batch, head, chunk)),
    so that the state kernels' products are plain matrix products of loaded tiles (_chunk_outer).
    Forward (x = k): XS_j = e_j k_j and NSUM[c + 1] = sum_j e_j k_j, e_j = exp(F_last - F_j + a_j - m_last).
    Backward (x = q): XS_t = g_t rs_t q_t and NSUM[c] = sum_t g_t dqn_t q_t, g_t = exp(F_t + m_c - m_t) / sqrt(d).
    Weights and products in float32, the weighted rows rounded to the input dtype (the dot's operand dtype), the sums
    not. XS: [BNH, S, D] contiguous; NSUM: a state's normaliser part [BNH, NC + 1, D] (float32), the chunk's own
    term, which the sequential state kernel then carries in place (the parallel one's scan does).
    ROW_TERMS (backward, one head-dim slice: launch.ROW_TERMS_IN_STATE_ROWS): rs, dqn and dm are computed here from
    delta = dh.h (_row_terms) and written to RS, DQN, DMROW, for every row of the padded chunk as
    mlstm_bwd_rows_kernel writes them, in place of that kernel's launch.
    GATES_FWD (forward: launch.FOLD_GATES_FWD_CHUNKED): the gate vectors F, a, m of the chunk's rows and its leaving
    max state come from the gates IG, FG [BNH, S] (and M0 [BNH], HAS_M0) here, in place of a mlstm_gates_fwd_kernel
    launch (_chunk_gate_vectors); the weights then read them back as without it."""
    pid_d = tl.program_id(0)
    pid_bc = tl.program_id(1)
    bh = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    row0 = c * L
    Lc = tl.minimum(L, S - row0)
    vec = bh * SP + row0
    offs_d = pid_d * BD + tl.arange(0, BD)
    d_ok = offs_d < D
    x_base = _rows_base(X, bh, row0, S, D, NHT)
    xs_base = XS + (bh * S + row0) * D
    st = bh * (NC + 1) + c  # where the chunk's own sum goes: the entering state's index backward (m_c's too) ...
    if not BACKWARD:
        st += 1  # ... the leaving state's forward
    if GATES_FWD:
        _chunk_gate_vectors(IG, FG, M0, FV, AV, MROW, MST, bh, c, S, L, NC, SP, EXP_GATE, HAS_M0, GL, GW)
        tl.debug_barrier()  # the vectors this program wrote, for all of its threads
    nsum = tl.zeros((BD,), dtype=tl.float32)
    for t0 in range(0, L if ROW_TERMS else Lc, BT):
        rows = t0 + tl.arange(0, BT)
        ok = rows < Lc
        if BACKWARD:
            g = _entering_weight(FV, MROW, MST, vec, rows, ok, st, scale)
            if ROW_TERMS:  # rows up to the padded chunk's end, as mlstm_bwd_rows_kernel (zero past S)
                delta = _row_dot(H, DH, bh, row0 + rows, ok, S, DHV, BV, NHT)
                rs_t, dqn_t, dm_t = _row_terms(delta, QN, MROW, vec + rows, rows < L, eps, NORMALIZE, EXP_GATE)
                tl.store(RS + vec + rows, rs_t, mask=rows < L)
                tl.store(DQN + vec + rows, dqn_t, mask=rows < L)
                tl.store(DMROW + vec + rows, dm_t, mask=rows < L)
                w = g * rs_t
                w_n = g * dqn_t
            else:
                w = g * tl.load(RS + vec + rows, mask=ok, other=0.0)
                w_n = g * tl.load(DQN + vec + rows, mask=ok, other=0.0)
        else:
            w = _leaving_weight(FV, AV, MROW, vec, rows, ok, Lc)
            w_n = w
        msk = ok[:, None] & d_ok[None, :]
        x = tl.load(x_base + rows[:, None] * (NHT * D) + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
        tl.store(xs_base + rows[:, None] * D + offs_d[None, :], (x * w[:, None]).to(XS.dtype.element_ty), mask=msk)
        nsum += tl.sum(x * w_n[:, None], 0)
    tl.store(NSUM + st * D + offs_d, nsum, mask=d_ok)


@triton.jit
def _chunk_outer(acc, AS, B, bh, c, S, L, DA, DB, offs_a, a_ok, offs_b, b_ok, BS: tl.constexpr, PREC: tl.constexpr,
                 NHT: tl.constexpr):
    """acc += sum over chunk c's rows r of as_r b_r^T, a (DA, DB) tile: AS the rows weighted by
    mlstm_state_rows_kernel ([BNH, S, DA] contiguous), B in the op's layout (_rows_base). Both operands go to the dot
    as loaded (as transposed), with nothing computed on them in registers in between."""
    row0 = c * L
    Lc = tl.minimum(L, S - row0)
    as_base = AS + (bh * S + row0) * DA
    b_base = _rows_base(B, bh, row0, S, DB, NHT)
    for j0 in range(0, Lc, BS):
        rows = j0 + tl.arange(0, BS)
        ok = rows < Lc
        a = tl.load(as_base + rows[:, None] * DA + offs_a[None, :], mask=ok[:, None] & a_ok[None, :], other=0.0)
        b = tl.load(b_base + rows[:, None] * (NHT * DB) + offs_b[None, :], mask=ok[:, None] & b_ok[None, :],
                    other=0.0)
        acc += tl.dot(tl.trans(a), b, input_precision=PREC)
    return acc


@triton.jit
def mlstm_fwd_state_kernel(
    KS, V, FV, MROW, MST, CST, NST,
    S, L, NC, SP, DQK: tl.constexpr, DHV: tl.constexpr,
    HAS_INIT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    NHT: tl.constexpr,
):
    """Sequential pass over chunks for one (DQK, DHV) tile: C_{c+1} = carry_c C_c + sum_j e_j k_j v_j^T, from KS =
    e_j k_j and NST[c + 1] = the chunk's own sum_j e_j k_j (mlstm_state_rows_kernel), so that each chunk's term is a
    plain product (_chunk_outer) and n is carried in place. The recurrence runs in float32; CST's dtype is what is
    stored (float32, or the input dtype where the states are only read by products that round them to it anyway:
    function.LOW_PRECISION_STATES). DQK and DHV are constexprs (here and in mlstm_bwd_state_kernel): with the row
    strides known, sm_90 code for Triton 3.6 took 162 registers instead of 246 at DH 512 (168 at DH 384), three
    blocks per SM instead of two, and the forward pass 447 -> 369 us at DH 512 / S 4096 on the H100
    (bench/results/session19/)."""
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_d = pid_k * BK + tl.arange(0, BK)
    d_ok = offs_d < DQK
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DHV
    cv_off = offs_d[:, None] * DHV + offs_v[None, :]
    cv_ok = d_ok[:, None] & v_ok[None, :]
    n_write = d_ok & (pid_v == 0)
    if HAS_INIT:
        acc = tl.load(CST + bh * (NC + 1) * DQK * DHV + cv_off, mask=cv_ok, other=0.0).to(tl.float32)
        acc_n = tl.load(NST + bh * (NC + 1) * DQK + offs_d, mask=d_ok, other=0.0)
    else:
        acc = tl.zeros((BK, BV), dtype=tl.float32)
        acc_n = tl.zeros((BK,), dtype=tl.float32)
        tl.store(CST + bh * (NC + 1) * DQK * DHV + cv_off, acc.to(CST.dtype.element_ty), mask=cv_ok)
        tl.store(NST + bh * (NC + 1) * DQK + offs_d, acc_n, mask=n_write)
    for c in range(0, NC):
        carry = _chunk_carry(FV, MROW, MST, bh, c, S, L, NC, SP)
        st = bh * (NC + 1) + c + 1
        acc = _chunk_outer(acc * carry, KS, V, bh, c, S, L, DQK, DHV, offs_d, d_ok, offs_v, v_ok, BS, PREC, NHT)
        acc_n = acc_n * carry + tl.load(NST + st * DQK + offs_d, mask=n_write, other=0.0)
        tl.store(CST + st * DQK * DHV + cv_off, acc.to(CST.dtype.element_ty), mask=cv_ok)
        tl.store(NST + st * DQK + offs_d, acc_n, mask=n_write)


@triton.jit
def mlstm_fwd_chunk_state_kernel(
    KS, V, CST,
    S, L, NC, DQK, DHV,
    BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, NHT: tl.constexpr,
):
    """Each chunk's own contribution U_c = sum_j e_j k_j v_j^T, one program per (chunk, state tile), into CST[c + 1]
    (u_c = sum_j e_j k_j is in NST[c + 1] already, from mlstm_state_rows_kernel); mlstm_state_scan_kernel then makes
    them the states C_{c+1} = carry_c C_c + U_c. Two launches instead of mlstm_fwd_state_kernel's one, but every
    chunk at once rather than one after the other (launch.PARALLEL_CHUNK_STATES)."""
    pid_bc = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_v = tl.program_id(2)
    bh = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    offs_d, d_ok, offs_v, v_ok = _state_tile(pid_k, pid_v, DQK, DHV, BK, BV)
    acc = _chunk_outer(tl.zeros((BK, BV), dtype=tl.float32), KS, V, bh, c, S, L, DQK, DHV, offs_d, d_ok, offs_v,
                       v_ok, BS, PREC, NHT)
    _store_state(CST, bh * (NC + 1) + c + 1, acc, offs_d, d_ok, offs_v, v_ok, DQK, DHV)


@triton.jit
def mlstm_state_scan_kernel(
    X, XN, FV, MROW, MST,
    S, L, NC, SP, W, WN,
    HAS_START: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """In place along the chunk axis of X [BNH, NC + 1, W] and XN [BNH, NC + 1, WN] (a state and its normaliser
    part), which hold each chunk's own contribution: forward, X[c + 1] = carry_c X[c] + X[c + 1] from X[0];
    REVERSE (the states' gradients), X[c] = carry_c X[c + 1] + X[c] from X[NC]. The start is read if HAS_START, else
    zero (and written). One program per BLOCK elements of one (batch, head); the first cdiv(W, BLOCK) programs of a
    row scan X, the rest XN."""
    bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_x = tl.cdiv(W, BLOCK)
    if pid < n_x:
        base = X + bh * (NC + 1) * W
        width = W
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    else:
        base = XN + bh * (NC + 1) * WN
        width = WN
        offs = (pid - n_x) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < width
    if REVERSE:
        first = NC
    else:
        first = 0
    if HAS_START:
        acc = tl.load(base + first * width + offs, mask=ok, other=0.0)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        tl.store(base + first * width + offs, acc, mask=ok)
    for i in range(0, NC):
        if REVERSE:
            c = NC - 1 - i
            dst = c
        else:
            c = i
            dst = c + 1
        acc = acc * _chunk_carry(FV, MROW, MST, bh, c, S, L, NC, SP) + tl.load(base + dst * width + offs, mask=ok,
                                                                                other=0.0)
        tl.store(base + dst * width + offs, acc, mask=ok)


@triton.jit
def _row_dot(H, DH, bh, rows, r_ok, S, DHV, BV: tl.constexpr, NHT: tl.constexpr):
    """sum_v h[row, v] * dh[row, v] in float32 for a tile of rows of one (batch, head)."""
    acc = tl.zeros((rows.shape[0],), dtype=tl.float32)
    for v0 in range(0, DHV, BV):
        offs_v = v0 + tl.arange(0, BV)
        msk = r_ok[:, None] & (offs_v[None, :] < DHV)
        off = ((bh // NHT) * S + rows[:, None]) * (NHT * DHV) + (bh % NHT) * DHV + offs_v[None, :]
        h = tl.load(H + off, mask=msk, other=0.0).to(tl.float32)
        dh = tl.load(DH + off, mask=msk, other=0.0).to(tl.float32)
        acc += tl.sum(h * dh, 1)
    return acc


@triton.jit
def mlstm_bwd_delta_kernel(H, DH, DELTA, S, SP, DHV, BT: tl.constexpr, BV: tl.constexpr, NHT: tl.constexpr):
    """delta_t = sum_v dh[t, v] * h[t, v] (float32), the row term of the normaliser's gradient."""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_t * BT + tl.arange(0, BT)
    r_ok = rows < S
    tl.store(DELTA + bh * SP + rows, _row_dot(H, DH, bh, rows, r_ok, S, DHV, BV, NHT), mask=r_ok)


@triton.jit
def _state_dot_part(CST, NST, APART, acc, acc_n, st, cv_off, cv_ok, offs_d, n_write, DQK, DHV, NPART, part):
    """This program's share of A_c = <C_c, dC_c> + <n_c, dn_c> (what the state at boundary st contributes to the log
    gates): its tile of the forward state C_c times its tile of the gradient, stored at APART[st, part]; the gate
    kernel adds up the NPART shares in a fixed order (deterministic, and no [.., DQK, DHV] product in PyTorch)."""
    c_tile = tl.load(CST + st * DQK * DHV + cv_off, mask=cv_ok, other=0.0).to(tl.float32)
    n_c = tl.load(NST + st * DQK + offs_d, mask=n_write, other=0.0)
    dot = tl.sum(tl.sum(c_tile * acc, 1), 0) + tl.sum(n_c * acc_n, 0)
    tl.store(APART + st * NPART + part, dot)


@triton.jit
def mlstm_bwd_state_kernel(
    QS, DH, FV, MROW, MST, DCST, DNST, CST, NST, APART,
    S, L, NC, SP, DQK: tl.constexpr, DHV: tl.constexpr,
    HAS_FINAL: tl.constexpr, STATE_DOTS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, NHT: tl.constexpr,
):
    """Reverse pass over chunks: dC_c = sum_{t in c} g_t rs_t q_t dh_t^T + carry_c dC_{c+1} (and dn likewise), from
    QS = g_t rs_t q_t and DNST[c] = the chunk's own sum_t g_t dqn_t q_t (mlstm_state_rows_kernel), as in the
    forward. Writes every boundary 0..NC of DCST / DNST (NC: zeros without a final-state gradient), so they need no
    zero fill. The recurrence runs in float32 and DCST's dtype is what is stored.
    STATE_DOTS (the sig gate, or launch.STATE_TERMS_FROM_ROWS off): also this tile's shares of A_c
    (_state_dot_part) for c = 0..NC, from the forward states CST / NST; otherwise _gates_bwd_row has A_c from the
    row sums."""
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    part = pid_k * tl.num_programs(1) + pid_v
    NPART = tl.num_programs(0) * tl.num_programs(1)
    offs_d = pid_k * BK + tl.arange(0, BK)
    d_ok = offs_d < DQK
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DHV
    cv_off = offs_d[:, None] * DHV + offs_v[None, :]
    cv_ok = d_ok[:, None] & v_ok[None, :]
    n_write = d_ok & (pid_v == 0)
    st = bh * (NC + 1) + NC
    if HAS_FINAL:
        acc = tl.load(DCST + st * DQK * DHV + cv_off, mask=cv_ok, other=0.0).to(tl.float32)
        acc_n = tl.load(DNST + st * DQK + offs_d, mask=d_ok, other=0.0)
    else:
        acc = tl.zeros((BK, BV), dtype=tl.float32)
        acc_n = tl.zeros((BK,), dtype=tl.float32)
        tl.store(DCST + st * DQK * DHV + cv_off, acc.to(DCST.dtype.element_ty), mask=cv_ok)
        tl.store(DNST + st * DQK + offs_d, acc_n, mask=n_write)
    if STATE_DOTS:
        _state_dot_part(CST, NST, APART, acc, acc_n, st, cv_off, cv_ok, offs_d, n_write, DQK, DHV, NPART, part)
    for cc in range(0, NC):
        c = NC - 1 - cc
        carry = _chunk_carry(FV, MROW, MST, bh, c, S, L, NC, SP)
        st = bh * (NC + 1) + c
        acc = _chunk_outer(acc * carry, QS, DH, bh, c, S, L, DQK, DHV, offs_d, d_ok, offs_v, v_ok, BT, PREC, NHT)
        acc_n = acc_n * carry + tl.load(DNST + st * DQK + offs_d, mask=n_write, other=0.0)
        tl.store(DCST + st * DQK * DHV + cv_off, acc.to(DCST.dtype.element_ty), mask=cv_ok)
        tl.store(DNST + st * DQK + offs_d, acc_n, mask=n_write)
        if STATE_DOTS:
            _state_dot_part(CST, NST, APART, acc, acc_n, st, cv_off, cv_ok, offs_d, n_write, DQK, DHV, NPART, part)


@triton.jit
def mlstm_bwd_chunk_state_kernel(
    QS, DH, DCST,
    S, L, NC, DQK, DHV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, NHT: tl.constexpr,
):
    """Each chunk's own term of its state's gradient, sum_{t in c} g_t rs_t q_t dh_t^T, one program per (chunk, state
    tile), into DCST[c] (the normaliser's term is in DNST[c] already, from mlstm_state_rows_kernel);
    mlstm_state_scan_kernel (REVERSE) then adds the carried gradients from later chunks (see
    mlstm_fwd_chunk_state_kernel)."""
    pid_bc = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_v = tl.program_id(2)
    bh = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    offs_d, d_ok, offs_v, v_ok = _state_tile(pid_k, pid_v, DQK, DHV, BK, BV)
    acc = _chunk_outer(tl.zeros((BK, BV), dtype=tl.float32), QS, DH, bh, c, S, L, DQK, DHV, offs_d, d_ok, offs_v,
                       v_ok, BT, PREC, NHT)
    _store_state(DCST, bh * (NC + 1) + c, acc, offs_d, d_ok, offs_v, v_ok, DQK, DHV)


@triton.jit
def _bwd_dq_tile(acc, acc2, dh_res, dh_res2, j0, dh_base, v_base, k_base, FV, AV, vec, t_loc, t_ok, r_t, rs_t, dqn_t,
                 Lc, offs_k, DQK: tl.constexpr, DHV: tl.constexpr, RQK: tl.constexpr, RHV: tl.constexpr,
                 BS: tl.constexpr, BV: tl.constexpr,
                 BV2: tl.constexpr, BKO: tl.constexpr, BKO2: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr,
                 FAST_EXP2: tl.constexpr):
    s_loc = j0 + tl.arange(0, BS)
    s_ok = s_loc < Lc
    f_s = _load_vec(FV + vec, s_loc, s_ok, DIAG)
    a_s = _load_vec(AV + vec, s_loc, s_ok, DIAG)
    b_s = (a_s - f_s) * LOG2E
    dw = _scores(dh_res, dh_res2, dh_base, t_loc, t_ok, v_base, s_loc, s_ok, DHV, RHV, BV, BV2, True, DIAG, PREC)
    p = _exp2(r_t[:, None] + b_s[None, :], FAST_EXP2)
    ds = (dw * rs_t[:, None] + dqn_t[:, None]) * p
    if DIAG:
        ds = tl.where((s_loc[None, :] <= t_loc[:, None]) & s_ok[None, :], ds, 0.0)
    acc, acc2 = _product_into_pieces(acc, acc2, ds, k_base, s_loc, s_ok, offs_k, DQK, RQK, BKO, BKO2, DIAG, PREC)
    return acc, acc2


@triton.jit
def mlstm_bwd_dq_kernel(
    Q, K, V, DH, FV, AV, MROW, RS, DQN, CST, NST, MST, DQ, QDQ, H, QN, DMROW, TICKETS,
    S, L, NC, SP, scale, eps,
    DQK: tl.constexpr, DHV: tl.constexpr,
    HAS_INIT: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BV: tl.constexpr, BV2: tl.constexpr,
    BKO: tl.constexpr, BKO2: tl.constexpr, PREC: tl.constexpr, FAST_EXP2: tl.constexpr,
    ROW_TERMS: tl.constexpr, NORMALIZE: tl.constexpr, EXP_GATE: tl.constexpr,
    NHT: tl.constexpr, ZERO_TICKETS: tl.constexpr = False,
):
    """dq[t, k-slice] = sum_j dW_tj exp(D_tj-m_t)/sqrt(d) k_j + g_t (dh~_t C_c^T + dqn_t n_c); dW = dh~ v^T + dqn.
    BT is a multiple of BS, as in the forward. BV2 / BKO2 > 0: dh and dq in two head-dim pieces (_scores); with BKO2
    one program covers all of dq's columns.
    ROW_TERMS (one chunk, no states: nothing before this kernel needs them): rs and dqn are computed here from h, dh,
    qn and the max state (_row_terms) and written, with dm, for the kernels after it, instead of by a
    mlstm_bwd_rows_kernel launch; dh's tile is already resident, so h is the only extra read.
    ZERO_TICKETS: set the ticket counter TICKETS[bh * SP] of mlstm_bwd_dkdv_kernel's GATES_BWD to zero (one program
    per row), so the counter needs no fill launch of its own."""
    RQK = NHT * DQK  # row strides of q / k and v / h (see _rows_base)
    RHV = NHT * DHV
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_bc = tl.program_id(2)
    bh = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    row0 = c * L
    Lc = tl.minimum(L, S - row0)
    t_lo = pid_t * BT
    t_loc = t_lo + tl.arange(0, BT)
    t_ok = t_loc < Lc
    offs_k = pid_k * BKO + tl.arange(0, BKO)
    k_ok = offs_k < DQK
    offs_k2 = _piece_cols(BKO, BKO2)
    k2_ok = offs_k2 < DQK
    q_base = _rows_base(Q, bh, row0, S, DQK, NHT)
    k_base = _rows_base(K, bh, row0, S, DQK, NHT)
    v_base = _rows_base(V, bh, row0, S, DHV, NHT)
    dh_base = _rows_base(DH, bh, row0, S, DHV, NHT)
    vec = bh * SP + row0
    f_t = tl.load(FV + vec + t_loc, mask=t_ok, other=0.0)
    m_t = tl.load(MROW + vec + t_loc, mask=t_ok, other=0.0)
    dh_res, dh_res2 = _resident(dh_base, t_loc, t_ok, DHV, RHV, BV, BV2, DH.dtype.element_ty)
    if ROW_TERMS:
        if DHV <= BV + BV2:
            h_base = _rows_base(H, bh, row0, S, DHV, NHT)
            delta = tl.sum(_load_piece(h_base, t_loc, t_ok, 0, BV, DHV, RHV, True).to(tl.float32)
                           * dh_res.to(tl.float32), 1)
            if BV2 > 0:
                delta += tl.sum(_load_piece(h_base, t_loc, t_ok, BV, BV2, DHV, RHV, True).to(tl.float32)
                                * dh_res2.to(tl.float32), 1)
        else:
            delta = _row_dot(H, DH, bh, row0 + t_loc, t_ok, S, DHV, BV, NHT)
        rs_t, dqn_t, dm_t = _row_terms(delta, QN, MROW, vec + t_loc, t_ok, eps, NORMALIZE, EXP_GATE)
        first = pid_k == 0
        tl.store(RS + vec + t_loc, rs_t, mask=t_ok & first)
        tl.store(DQN + vec + t_loc, dqn_t, mask=t_ok & first)
        tl.store(DMROW + vec + t_loc, dm_t, mask=t_ok & first)
    else:
        rs_t = tl.load(RS + vec + t_loc, mask=t_ok, other=0.0)
        dqn_t = tl.load(DQN + vec + t_loc, mask=t_ok, other=0.0)
    if ZERO_TICKETS:  # the counter of a (batch, head) row sits at its first column: chunk 0's program zeroes it
        if (pid_t == 0) & (pid_k == 0) & (c == 0):
            tl.store(TICKETS + vec, 0.0)
    r_t = (f_t - m_t) * LOG2E + tl.log2(scale)

    acc = tl.zeros((BT, BKO), dtype=tl.float32)
    acc2 = _acc_piece(BT, BKO2)
    for j0 in range(0, t_lo, BS):
        acc, acc2 = _bwd_dq_tile(acc, acc2, dh_res, dh_res2, j0, dh_base, v_base, k_base, FV, AV, vec, t_loc, t_ok,
                                 r_t, rs_t, dqn_t, Lc, offs_k, DQK, DHV, RQK, RHV, BS, BV, BV2, BKO, BKO2, False, PREC,
                                 FAST_EXP2)
    for j0 in range(t_lo, tl.minimum(t_lo + BT, Lc), BS):
        acc, acc2 = _bwd_dq_tile(acc, acc2, dh_res, dh_res2, j0, dh_base, v_base, k_base, FV, AV, vec, t_loc, t_ok,
                                 r_t, rs_t, dqn_t, Lc, offs_k, DQK, DHV, RQK, RHV, BS, BV, BV2, BKO, BKO2, True, PREC,
                                 FAST_EXP2)

    if HAS_INIT:
        st = bh * (NC + 1) + c
        m_c = tl.load(MST + st)
        g = tl.where(t_ok, tl.exp(f_t + m_c - m_t) * scale, 0.0)
        acc_c = tl.zeros((BT, BKO), dtype=tl.float32)
        acc_c2 = _acc_piece(BT, BKO2)
        for v0 in range(0, DHV, BV):
            offs_v = v0 + tl.arange(0, BV)
            v_ok = offs_v < DHV
            dh_t = tl.load(dh_base + t_loc[:, None] * RHV + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :],
                           other=0.0)
            c_base = CST + st * DQK * DHV + offs_v[:, None]
            c_tr = tl.load(c_base + offs_k[None, :] * DHV, mask=k_ok[None, :] & v_ok[:, None], other=0.0)
            acc_c += tl.dot(dh_t, c_tr.to(dh_t.dtype), input_precision=PREC)
            if BKO2 > 0:
                c_tr2 = tl.load(c_base + offs_k2[None, :] * DHV, mask=k2_ok[None, :] & v_ok[:, None], other=0.0)
                acc_c2 += _state_piece_dot(dh_t, c_tr2, PREC)
        n_k = tl.load(NST + st * DQK + offs_k, mask=k_ok, other=0.0)
        acc += g[:, None] * (acc_c * rs_t[:, None] + dqn_t[:, None] * n_k[None, :])
        if BKO2 > 0:
            n_k2 = tl.load(NST + st * DQK + offs_k2, mask=k2_ok, other=0.0)
            acc2 += g[:, None] * (acc_c2 * rs_t[:, None] + dqn_t[:, None] * n_k2[None, :])

    out_ok = t_ok[:, None] & k_ok[None, :]
    dq_base = _rows_base(DQ, bh, row0, S, DQK, NHT)
    tl.store(dq_base + t_loc[:, None] * RQK + offs_k[None, :], acc.to(DQ.dtype.element_ty), mask=out_ok)
    q_t = tl.load(q_base + t_loc[:, None] * RQK + offs_k[None, :], mask=out_ok, other=0.0).to(tl.float32)
    qdq = tl.sum(q_t * acc, 1)
    if BKO2 > 0:
        out2_ok = t_ok[:, None] & k2_ok[None, :]
        tl.store(dq_base + t_loc[:, None] * RQK + offs_k2[None, :], acc2.to(DQ.dtype.element_ty), mask=out2_ok)
        q_t2 = tl.load(q_base + t_loc[:, None] * RQK + offs_k2[None, :], mask=out2_ok, other=0.0).to(tl.float32)
        qdq += tl.sum(q_t2 * acc2, 1)
    tl.store(QDQ + pid_k * (tl.num_programs(2) // NC) * SP + vec + t_loc, qdq, mask=t_ok)


@triton.jit
def _key_side_decay(FV, MROW, RS, DQN, vec, t_loc, t_ok, s_loc, b_s, DIAG: tl.constexpr, FAST_EXP2: tl.constexpr):
    """Transposed decay P^T [BS, BT] = exp(D_tj - m_t)/sqrt(d) for key rows j and query rows t (zero where t < j or t
    is past the chunk: the key-side kernels sum over t, so no row past the end may leak in; those rows get r_t = -inf),
    with rs_t and dqn_t. b_s: the key term (a_j - F_j) log2(e) + log2(scale)."""
    f_t = tl.load(FV + vec + t_loc, mask=t_ok, other=0.0)
    m_t = tl.load(MROW + vec + t_loc, mask=t_ok, other=0.0)
    rs_t = tl.load(RS + vec + t_loc, mask=t_ok, other=0.0)
    dqn_t = tl.load(DQN + vec + t_loc, mask=t_ok, other=0.0)
    r_t = tl.where(t_ok, (f_t - m_t) * LOG2E, float("-inf"))
    p_tr = _exp2(b_s[:, None] + r_t[None, :], FAST_EXP2)
    if DIAG:
        p_tr = tl.where(s_loc[:, None] <= t_loc[None, :], p_tr, 0.0)
    return p_tr, rs_t, dqn_t


@triton.jit
def _bwd_dk_tile(acc, v_res, t0, q_base, v_base, dh_base, FV, MROW, RS, DQN, vec, s_loc, s_ok, b_s, Lc,
                 offs_k, DQK: tl.constexpr, DHV: tl.constexpr, RQK: tl.constexpr, RHV: tl.constexpr,
                 BT: tl.constexpr, BV: tl.constexpr,
                 BKO: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr, FAST_EXP2: tl.constexpr):
    t_loc = t0 + tl.arange(0, BT)
    t_ok = t_loc < Lc
    p_tr, rs_t, dqn_t = _key_side_decay(FV, MROW, RS, DQN, vec, t_loc, t_ok, s_loc, b_s, DIAG, FAST_EXP2)
    dw_tr = _scores(v_res, v_res, v_base, s_loc, s_ok, dh_base, t_loc, t_ok, DHV, RHV, BV, 0, True, True,
                    PREC)  # v dh^T
    ds_tr = (dw_tr * rs_t[None, :] + dqn_t[None, :]) * p_tr
    q_t = _load_rows(q_base, t_loc, t_ok, offs_k, DQK, RQK, True, DQK % BKO != 0)
    acc += tl.dot(ds_tr.to(q_t.dtype), q_t, input_precision=PREC)
    return acc


@triton.jit
def mlstm_bwd_dk_kernel(
    Q, K, V, DH, FV, AV, MROW, RS, DQN, DCST, DNST, DK, KDK,
    S, L, NC, SP, scale,
    DQK: tl.constexpr, DHV: tl.constexpr,
    HAS_FINAL: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BV: tl.constexpr, BKO: tl.constexpr,
    PREC: tl.constexpr, FAST_EXP2: tl.constexpr,
    NHT: tl.constexpr,
):
    """dk[j, k-slice] = sum_{t>=j} dW_tj exp(D_tj-m_t)/sqrt(d) q_t + e_j (dC_{c+1} v_j + dn_{c+1}).
    BS is a multiple of BT: query tiles inside the key tile's rows take the causal mask, later ones do not."""
    RQK = NHT * DQK  # row strides of q / k and v / h (see _rows_base)
    RHV = NHT * DHV
    pid_s = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_bc = tl.program_id(2)
    bh = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    row0 = c * L
    Lc = tl.minimum(L, S - row0)
    s_lo = pid_s * BS
    s_loc = s_lo + tl.arange(0, BS)
    s_ok = s_loc < Lc
    offs_k = pid_k * BKO + tl.arange(0, BKO)
    k_ok = offs_k < DQK
    q_base = _rows_base(Q, bh, row0, S, DQK, NHT)
    k_base = _rows_base(K, bh, row0, S, DQK, NHT)
    v_base = _rows_base(V, bh, row0, S, DHV, NHT)
    dh_base = _rows_base(DH, bh, row0, S, DHV, NHT)
    vec = bh * SP + row0
    f_s = tl.load(FV + vec + s_loc, mask=s_ok, other=0.0)
    a_s = tl.load(AV + vec + s_loc, mask=s_ok, other=0.0)
    v_res, _ = _resident(v_base, s_loc, s_ok, DHV, RHV, BV, 0, V.dtype.element_ty)
    b_s = (a_s - f_s) * LOG2E + tl.log2(scale)

    acc = tl.zeros((BS, BKO), dtype=tl.float32)
    for t0 in range(s_lo, tl.minimum(s_lo + BS, Lc), BT):
        acc = _bwd_dk_tile(acc, v_res, t0, q_base, v_base, dh_base, FV, MROW, RS, DQN, vec, s_loc, s_ok, b_s,
                           Lc, offs_k, DQK, DHV, RQK, RHV, BT, BV, BKO, True, PREC, FAST_EXP2)
    for t0 in range(s_lo + BS, Lc, BT):
        acc = _bwd_dk_tile(acc, v_res, t0, q_base, v_base, dh_base, FV, MROW, RS, DQN, vec, s_loc, s_ok, b_s,
                           Lc, offs_k, DQK, DHV, RQK, RHV, BT, BV, BKO, False, PREC, FAST_EXP2)

    if HAS_FINAL:
        st = bh * (NC + 1) + c + 1
        f_last = tl.load(FV + vec + Lc - 1)
        m_last = tl.load(MROW + vec + Lc - 1)
        e = tl.where(s_ok, tl.exp(f_last - f_s + a_s - m_last), 0.0)
        acc_f = tl.zeros((BS, BKO), dtype=tl.float32)
        for v0 in range(0, DHV, BV):
            offs_v = v0 + tl.arange(0, BV)
            v_ok = offs_v < DHV
            v_s = tl.load(v_base + s_loc[:, None] * RHV + offs_v[None, :], mask=s_ok[:, None] & v_ok[None, :],
                          other=0.0)
            dc_tr = tl.load(DCST + st * DQK * DHV + offs_k[None, :] * DHV + offs_v[:, None],
                            mask=k_ok[None, :] & v_ok[:, None], other=0.0)
            acc_f += tl.dot(v_s, dc_tr.to(v_s.dtype), input_precision=PREC)
        dn_k = tl.load(DNST + st * DQK + offs_k, mask=k_ok, other=0.0)
        acc += e[:, None] * (acc_f + dn_k[None, :])

    out_ok = s_ok[:, None] & k_ok[None, :]
    dk_base = _rows_base(DK, bh, row0, S, DQK, NHT)
    tl.store(dk_base + s_loc[:, None] * RQK + offs_k[None, :], acc.to(DK.dtype.element_ty),
             mask=out_ok)
    k_s = tl.load(k_base + s_loc[:, None] * RQK + offs_k[None, :], mask=out_ok, other=0.0).to(tl.float32)
    tl.store(KDK + pid_k * (tl.num_programs(2) // NC) * SP + vec + s_loc, tl.sum(k_s * acc, 1), mask=s_ok)


@triton.jit
def _bwd_dv_tile(acc, k_res, t0, q_base, k_base, dh_base, FV, MROW, RS, DQN, vec, s_loc, s_ok, b_s, Lc,
                 offs_v, DQK: tl.constexpr, DHV: tl.constexpr, RQK: tl.constexpr, RHV: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr,
                 BVO: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr, FAST_EXP2: tl.constexpr):
    t_loc = t0 + tl.arange(0, BT)
    t_ok = t_loc < Lc
    p_tr, rs_t, dqn_t = _key_side_decay(FV, MROW, RS, DQN, vec, t_loc, t_ok, s_loc, b_s, DIAG, FAST_EXP2)
    sc_tr = _scores(k_res, k_res, k_base, s_loc, s_ok, q_base, t_loc, t_ok, DQK, RQK, BK, 0, True, True, PREC)  # k q^T
    w_tr = sc_tr * (p_tr * rs_t[None, :])
    dh_t = _load_rows(dh_base, t_loc, t_ok, offs_v, DHV, RHV, True, DHV % BVO != 0)
    acc += tl.dot(w_tr.to(dh_t.dtype), dh_t, input_precision=PREC)
    return acc


@triton.jit
def mlstm_bwd_dv_kernel(
    Q, K, DH, FV, AV, MROW, RS, DQN, DCST, DV,
    S, L, NC, SP, scale,
    DQK: tl.constexpr, DHV: tl.constexpr,
    HAS_FINAL: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BVO: tl.constexpr,
    PREC: tl.constexpr, FAST_EXP2: tl.constexpr,
    NHT: tl.constexpr,
):
    """dv[j, v-slice] = sum_{t>=j} (q_t.k_j) exp(D_tj-m_t)/sqrt(d) dh~_t + e_j k_j^T dC_{c+1}. BS multiple of BT."""
    RQK = NHT * DQK  # row strides of q / k and v / h (see _rows_base)
    RHV = NHT * DHV
    pid_s = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bc = tl.program_id(2)
    bh = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    row0 = c * L
    Lc = tl.minimum(L, S - row0)
    s_lo = pid_s * BS
    s_loc = s_lo + tl.arange(0, BS)
    s_ok = s_loc < Lc
    offs_v = pid_v * BVO + tl.arange(0, BVO)
    v_ok = offs_v < DHV
    q_base = _rows_base(Q, bh, row0, S, DQK, NHT)
    k_base = _rows_base(K, bh, row0, S, DQK, NHT)
    dh_base = _rows_base(DH, bh, row0, S, DHV, NHT)
    vec = bh * SP + row0
    f_s = tl.load(FV + vec + s_loc, mask=s_ok, other=0.0)
    a_s = tl.load(AV + vec + s_loc, mask=s_ok, other=0.0)
    k_res, _ = _resident(k_base, s_loc, s_ok, DQK, RQK, BK, 0, K.dtype.element_ty)
    b_s = (a_s - f_s) * LOG2E + tl.log2(scale)

    acc = tl.zeros((BS, BVO), dtype=tl.float32)
    for t0 in range(s_lo, tl.minimum(s_lo + BS, Lc), BT):
        acc = _bwd_dv_tile(acc, k_res, t0, q_base, k_base, dh_base, FV, MROW, RS, DQN, vec, s_loc, s_ok, b_s,
                           Lc, offs_v, DQK, DHV, RQK, RHV, BT, BK, BVO, True, PREC, FAST_EXP2)
    for t0 in range(s_lo + BS, Lc, BT):
        acc = _bwd_dv_tile(acc, k_res, t0, q_base, k_base, dh_base, FV, MROW, RS, DQN, vec, s_loc, s_ok, b_s,
                           Lc, offs_v, DQK, DHV, RQK, RHV, BT, BK, BVO, False, PREC, FAST_EXP2)

    if HAS_FINAL:
        st = bh * (NC + 1) + c + 1
        f_last = tl.load(FV + vec + Lc - 1)
        m_last = tl.load(MROW + vec + Lc - 1)
        e = tl.where(s_ok, tl.exp(f_last - f_s + a_s - m_last), 0.0)
        acc_f = tl.zeros((BS, BVO), dtype=tl.float32)
        for d0 in range(0, DQK, BK):
            offs_d = d0 + tl.arange(0, BK)
            d_ok = offs_d < DQK
            k_s = tl.load(k_base + s_loc[:, None] * RQK + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            dc = tl.load(DCST + st * DQK * DHV + offs_d[:, None] * DHV + offs_v[None, :],
                         mask=d_ok[:, None] & v_ok[None, :], other=0.0)
            acc_f += tl.dot(k_s, dc.to(k_s.dtype), input_precision=PREC)
        acc += e[:, None] * acc_f

    dv_base = _rows_base(DV, bh, row0, S, DHV, NHT)
    tl.store(dv_base + s_loc[:, None] * RHV + offs_v[None, :], acc.to(DV.dtype.element_ty),
             mask=s_ok[:, None] & v_ok[None, :])


# Gate bookkeeping kernels (function._fused_gates says where they run): the gate vectors, the backward's per-row terms
# and the routing of the gate gradients, one program per (batch, head) row. Only scans whose combine is commutative,
# or the forward cummax, are used.


@triton.jit
def _logsigmoid(x):
    # log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)); log1p written so that it stays accurate for tiny arguments.
    y = tl.exp(-tl.abs(x))
    one_y = 1.0 + y
    tiny = one_y == 1.0
    log1p = tl.where(tiny, y, tl.log(one_y) * (y / tl.where(tiny, 1.0, one_y - 1.0)))
    return tl.minimum(x, 0.0) - log1p


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _max_latest(v1, i1, v2, i2):
    # Max with the latest index on ties, as torch.cummax; written symmetric so the scan's operand order is irrelevant.
    take2 = (v2 > v1) | ((v2 == v1) & (i2 > i1))
    return tl.where(take2, v2, v1), tl.where(take2, i2, i1)


@triton.jit
def _sum_at_min_key(k1, s1, k2, s2):
    # Sum of the values whose key is the smallest: commutative and associative, so a reverse scan is well defined.
    return tl.minimum(k1, k2), tl.where(k1 == k2, s1 + s2, tl.where(k1 < k2, s1, s2))


@triton.jit
def _max_plus(p1, q1, p2, q2):
    # x -> max(x + p1, q1), then x -> max(x + p2, q2): the chunk max-state step m_{c+1} = F_c + max(m_c, M_c) as a
    # map of m_c, composed in order (earlier chunk first; a forward scan passes the earlier operand first).
    return p1 + p2, tl.maximum(q1 + p2, q2)


@triton.jit
def _affine_then(g1, s1, g2, s2):
    # x -> g1 x + s1, then x -> g2 x + s2 (the backward's max-state gradient carried from chunk to chunk).
    return g1 * g2, s1 * g2 + s2


@triton.jit
def _from_previous(x, cidx, fill):
    """y[k] = x[k - 1] along a chunk group's axis, y[0] = fill: the map of the chunk before each position, exactly
    (a select, no arithmetic on the values)."""
    sel = cidx[None, :] == cidx[:, None] - 1
    picked = tl.max(tl.where(sel, x[None, :], -float("inf")), 1)
    return tl.where(cidx == 0, fill, picked)


@triton.jit
def mlstm_gates_fwd_kernel(
    IG, FG, M0, FV, AV, MROW, MST,
    S, L, NC, SP,
    EXP_GATE: tl.constexpr, HAS_M0: tl.constexpr, BL: tl.constexpr, CB: tl.constexpr,
):
    """One (batch, head) row: F (chunk cumsum of logsigmoid f), a, the cummax M, the chunk max states, mrow.
    CB chunks at once ([CB, BL] tiles): everything inside a chunk is independent of the other chunks except the max
    state entering it, which a scan over the group's chunk maps (_max_plus) gives; only that scalar is carried from
    group to group. At S = 4096 with chunks of 256 a program walked 16 chunks one after another: 25 us for 48 rows on
    the H200 (bench/results/profile_mlstm_kernels_s4096_h200.log), 8.6 us in groups of 8
    (bench/results/session11/profile_s4096_dh96_h200.log)."""
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BL)[None, :]
    cidx = tl.arange(0, CB)
    offs2 = tl.broadcast_to(offs, (CB, BL))
    # Scalars that a loop carries are made tensors up front, so their type does not change inside the loop.
    if EXP_GATE and HAS_M0:
        m_c = tl.load(M0 + bh).to(tl.float32)
    elif EXP_GATE:
        m_c = tl.max(tl.full((BL,), -float("inf"), tl.float32), 0)
    else:
        m_c = tl.sum(tl.zeros((BL,), dtype=tl.float32), 0)
    tl.store(MST + bh * (NC + 1), m_c)
    for g0 in range(0, NC, CB):
        c = g0 + cidx
        c_ok = c < NC
        row0 = c * L
        Lc = tl.minimum(L, S - row0)
        ok = (offs < Lc[:, None]) & c_ok[:, None]
        f = tl.load(FG + bh * S + row0[:, None] + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(IG + bh * S + row0[:, None] + offs, mask=ok, other=0.0).to(tl.float32)
        # Rows past the sequence's end (last chunk only) get log gates 0, as the padding of function._gate_vectors.
        fc = tl.cumsum(tl.where(ok, _logsigmoid(f), 0.0), 1)
        if EXP_GATE:
            a = tl.where(ok, x, 0.0)
        else:
            a = tl.where(ok, _logsigmoid(x), 0.0)
        vec = bh * SP + row0[:, None] + offs
        in_chunk = (offs < L) & c_ok[:, None]
        tl.store(FV + vec, fc, mask=in_chunk)
        tl.store(AV + vec, a, mask=in_chunk)
        if EXP_GATE:
            cmax, _ = tl.associative_scan((a - fc, offs2), 1, _max_latest)
            is_last = offs == (Lc - 1)[:, None]
            f_last = tl.sum(tl.where(is_last, fc, 0.0), 1)
            cmax_last = tl.max(tl.where(is_last, cmax, -float("inf")), 1)
            # Chunk c's map m_c -> m_{c+1}; the identity past the last chunk.
            p = tl.where(c_ok, f_last, 0.0)
            q = tl.where(c_ok, f_last + cmax_last, -float("inf"))
            p_in, q_in = tl.associative_scan((_from_previous(p, cidx, 0.0), _from_previous(q, cidx, -float("inf"))),
                                             0, _max_plus)
            m_in = tl.maximum(m_c + p_in, q_in)  # the max state entering each chunk of the group
            m_out = tl.maximum(m_in + p, q)
            mrow = fc + tl.maximum(m_in[:, None], cmax)
            last = tl.minimum(NC - g0, CB) - 1
            m_c = tl.sum(tl.where(cidx == last, m_out, 0.0), 0)
        else:
            mrow = tl.zeros((CB, BL), dtype=tl.float32)
            m_out = tl.zeros((CB,), dtype=tl.float32)
        tl.store(MROW + vec, mrow, mask=in_chunk)
        tl.store(MST + bh * (NC + 1) + c + 1, m_out, mask=c_ok)


@triton.jit
def _row_terms(delta, QN, MROW, vec, ok, eps, NORMALIZE: tl.constexpr, EXP_GATE: tl.constexpr):
    """From delta = dh.h of a tile of rows: 1/denominator, dqn and the max-state gradient dm (function.py's
    formulas)."""
    if NORMALIZE:
        qn = tl.load(QN + vec, mask=ok, other=0.0)
        if EXP_GATE:
            lower = tl.exp(-tl.load(MROW + vec, mask=ok, other=0.0))
        else:
            lower = tl.full(delta.shape, 1.0, tl.float32)
        rs = 1.0 / (tl.maximum(tl.abs(qn), lower) + eps)
        active = tl.abs(qn) > lower
        d_denom = -delta * rs
        sign = tl.where(qn > 0, 1.0, tl.where(qn < 0, -1.0, 0.0))
        dqn = tl.where(active, d_denom * sign, 0.0)
        dm = -delta - dqn * qn - tl.where(active, 0.0, d_denom * lower)
    else:
        rs = tl.full(delta.shape, 1.0, tl.float32)
        dqn = tl.zeros(delta.shape, dtype=tl.float32)
        dm = -delta
    return rs, dqn, dm


@triton.jit
def mlstm_bwd_rows_kernel(
    H, DH, QN, MROW, RS, DQN, DMROW,
    S, SP, DHV, eps,
    NORMALIZE: tl.constexpr, EXP_GATE: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, NHT: tl.constexpr,
):
    """Per row: delta = dh.h, then 1/denominator, dqn and the max-state gradient dm (_row_terms). Chunked calls and
    calls with states only: otherwise the dq kernel computes these for its own rows (ROW_TERMS)."""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_t * BT + tl.arange(0, BT)
    r_ok = rows < S
    p_ok = rows < SP
    delta = _row_dot(H, DH, bh, rows, r_ok, S, DHV, BV, NHT)
    vec = bh * SP + rows
    rs, dqn, dm = _row_terms(delta, QN, MROW, vec, p_ok, eps, NORMALIZE, EXP_GATE)
    tl.store(RS + vec, rs, mask=p_ok)
    tl.store(DQN + vec, dqn, mask=p_ok)
    tl.store(DMROW + vec, dm, mask=p_ok)


@triton.jit
def _state_dot(ACST, st, NPART, BP: tl.constexpr):
    """A_st from its NPART shares (ACST [BNH, NC + 1, NPART]; see _state_dot_part), added in a fixed order."""
    offs = tl.arange(0, BP)
    return tl.sum(tl.load(ACST + st * NPART + offs, mask=offs < NPART, other=0.0), 0)


@triton.jit
def _state_dots(ACST, st, NPART, BP: tl.constexpr):
    """_state_dot for a vector of state indices st."""
    offs = tl.arange(0, BP)[None, :]
    return tl.sum(tl.load(ACST + st[:, None] * NPART + offs, mask=offs < NPART, other=0.0), 1)


@triton.jit
def mlstm_gates_bwd_kernel(
    QDQ, KDK, DMROW, FV, AV, MST, ACST, AEND, DMF, IG, FG, DI, DF, DM0,
    S, L, NC, SP, NKO_Q, NKO_K, BNH, NPART,
    EXP_GATE: tl.constexpr, STATE_TERMS: tl.constexpr, A_SHARES: tl.constexpr, HAS_AEND: tl.constexpr,
    HAS_DMF: tl.constexpr, HAS_INIT: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, CB: tl.constexpr,
):
    """One (batch, head) row per program: _gates_bwd_row."""
    _gates_bwd_row(tl.program_id(0).to(tl.int64), QDQ, KDK, DMROW, FV, AV, MST, ACST, AEND, DMF, IG, FG, DI, DF, DM0,
                   S, L, NC, SP, NKO_Q, NKO_K, BNH, NPART, EXP_GATE, STATE_TERMS, A_SHARES, HAS_AEND, HAS_DMF,
                   HAS_INIT, BL, BP, CB)


@triton.jit
def _gates_bwd_row(
    bh, QDQ, KDK, DMROW, FV, AV, MST, ACST, AEND, DMF, IG, FG, DI, DF, DM0,
    S, L, NC, SP, NKO_Q, NKO_K, BNH, NPART,
    EXP_GATE: tl.constexpr, STATE_TERMS: tl.constexpr, A_SHARES: tl.constexpr, HAS_AEND: tl.constexpr,
    HAS_DMF: tl.constexpr, HAS_INIT: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, CB: tl.constexpr,
):
    """The gate gradients of (batch, head) row bh, chunks in reverse: route dm through the cummax argmax and the
    chunk max states, add the state-transition terms A_c, reverse-cumsum dF inside each chunk, and write di, df (and
    dm0). Run by mlstm_gates_bwd_kernel, or at the end of mlstm_bwd_dkdv_kernel (GATES_BWD).
    CB chunks at once, as mlstm_gates_fwd_kernel: position k of a group holds chunk g_hi - k (descending), so the
    max-state gradient that enters each chunk from the chunks after it comes from a forward scan over the group's
    chunk maps carry_out = s_c + g_c carry_in (_affine_then); only that scalar is carried from group to group.
    STATE_TERMS (several chunks, an initial state or a final-state gradient): A_c = <C_c, dC_c> + <n_c, dn_c>, what
    the state at boundary c adds to the gradient of the log forget gate before it. Scaling C_c by e^eps is adding eps
    to that log gate with every row max held, so A_c is the sum over the rows after the boundary of
    q.dq - k.dk (dq, dk the full gradients) plus A_NC: the row sums are at hand here, so no state kernel reads C_c
    for A_c. AEND [BNH, 2] (HAS_AEND) holds the two end terms as dots (0 where absent): A_0, which only dm0 takes
    (the sum over every row cancels too much for it in half precision), and A_NC. A_SHARES (with STATE_TERMS; the
    sig gate, see launch.STATE_TERMS_FROM_ROWS): every A_c from its shares ACST [BNH, NC + 1, NPART]
    (_state_dot_part)."""
    offs = tl.arange(0, BL)[None, :]
    cidx = tl.arange(0, CB)
    offs2 = tl.broadcast_to(offs, (CB, BL))
    dm_carry = tl.sum(tl.zeros((BL,), dtype=tl.float32), 0)
    a_carry = dm_carry  # A_{c+1} of the next group's highest chunk c
    if A_SHARES:
        a_carry += _state_dot(ACST, bh * (NC + 1) + NC, NPART, BP)
    elif HAS_AEND:
        a_carry += tl.load(AEND + 2 * bh + 1)
    if EXP_GATE and HAS_DMF:
        dm_carry += tl.load(DMF + bh).to(tl.float32)
    if EXP_GATE and (A_SHARES or HAS_AEND):
        dm_carry -= a_carry
    for gg in range(0, NC, CB):
        c = NC - 1 - gg - cidx
        c_ok = c >= 0
        row0 = c * L
        Lc = tl.minimum(L, S - row0)
        ok = (offs < Lc[:, None]) & c_ok[:, None]
        is_last = offs == (Lc - 1)[:, None]
        vec = bh * SP + row0[:, None] + offs
        qdq = tl.zeros((CB, BL), dtype=tl.float32)
        kdk = tl.zeros((CB, BL), dtype=tl.float32)
        for ko in range(0, NKO_Q):
            qdq += tl.load(QDQ + ko * BNH * SP + vec, mask=ok, other=0.0)
        for ko in range(0, NKO_K):
            kdk += tl.load(KDK + ko * BNH * SP + vec, mask=ok, other=0.0)
        df_row = qdq - kdk
        da = kdk
        if A_SHARES:
            a_next = _state_dots(ACST, bh * (NC + 1) + tl.where(c_ok, c + 1, 0), NPART, BP)
        elif STATE_TERMS:  # A_{c+1} from the chunks above c: those of this group come first (descending order)
            chunk_sum = tl.sum(df_row, 1)  # masked rows loaded as zeros
            a_next = a_carry + tl.cumsum(chunk_sum, 0) - chunk_sum
            a_carry += tl.sum(chunk_sum, 0)
        if EXP_GATE:
            in_chunk = (offs < L) & c_ok[:, None]
            fc = tl.load(FV + vec, mask=in_chunk, other=0.0)
            a = tl.load(AV + vec, mask=in_chunk, other=0.0)
            cmax, idx = tl.associative_scan((a - fc, offs2), 1, _max_latest)
            m_c = tl.load(MST + bh * (NC + 1) + c, mask=c_ok, other=0.0)
            from_state = m_c[:, None] > cmax
            dm_row = tl.load(DMROW + vec, mask=ok, other=0.0)
            # Chunk c's map of the gradient entering at its last row to the one it passes on to chunk c - 1.
            g = tl.where(c_ok, tl.sum(tl.where(from_state & is_last & ok, 1.0, 0.0), 1), 1.0)
            s = tl.where(c_ok, tl.sum(tl.where(from_state & ok, dm_row, 0.0), 1), 0.0)
            g_in, s_in = tl.associative_scan((_from_previous(g, cidx, 1.0), _from_previous(s, cidx, 0.0)), 0,
                                             _affine_then)
            carry_in = g_in * dm_carry + s_in
            last = tl.minimum(NC - gg, CB) - 1
            dm_carry = tl.sum(tl.where(cidx == last, s + g * carry_in, 0.0), 0)
            dm_eff = dm_row + tl.where(is_last, carry_in[:, None], 0.0)
            local = tl.where(from_state | (offs >= Lc[:, None]) | (~c_ok[:, None]), 0.0, dm_eff)
            # Row t routes local_t to its argmax idx_t; idx is non-decreasing, so the rows routed to j are the rows
            # t >= j with the smallest idx among them, where idx_j == j. A reverse scan sums them.
            _, seg = tl.associative_scan((idx, local), 1, _sum_at_min_key, reverse=True)
            route = tl.where((idx == offs) & ok, seg, 0.0)
            df_row += dm_eff - route
            da += route
        if STATE_TERMS:
            df_row += tl.where(is_last & c_ok[:, None], a_next[:, None], 0.0)
        dlf = tl.cumsum(tl.where(ok, df_row, 0.0), 1, reverse=True)
        rows = bh * S + row0[:, None] + offs
        f = tl.load(FG + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(DF + rows, (dlf * tl.sigmoid(-f)).to(DF.dtype.element_ty), mask=ok)
        if EXP_GATE:
            di = da
        else:
            x = tl.load(IG + rows, mask=ok, other=0.0).to(tl.float32)
            di = da * tl.sigmoid(-x)
        tl.store(DI + rows, di.to(DI.dtype.element_ty), mask=ok)
    if HAS_INIT:
        if EXP_GATE and A_SHARES:
            tl.store(DM0 + bh, dm_carry + _state_dot(ACST, bh * (NC + 1), NPART, BP))
        elif EXP_GATE:  # HAS_INIT comes with AEND
            tl.store(DM0 + bh, dm_carry + tl.load(AEND + 2 * bh))
        else:
            tl.store(DM0 + bh, dm_carry)


@triton.jit
def _bwd_dkdv_tile(acc_k, acc_k2, acc_v, acc_v2, k_s, k_s2, v_s, v_s2, t0, q_base, dh_base, FV, MROW, RS, DQN, vec,
                   s_loc, b_s, Lc, DQK: tl.constexpr, DHV: tl.constexpr, RQK: tl.constexpr, RHV: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr,
                   BK2: tl.constexpr, BV: tl.constexpr, BV2: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr,
                   FAST_EXP2: tl.constexpr, DO_K: tl.constexpr, DO_V: tl.constexpr):
    t_loc = t0 + tl.arange(0, BT)
    t_ok = t_loc < Lc
    p_tr, rs_t, dqn_t = _key_side_decay(FV, MROW, RS, DQN, vec, t_loc, t_ok, s_loc, b_s, DIAG, FAST_EXP2)
    q_t = _load_piece(q_base, t_loc, t_ok, 0, BK, DQK, RQK, True)
    dh_t = _load_piece(dh_base, t_loc, t_ok, 0, BV, DHV, RHV, True)
    if BK2 > 0:
        q_t2 = _load_piece(q_base, t_loc, t_ok, BK, BK2, DQK, RQK, True)
    if BV2 > 0:
        dh_t2 = _load_piece(dh_base, t_loc, t_ok, BV, BV2, DHV, RHV, True)
    if DO_V:  # dv += (k q^T * P rs) dh
        sc_tr = tl.dot(k_s, tl.trans(q_t), input_precision=PREC)  # [BS, BT]
        if BK2 > 0:
            sc_tr += tl.dot(k_s2, tl.trans(q_t2), input_precision=PREC)
        w_tr = sc_tr * (p_tr * rs_t[None, :])
        acc_v += tl.dot(w_tr.to(dh_t.dtype), dh_t, input_precision=PREC)
        if BV2 > 0:
            acc_v2 += tl.dot(w_tr.to(dh_t2.dtype), dh_t2, input_precision=PREC)
    if DO_K:  # dk += ((v dh^T rs + dqn) * P) q
        dw_tr = tl.dot(v_s, tl.trans(dh_t), input_precision=PREC)  # [BS, BT]
        if BV2 > 0:
            dw_tr += tl.dot(v_s2, tl.trans(dh_t2), input_precision=PREC)
        ds_tr = (dw_tr * rs_t[None, :] + dqn_t[None, :]) * p_tr
        acc_k += tl.dot(ds_tr.to(q_t.dtype), q_t, input_precision=PREC)
        if BK2 > 0:
            acc_k2 += tl.dot(ds_tr.to(q_t2.dtype), q_t2, input_precision=PREC)
    return acc_k, acc_k2, acc_v, acc_v2


@triton.jit
def _key_tile_and_acc(base, s_loc, s_ok, D: tl.constexpr, ROWSTRIDE: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr,
                      A1: tl.constexpr, A2: tl.constexpr, BS: tl.constexpr, DTYPE: tl.constexpr, USED: tl.constexpr):
    """For mlstm_bwd_dkdv_kernel: a key tile resident in pieces of B1 + B2 columns (k, which dv's scores multiply, or
    v, which dk's do) and the float32 accumulator, in pieces of A1 + A2 columns, of the gradient it serves. A pass
    that does not compute that gradient (USED false) gets small unused ones."""
    if USED:
        x, x2 = _resident(base, s_loc, s_ok, D, ROWSTRIDE, B1, B2, DTYPE)
        acc = tl.zeros((BS, A1), dtype=tl.float32)
        acc2 = _acc_piece(BS, A2)
    else:
        x, x2 = _resident(base, s_loc, s_ok, D, ROWSTRIDE, 16, 0, DTYPE)
        acc = tl.zeros((BS, 16), dtype=tl.float32)
        acc2 = acc
    return x, x2, acc, acc2


@triton.jit
def mlstm_bwd_dkdv_kernel(
    Q, K, V, DH, FV, AV, MROW, RS, DQN, DCST, DNST, DK, DV, KDK,
    QDQ, DMROW, MST, IG, FG, DI, DF, TICKETS,
    S, L, NC, SP, scale, NKO_Q, BNH,
    DQK: tl.constexpr, DHV: tl.constexpr,
    HAS_FINAL: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr,
    BV: tl.constexpr, BV2: tl.constexpr, SL: tl.constexpr, PREC: tl.constexpr, FAST_EXP2: tl.constexpr,
    NHT: tl.constexpr, DO_K: tl.constexpr = True, DO_V: tl.constexpr = True,
    GATES_BWD: tl.constexpr = False, EXP_GATE: tl.constexpr = True, BL: tl.constexpr = 16,
    GATES_STATE_TERMS: tl.constexpr = False, GATES_CB: tl.constexpr = 1,
):
    """dk and dv of one key tile in one pass (head dims <= BK + BK2, BV + BV2: one program covers them), both
    accumulators live:
    dv[j] = sum_{t>=j} (q_t.k_j) P_tj rs_t dh_t + e_j k_j^T dC_{c+1},
    dk[j] = sum_{t>=j} (rs_t dh_t.v_j + dqn_t) P_tj q_t + e_j (dC_{c+1} v_j + dn_{c+1}),  P_tj = exp(D_tj-m_t)/sqrt(d).
    q and dh tiles are loaded row-major; the key-side products k q^T and v dh^T come out transposed directly.
    BK2 / BV2 > 0: the head dims in two pieces, as _scores explains.
    DO_K / DO_V: compute only dk (with k.dk) or only dv, for a split pass of two launches (launch.dkdv_mode). Each
    then holds one accumulator, which lets wide head dims take 64-row key tiles (Hopper's wgmma) where both
    accumulators would spill; the launches read q and dh twice but do no extra products.
    BS is a multiple of BT: query tiles inside the key tile's rows take the causal mask, later ones do not.
    GATES_BWD (one pass; one chunk without states, or launch.FOLD_GATES_BWD_CHUNKED): the gate gradients di, df of
    a (batch, head) row need k.dk of all its key tiles, so the program that finishes its row's last key tile (of
    every chunk) computes them (_gates_bwd_row; with GATES_STATE_TERMS the chunk boundaries' A_c from the row sums,
    GATES_CB chunks a step), instead of a mlstm_gates_bwd_kernel launch after this one. Programs of a row take
    tickets from a counter TICKETS[bh * SP] (float32, zeroed by the dq kernel before); the ticket's order varies
    from run to run, the arithmetic of whoever holds the last one does not, so results stay bitwise deterministic."""
    RQK = NHT * DQK  # row strides of q / k and v / h (see _rows_base)
    RHV = NHT * DHV
    pid_s = tl.program_id(0)
    pid_bc = tl.program_id(1)
    bh = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    row0 = c * L
    Lc = tl.minimum(L, S - row0)
    s_lo = pid_s * BS
    s_loc = s_lo + tl.arange(0, BS)
    s_ok = s_loc < Lc
    offs_k = tl.arange(0, BK)
    k_ok = offs_k < DQK
    offs_v = tl.arange(0, BV)
    v_ok = offs_v < DHV
    offs_k2 = _piece_cols(BK, BK2)
    k2_ok = offs_k2 < DQK
    offs_v2 = _piece_cols(BV, BV2)
    v2_ok = offs_v2 < DHV
    q_base = _rows_base(Q, bh, row0, S, DQK, NHT)
    k_base = _rows_base(K, bh, row0, S, DQK, NHT)
    v_base = _rows_base(V, bh, row0, S, DHV, NHT)
    dh_base = _rows_base(DH, bh, row0, S, DHV, NHT)
    vec = bh * SP + row0
    f_s = tl.load(FV + vec + s_loc, mask=s_ok, other=0.0)
    a_s = tl.load(AV + vec + s_loc, mask=s_ok, other=0.0)
    k_s, k_s2, acc_v, acc_v2 = _key_tile_and_acc(k_base, s_loc, s_ok, DQK, RQK, BK, BK2, BV, BV2, BS,
                                                 K.dtype.element_ty, DO_V)
    v_s, v_s2, acc_k, acc_k2 = _key_tile_and_acc(v_base, s_loc, s_ok, DHV, RHV, BV, BV2, BK, BK2, BS,
                                                 V.dtype.element_ty, DO_K)
    b_s = (a_s - f_s) * LOG2E + tl.log2(scale)

    for t0 in range(s_lo, tl.minimum(s_lo + BS, Lc), BT):
        acc_k, acc_k2, acc_v, acc_v2 = _bwd_dkdv_tile(
            acc_k, acc_k2, acc_v, acc_v2, k_s, k_s2, v_s, v_s2, t0, q_base, dh_base, FV, MROW, RS, DQN, vec, s_loc,
            b_s, Lc, DQK, DHV, RQK, RHV, BT, BK, BK2, BV, BV2, True, PREC, FAST_EXP2, DO_K, DO_V)
    for t0 in range(s_lo + BS, Lc, BT):
        acc_k, acc_k2, acc_v, acc_v2 = _bwd_dkdv_tile(
            acc_k, acc_k2, acc_v, acc_v2, k_s, k_s2, v_s, v_s2, t0, q_base, dh_base, FV, MROW, RS, DQN, vec, s_loc,
            b_s, Lc, DQK, DHV, RQK, RHV, BT, BK, BK2, BV, BV2, False, PREC, FAST_EXP2, DO_K, DO_V)

    if HAS_FINAL:
        # The state's gradient enters in SL-wide slices: the whole [BK, BV] tile of dC would need more shared memory
        # than a Hopper SM has at BK = BV = 256. k and v slices are re-read (they were just loaded, so from L2).
        st = bh * (NC + 1) + c + 1
        f_last = tl.load(FV + vec + Lc - 1)
        m_last = tl.load(MROW + vec + Lc - 1)
        e = tl.where(s_ok, tl.exp(f_last - f_s + a_s - m_last), 0.0)
        dc_base = DCST + st * DQK * DHV
        if DO_V:
            for d0 in range(0, DQK, SL):  # acc_v += e * k dC, summed over DQK slices
                offs_d = d0 + tl.arange(0, SL)
                d_ok = offs_d < DQK
                k_d = tl.load(k_base + s_loc[:, None] * RQK + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                              other=0.0)
                dc_rows = dc_base + offs_d[:, None] * DHV
                dc_d = tl.load(dc_rows + offs_v[None, :], mask=d_ok[:, None] & v_ok[None, :],
                               other=0.0).to(k_d.dtype)  # [SL, BV]
                acc_v += e[:, None] * tl.dot(k_d, dc_d, input_precision=PREC)
                if BV2 > 0:
                    dc_d2 = tl.load(dc_rows + offs_v2[None, :], mask=d_ok[:, None] & v2_ok[None, :],
                                    other=0.0)  # [SL, BV2]
                    acc_v2 += e[:, None] * _state_piece_dot(k_d, dc_d2, PREC)
        if DO_K:
            for d0 in range(0, DHV, SL):  # acc_k += e * v dC^T, summed over DHV slices
                offs_d = d0 + tl.arange(0, SL)
                d_ok = offs_d < DHV
                v_d = tl.load(v_base + s_loc[:, None] * RHV + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                              other=0.0)
                dc_d = tl.load(dc_base + offs_k[:, None] * DHV + offs_d[None, :],
                               mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(v_d.dtype)  # [BK, SL]
                acc_k += e[:, None] * tl.dot(v_d, tl.trans(dc_d), input_precision=PREC)
                if BK2 > 0:
                    dc_d2 = tl.load(dc_base + offs_k2[:, None] * DHV + offs_d[None, :],
                                    mask=k2_ok[:, None] & d_ok[None, :], other=0.0)  # [BK2, SL]
                    acc_k2 += e[:, None] * _state_piece_dot(v_d, tl.trans(dc_d2), PREC)
            dn_k = tl.load(DNST + st * DQK + offs_k, mask=k_ok, other=0.0)
            acc_k += e[:, None] * dn_k[None, :]
            if BK2 > 0:
                dn_k2 = tl.load(DNST + st * DQK + offs_k2, mask=k2_ok, other=0.0)
                acc_k2 += e[:, None] * dn_k2[None, :]

    if DO_K:
        if not DO_V:  # k is not resident in a dk-only pass: its tile for k.dk comes now
            k_s, k_s2 = _resident(k_base, s_loc, s_ok, DQK, RQK, BK, BK2, K.dtype.element_ty)
        dk_base = _rows_base(DK, bh, row0, S, DQK, NHT)
        tl.store(dk_base + s_loc[:, None] * RQK + offs_k[None, :], acc_k.to(DK.dtype.element_ty),
                 mask=s_ok[:, None] & k_ok[None, :])
        kdk = tl.sum(k_s.to(tl.float32) * acc_k, 1)
        if BK2 > 0:
            tl.store(dk_base + s_loc[:, None] * RQK + offs_k2[None, :], acc_k2.to(DK.dtype.element_ty),
                     mask=s_ok[:, None] & k2_ok[None, :])
            kdk += tl.sum(k_s2.to(tl.float32) * acc_k2, 1)
        tl.store(KDK + vec + s_loc, kdk, mask=s_ok)
    if DO_V:
        dv_base = _rows_base(DV, bh, row0, S, DHV, NHT)
        tl.store(dv_base + s_loc[:, None] * RHV + offs_v[None, :], acc_v.to(DV.dtype.element_ty),
                 mask=s_ok[:, None] & v_ok[None, :])
        if BV2 > 0:
            tl.store(dv_base + s_loc[:, None] * RHV + offs_v2[None, :], acc_v2.to(DV.dtype.element_ty),
                     mask=s_ok[:, None] & v2_ok[None, :])
    if GATES_BWD:
        # Release: every thread's k.dk stores are issued before the ticket (a scalar atomic, one thread of the
        # program); acquire: the last ticket's holder then sees every other program's k.dk (the pattern of
        # CUTLASS's semaphore: barrier, then one thread's acq_rel atomic at GPU scope).
        tl.debug_barrier()
        ticket = tl.atomic_add(TICKETS + bh * SP, 1.0, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) * NC - 1:
            _gates_bwd_row(bh, QDQ, KDK, DMROW, FV, AV, MST, FV, FV, FV, IG, FG, DI, DF, FV, S, L, NC, SP, NKO_Q, 1,
                           BNH, 1, EXP_GATE, GATES_STATE_TERMS, False, False, False, False, BL, 1, GATES_CB)
