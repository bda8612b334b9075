"""The fused Triton path (the default; tfla.triton.function.FUSED_KERNELS) vs the float64 reference and vs the
unfused Triton path: outputs and every gradient, odd sizes, both gates, fp32 and fp16, initial state, chunks.

Same mechanism as test_triton_mlstm.py: without a GPU the cases run in Triton's interpreter in a child process
(TRITON_INTERPRET=1 must be set before the kernels are defined). The flag is switched per test, so one process
compares both paths on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _interpreter import DEVICE, ON_GPU, RUN_HERE, run_module_in_interpreter

if not RUN_HERE:

    def test_fused_triton_kernels_in_interpreter():
        """Runs this file's cases in a child process with TRITON_INTERPRET=1 (the interpreter is CPU-only)."""
        run_module_in_interpreter(__file__)

else:
    from tfla import MLSTMState, mlstm_parallel
    from tfla.triton import function, launch, mlstm_triton

    DTYPES = (torch.float32, torch.float16) if not ON_GPU else (torch.float32, torch.float16, torch.bfloat16)
    # Against float64: as test_triton_mlstm.py. Fused vs default: both round the same products; only the gate
    # vectors' arithmetic (logsigmoid, scan order) differs, so they agree far below the reference tolerance.
    TOL = {torch.float32: 3e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    TOL_VS_DEFAULT = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
    NAMES = ["q", "k", "v", "i", "f", "C0", "n0", "m0"]

    @pytest.fixture
    def fused():
        old = function.FUSED_KERNELS
        function.FUSED_KERNELS = True
        yield
        function.FUSED_KERNELS = old

    def _inputs(B, NH, S, DQK, DHV, dtype, seed, init):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, scale=1.0, shift=0.0):
            return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE)

        xs = [rnd(B, NH, S, DQK).to(dtype), rnd(B, NH, S, DQK).to(dtype), rnd(B, NH, S, DHV).to(dtype),
              rnd(B, NH, S, scale=2.0), rnd(B, NH, S, scale=1.5, shift=2.0)]
        if init:
            xs += [rnd(B, NH, DQK, DHV, scale=0.5), rnd(B, NH, DQK, scale=0.5), rnd(B, NH, scale=1.0)]
        return xs

    def _run(fn, xs, gate, normalize, ret, seed, loss_on=("h", "C", "n", "m"), **kw):
        """Outputs and input gradients of a random linear loss on the outputs named in loss_on (the others get no
        gradient: the backward sees None for them)."""
        xs = [t.detach().requires_grad_() for t in xs]
        state = MLSTMState(*xs[5:8]) if len(xs) > 5 else None
        out = fn(*xs[:5], gate=gate, normalize=normalize, initial_state=state, return_state=ret, **kw)
        h, st = (out if ret else (out, None))
        g = torch.Generator().manual_seed(seed + 7)
        outs = [h] + (list(st) if ret else [])
        loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)).sum()
                   for name, t in zip(("h", "C", "n", "m"), outs) if name in loss_on)
        loss.backward()
        return [t.detach() for t in outs], [x.grad for x in xs]

    def _rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-2 * b.numel() ** 0.5)).item()

    def check(B, NH, S, DQK, DHV, gate, dtype, *, normalize=True, init=False, ret=False, chunk_size=None, seed=0,
              loss_on=("h", "C", "n", "m"), vs_default=True):
        """The fused path (poisoned outputs) against float64 and, with vs_default, against the unfused path."""
        xs = _inputs(B, NH, S, DQK, DHV, dtype, seed, init)
        kw = dict(chunk_size=chunk_size, loss_on=loss_on)
        function.FUSED_KERNELS = False
        outs_d, grads_d = _run(mlstm_triton, xs, gate, normalize, ret, seed, **kw)
        function.FUSED_KERNELS = True
        launch.POISON_OUTPUTS = True
        try:
            outs, grads = _run(mlstm_triton, xs, gate, normalize, ret, seed, **kw)
        finally:
            launch.POISON_OUTPUTS = False
        ref_outs, ref_grads = _run(mlstm_parallel, [t.double() for t in xs], gate, normalize, ret, seed, loss_on)
        r32_outs, r32_grads = _run(mlstm_parallel, [t.float() for t in xs], gate, normalize, ret, seed, loss_on)
        assert outs[0].dtype == dtype
        pairs = list(zip(["h", "C", "n", "m"], outs, outs_d, ref_outs, r32_outs))
        pairs += [("d" + n, *t) for n, *t in zip(NAMES, grads, grads_d, ref_grads, r32_grads)]
        errors, limits, bad = {}, {}, {}
        for name, a, a_d, b, b32 in pairs:
            if b is None or (name == "m" and gate == "sig"):
                # m0 does not enter the sigmoid-gate mLSTM; its gradient is absent or zero on both paths.
                assert a is None or torch.all(a == 0), name
                continue
            assert a is not None and a.dtype == a_d.dtype and torch.isfinite(a).all(), name
            errors[name], limits[name] = _rel(a, b), max(TOL[dtype], 5 * _rel(b32, b))
            vs_default_err = _rel(a, a_d)
            if not errors[name] <= limits[name]:
                bad[name] = f"vs float64 {errors[name]:.1e} > {limits[name]:.1e}"
            if vs_default and not vs_default_err <= TOL_VS_DEFAULT[dtype]:
                bad[name + " vs default"] = f"{vs_default_err:.1e} > {TOL_VS_DEFAULT[dtype]:.1e}"
        assert not bad, f"{bad} (all vs float64: {errors})"

    # S in {1, 17, 63}: one chunk (the default below 1024 rows); head dims 16 / 24, dqk != dhv included.
    SHAPES = [(1, 2, 1, 16, 16), (1, 2, 17, 24, 16), (2, 1, 63, 16, 24)]

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("gate", ["exp", "sig"])
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_fused_single_chunk(fused, shape, gate, dtype):
        check(*shape, gate, dtype)

    @pytest.mark.parametrize("gate", ["exp", "sig"])
    def test_fused_s196_chunked_with_state(fused, gate):
        """S = 196 in four chunks of 64 (last one 4 rows), initial state in, final state out."""
        check(1, 1, 196, 16, 16, gate, torch.float32, init=True, ret=True, chunk_size=64, seed=3)

    @pytest.mark.parametrize("chunk_size", [None, 23], ids=lambda c: f"L{c}")
    @pytest.mark.parametrize("gate", ["exp", "sig"])
    def test_fused_states(fused, gate, chunk_size):
        check(1, 2, 63, 24, 16, gate, torch.float32, init=True, ret=True, chunk_size=chunk_size, seed=3)

    def test_fused_final_state_without_initial(fused):
        check(1, 1, 37, 16, 16, "exp", torch.float32, ret=True, chunk_size=10, seed=5)

    @pytest.mark.parametrize("loss_on", [("h", "n"), ("h", "C", "m"), ("h", "m"), ("h",)], ids="+".join)
    def test_fused_part_of_final_state_gradient(fused, loss_on):
        """Gradients from only some of the final state's parts: the state kernel starts from the given ones and zeros
        for the rest (its buffers are not zero-filled, launch.mlstm_bwd), chunked, with an initial state."""
        check(1, 2, 29, 16, 24, "exp", torch.float32, init=True, ret=True, chunk_size=8, seed=12, loss_on=loss_on)

    def test_fused_chunk_size_one(fused):
        check(1, 1, 7, 16, 16, "exp", torch.float32, init=True, ret=True, chunk_size=1, seed=8)

    def test_fused_chunked_fp16_with_state(fused):
        check(1, 1, 63, 16, 24, "exp", torch.float16, init=True, ret=True, chunk_size=20, seed=4)

    def test_fused_sig_without_normaliser(fused):
        check(1, 2, 17, 16, 24, "sig", torch.float32, normalize=False)

    def test_fused_gates_with_wide_head_dim(fused):
        """Head dims above launch.one_pass_dkdv's limit (128 here) keep the separate dk / dv kernels under the fused
        gates."""
        check(1, 1, 9, 136, 16, "exp", torch.float32, init=True, ret=True, chunk_size=4, seed=6)

    @pytest.fixture
    def fresh_tiles():
        """Tiles resolved again (launch.tiles memoises them) for a test that switches launch's settings."""
        launch.reset_tile_caches()
        yield
        launch.reset_tile_caches()

    @pytest.mark.parametrize("pieces", [False, True], ids=["padded", "pieces"])
    def test_fused_one_pass_dkdv_with_state_slices(fused, monkeypatch, fresh_tiles, pieces):
        """dk and dv from one kernel with the state's gradient entering in 64-wide slices (DQK = 96, DHV = 80: two
        slices each, the second partly masked), the head dims padded to 128 or in pieces (64 + 32, 64 + 16);
        chunked, states in and out."""
        monkeypatch.setattr(launch, "ONE_PASS_DKDV", True)
        monkeypatch.setattr(launch, "HEAD_DIM_PIECES", pieces)
        check(1, 1, 11, 96, 80, "exp", torch.float32, init=True, ret=True, chunk_size=4, seed=9)

    @pytest.mark.parametrize("group_rows", [32, 16], ids=lambda n: f"group{n}")
    def test_fused_gate_chunk_groups(fused, monkeypatch, group_rows):
        """The gate kernels take the chunks in groups (launch.GATE_GROUP_ROWS; chunks of at most 16 rows: 2 or 1 per
        group here), carrying the max state forward and its gradient backward from group to group: 7 chunks with a
        short last one, states in and out, both gates."""
        monkeypatch.setattr(launch, "GATE_GROUP_ROWS", group_rows)
        check(1, 2, 45, 16, 24, "exp", torch.float32, init=True, ret=True, chunk_size=7, seed=61)
        check(1, 1, 45, 16, 16, "sig", torch.float32, init=True, ret=True, chunk_size=7, seed=62)

    @pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
    def test_state_terms_from_the_row_sums(fused, monkeypatch, parallel):
        """launch.STATE_TERMS_FROM_ROWS: the gate kernel forms A_c = <C_c, dC_c> + <n_c, dn_c> as A_NC plus the
        q.dq - k.dk of the rows after boundary c, carried across groups of chunks (two chunks a group here), with
        the end terms as dots; no state kernel reads the forward states for it. Several chunks with a short last
        one; states in and out, in only, out only and none; both gates; fp16; and after the parallel state kernels."""
        monkeypatch.setattr(launch, "STATE_TERMS_FROM_ROWS", True)
        monkeypatch.setattr(launch, "SIG_STATE_TERMS_FROM_ROWS", True)
        monkeypatch.setattr(launch, "PARALLEL_CHUNK_STATES", parallel)
        monkeypatch.setattr(launch, "GATE_GROUP_ROWS", 32)
        check(1, 2, 45, 16, 24, "exp", torch.float32, init=True, ret=True, chunk_size=7, seed=71)
        check(1, 1, 45, 16, 16, "sig", torch.float32, init=True, ret=True, chunk_size=7, seed=72)
        check(1, 1, 37, 24, 16, "exp", torch.float32, init=True, chunk_size=10, seed=73)
        check(1, 1, 37, 16, 24, "exp", torch.float32, ret=True, chunk_size=10, seed=74)
        check(1, 2, 40, 16, 16, "sig", torch.float32, normalize=False, chunk_size=9, seed=75)
        if not parallel:
            check(1, 1, 63, 16, 24, "exp", torch.float16, init=True, ret=True, chunk_size=20, seed=76)

    @pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
    def test_fused_chunk_states_both_ways(fused, monkeypatch, parallel):
        """Chunk states from one kernel that walks the chunks in sequence, or from every chunk's own product at once
        and a scan over the chunks (launch.PARALLEL_CHUNK_STATES; a scan block of 256 splits the 24 x 40 state over
        four programs, the last partly masked), both from the rows weighted by mlstm_state_rows_kernel: states in and
        out, several chunks, a short last one, both gates."""
        monkeypatch.setattr(launch, "PARALLEL_CHUNK_STATES", parallel)
        monkeypatch.setattr(launch, "SCAN_BLOCK", 256)
        check(1, 2, 45, 24, 40, "exp", torch.float32, init=True, ret=True, chunk_size=16, seed=51)
        check(1, 1, 37, 16, 16, "sig", torch.float32, ret=True, chunk_size=10, seed=52)
        check(1, 1, 30, 40, 24, "exp", torch.float32, init=True, chunk_size=8, seed=53)  # initial state only

    # dk and dv from two launches of the one-pass kernel (launch.dkdv_mode "split": DO_K, then DO_V), head dims in
    # pieces, with and without chunk states.
    SPLIT_CASES = {
        "96x80 exp states L4": ((1, 1, 11, 96, 80, "exp", torch.float32),
                                dict(init=True, ret=True, chunk_size=4, seed=41)),
        "48x40 sig fp16": ((1, 2, 37, 48, 40, "sig", torch.float16), dict(seed=42)),
    }

    @pytest.mark.parametrize("case", list(SPLIT_CASES), ids=list(SPLIT_CASES))
    def test_fused_split_dkdv(fused, monkeypatch, fresh_tiles, case):
        """Against float64 and the unfused path (check), and bitwise equal to one pass with the same tiles: the
        split computes the same products in the same order, only each accumulator in its own launch."""
        (B, NH, S, DQK, DHV, gate, dtype), kw = SPLIT_CASES[case]
        rows = dict(BT=16, BS=32)
        monkeypatch.setattr(launch, "TILE_OVERRIDES", {"dkdv": rows, "dkdv_k": rows, "dkdv_v": rows})
        monkeypatch.setattr(launch, "HEAD_DIM_PIECES", True)
        monkeypatch.setattr(launch, "SPLIT_DKDV", True)
        arch = launch.gpu_arch(torch.device(DEVICE))
        assert launch.dkdv_mode(DQK, DHV, arch, with_states=bool(kw.get("init"))) == "split"
        check(B, NH, S, DQK, DHV, gate, dtype, **kw)

        xs = _inputs(B, NH, S, DQK, DHV, dtype, kw["seed"], bool(kw.get("init")))
        run_kw = dict(chunk_size=kw.get("chunk_size"))
        _, split = _run(mlstm_triton, xs, gate, True, bool(kw.get("ret")), kw["seed"], **run_kw)
        monkeypatch.setattr(launch, "SPLIT_DKDV", False)
        monkeypatch.setattr(launch, "ONE_PASS_DKDV", True)
        assert launch.dkdv_mode(DQK, DHV, arch) == "one_pass"
        _, one_pass = _run(mlstm_triton, xs, gate, True, bool(kw.get("ret")), kw["seed"], **run_kw)
        for name, a, b in zip(NAMES, split, one_pass):
            assert (a is None and b is None) or torch.equal(a, b), name

    # Head dims that are not powers of two, in two pieces each (launch.head_dim_pieces): q/k and v/h split
    # differently, one side not at all, states in and out, chunks, fp16. The unfused path in check() runs the
    # separate dk and dv kernels, which take no pieces: a cross-check of the one-pass kernel's pieces.
    PIECE_CASES = {
        "48x40 exp": ((1, 2, 37, 48, 40, "exp", torch.float32), dict(seed=21)),
        "40x80 sig states L16": ((1, 1, 45, 40, 80, "sig", torch.float32),
                                 dict(init=True, ret=True, chunk_size=16, seed=22)),
        "96x24 exp states L9": ((1, 1, 30, 96, 24, "exp", torch.float32),
                                dict(init=True, ret=True, chunk_size=9, seed=23)),
        "96x96 fp16": ((1, 1, 33, 96, 96, "exp", torch.float16), dict(seed=24)),
    }

    @pytest.mark.parametrize("case", list(PIECE_CASES), ids=list(PIECE_CASES))
    def test_fused_head_dim_pieces(fused, monkeypatch, fresh_tiles, case):
        monkeypatch.setattr(launch, "HEAD_DIM_PIECES", True)
        (B, NH, S, DQK, DHV, gate, dtype), kw = PIECE_CASES[case]
        for kernel in ("fwd_h", "dq", "dkdv"):  # the case does exercise pieces in every kernel that takes them
            cfg = launch.tiles(kernel, DQK, DHV, launch.gpu_arch(torch.device(DEVICE)))
            assert any(cfg[k] for k in ("BK2", "BV2", "BKO2") if k in cfg), (kernel, cfg)
        check(B, NH, S, DQK, DHV, gate, dtype, **kw)

    # q, k, v as token-major views ([B, NH, S, D] views of [B, S, NH, D], what vil's MatrixLSTM passes): the kernels
    # read and write that layout in place (launch.heads_per_row). Results must equal the contiguous run's exactly
    # (same kernels, same tiles), h and dq, dk, dv must come back token-major (no copy in between), and the chunked
    # cases take the state kernels and the row kernel through the same addressing.
    LAYOUT_CASES = {
        "96x96 exp": ((2, 3, 33, 96, 96, "exp", torch.float32), dict(seed=31)),
        "40x24 sig states L16": ((1, 2, 45, 40, 24, "sig", torch.float32),
                                 dict(init=True, ret=True, chunk_size=16, seed=32)),
        "16x24 fp16 L7": ((2, 2, 20, 16, 24, "exp", torch.float16), dict(chunk_size=7, seed=33)),
    }

    @pytest.mark.parametrize("case", list(LAYOUT_CASES), ids=list(LAYOUT_CASES))
    def test_fused_token_major_inputs_are_read_in_place(fused, monkeypatch, case):
        monkeypatch.setattr(function, "TOKEN_MAJOR_IN_PLACE", True)
        (B, NH, S, DQK, DHV, gate, dtype), kw = LAYOUT_CASES[case]
        seed = kw.pop("seed")
        xs = _inputs(B, NH, S, DQK, DHV, dtype, seed, kw.pop("init", False))
        token_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in xs[:3]] + xs[3:]
        assert all(launch.heads_per_row(t) == NH for t in token_major[:3])
        ret = kw.pop("ret", False)
        outs, grads = _run(mlstm_triton, xs, gate, True, ret, seed, **kw)
        outs_t, grads_t = _run(mlstm_triton, token_major, gate, True, ret, seed, **kw)
        assert launch.heads_per_row(outs_t[0]) == NH, outs_t[0].stride()  # h written token-major
        for name, g in zip("qkv", grads_t):
            assert launch.heads_per_row(g) == NH, (name, g.stride())  # gradients in the inputs' layout
        for name, a, b in zip(["h", "C", "n", "m"] + ["d" + n for n in NAMES], outs_t + grads_t, outs + grads):
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.equal(a, b), (name, _rel(a, b))
        check(B, NH, S, DQK, DHV, gate, dtype, init=len(xs) > 5, ret=ret, seed=seed, **kw)

    @pytest.mark.parametrize("in_place", [False, True], ids=["copied", "in-place"])
    @pytest.mark.parametrize("reverse", [False, True])
    def test_vil_layer_on_the_triton_kernels_matches_the_reference(fused, monkeypatch, reverse, in_place):
        """A ViL layer hands the op token-major views (MatrixLSTM) and normalises h in that order: same outputs and
        parameter gradients as on the PyTorch reference backend, with the views read in place or copied."""
        monkeypatch.setattr(function, "TOKEN_MAJOR_IN_PLACE", in_place)
        from vil.layers import ViLLayer

        torch.manual_seed(5)
        ref = ViLLayer(24, reverse=reverse, num_heads=2, mlstm_backend="parallel").to(DEVICE)
        tri = ViLLayer(24, reverse=reverse, num_heads=2, mlstm_backend="triton").to(DEVICE)
        tri.load_state_dict(ref.state_dict())
        x = torch.randn(2, 5, 7, 24, device=DEVICE)
        outs, grads = [], []
        for layer in (ref, tri):
            y = layer(x)
            (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
            outs.append(y.detach())
            grads.append({n: p.grad for n, p in layer.named_parameters()})
        assert _rel(outs[1], outs[0]) < 1e-4
        for name, g in grads[0].items():
            assert _rel(grads[1][name], g) < 1e-3, name

    def test_fused_cummax_ties(fused):
        """Equal maxima (constant input gates and no decay) route dm to the latest row, as torch.cummax does."""
        xs = _inputs(1, 1, 17, 16, 16, torch.float32, 9, False)
        xs[3] = torch.zeros_like(xs[3])
        xs[4] = torch.full_like(xs[4], 40.0)  # logsigmoid(40) == 0 in float32: F constant, a - F ties everywhere
        function.FUSED_KERNELS = False
        _, grads_d = _run(mlstm_triton, xs, "exp", True, False, 0)
        function.FUSED_KERNELS = True
        _, grads = _run(mlstm_triton, xs, "exp", True, False, 0)
        for name, a, b in zip(NAMES, grads, grads_d):
            assert _rel(a, b) < 1e-5, name

    @pytest.mark.parametrize("group_rows", [2048, 32, 16], ids=lambda n: f"group{n}")
    def test_fused_gate_vectors_match(fused, monkeypatch, group_rows):
        """The gate kernel's F, a, mrow and chunk max states against function._gate_vectors: 8 chunks of 6 rows (the
        last 3), all in one group of chunks, in four groups of two, and one chunk at a time."""
        monkeypatch.setattr(launch, "GATE_GROUP_ROWS", group_rows)
        g = torch.Generator().manual_seed(1)
        i = torch.randn(3, 45, generator=g).to(DEVICE) * 2
        f = torch.randn(3, 45, generator=g).to(DEVICE) * 3 + 1
        m0 = torch.randn(3, generator=g).to(DEVICE)
        for exp_gate in (True, False):
            for m in (None, m0):
                lay = launch.chunk_layout(45, 6)
                want = function._gate_vectors(i, f, m, exp_gate, lay)[:4]
                got = launch.mlstm_gates_fwd(i, f, m, lay, exp_gate=exp_gate)
                for name, a, b in zip(["F", "a", "mrow", "mst"], got, want):
                    b = b.reshape(a.shape)
                    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True), (name, exp_gate, m is None)

    def test_fused_is_the_default_everywhere_it_fits(monkeypatch):
        import os

        assert function.FUSED_KERNELS or os.environ.get("TFLA_FUSED_KERNELS") == "0"
        monkeypatch.setattr(function, "FUSED_KERNELS", True)
        for lay in (launch.chunk_layout(196, 196), launch.chunk_layout(4096, function.default_chunk_size(4096, 512))):
            assert function._fused_gates(lay)
        too_long = launch.FUSED_GATES_MAX_CHUNK + 1  # one program per row would not hold the chunk
        assert not function._fused_gates(launch.chunk_layout(too_long, too_long))
        monkeypatch.setattr(function, "FUSED_KERNELS", False)
        assert not function._fused_gates(launch.chunk_layout(196, 196))

    # Chunk states in the input dtype (function.LOW_PRECISION_STATES): chunked fp16 calls without an initial state
    # or return_state, through the matrix kernels (DQK 24 in pieces of 16 + 8 on the query side) and through the
    # score-matrix path with its small tiles; a short last chunk in each.
    LOW_PRECISION_CASES = {
        "24x40 exp L10 matrix kernels": ((1, 2, 37, 24, 40, "exp"), dict(chunk=10)),
        "16x24 sig L16 matrix kernels": ((2, 1, 45, 16, 24, "sig"), dict(chunk=16)),
        "24x16 exp L32 score matrices": ((1, 2, 70, 24, 16, "exp"), dict(chunk=32, score=True)),
    }

    @pytest.mark.parametrize("case", list(LOW_PRECISION_CASES), ids=list(LOW_PRECISION_CASES))
    def test_fused_low_precision_chunk_states(fused, monkeypatch, fresh_tiles, case):
        """The states kept between the forward and the backward are fp16 (float32 as soon as a state leaves or enters
        the op); h, dq, dk and dv are bit for bit those of float32 states (every product rounds a state to fp16
        before its dot); the gate gradients, whose state dots <C, dC> take C rounded, stay within fp16's rounding of
        them; and the whole call passes check() against float64 with poisoned buffers."""
        (B, NH, S, DQK, DHV, gate), kw = LOW_PRECISION_CASES[case]
        dtype, chunk = torch.float16, kw["chunk"]
        if kw.get("score"):
            monkeypatch.setattr(launch, "SCORE_PACK_ROWS", 32)
            monkeypatch.setattr(launch, "TILE_OVERRIDES", SMALL_SCORE_TILES)
            monkeypatch.setattr(launch, "SCORE_MATRIX", True)
        lay = launch.chunk_layout(S, chunk)
        xs = _inputs(B, NH, S, DQK, DHV, dtype, 13, False)
        monkeypatch.setattr(function, "LOW_PRECISION_STATES", True)
        assert function._state_dtype(dtype, lay, False, False) == dtype
        assert function._state_dtype(dtype, lay, True, False) == torch.float32  # an initial state enters
        assert function._state_dtype(dtype, lay, False, True) == torch.float32  # the final state leaves
        assert function._state_dtype(torch.float32, lay, False, False) == torch.float32
        results = {}
        for low in (False, True):
            monkeypatch.setattr(function, "LOW_PRECISION_STATES", low)
            Cst = function._fwd_impl(*xs[:5], None, None, None, gate == "exp", True, chunk, 1e-6, False)[1]
            assert Cst.dtype == (dtype if low else torch.float32) and Cst.shape[2] == lay.NC + 1
            results[low] = _run(mlstm_triton, xs, gate, True, False, 13, chunk_size=chunk)
        (outs32, grads32), (outs16, grads16) = results[False], results[True]
        assert torch.equal(outs16[0], outs32[0]), "h"
        for name, a, b in zip(NAMES[:3], grads16[:3], grads32[:3]):
            assert torch.equal(a, b), (name, _rel(a, b))
        for name, a, b in zip(NAMES[3:5], grads16[3:5], grads32[3:5]):
            assert torch.isfinite(a).all() and _rel(a, b) < TOL_VS_DEFAULT[dtype], (name, _rel(a, b))
        check(B, NH, S, DQK, DHV, gate, dtype, chunk_size=chunk, seed=13, vs_default=not kw.get("score"))

    def _record_launches(monkeypatch) -> list:
        """The names of the kernels launch.py launches from now on, in order (the list fills as they run)."""
        real_launch = launch.direct_launch
        launched = []

        def record(kernel, grid, *args, **kwargs):
            launched.append(kernel.fn.__name__)
            real_launch(kernel, grid, *args, **kwargs)

        monkeypatch.setattr(launch, "direct_launch", record)
        return launched

    @pytest.mark.parametrize("mode", ["one_pass", "split"])
    @pytest.mark.parametrize("gate", ["exp", "sig"])
    def test_gate_kernels_folded_into_the_matrix_kernels(fused, monkeypatch, fresh_tiles, mode, gate):
        """One chunk without states (launch.FOLD_GATES_FWD / _BWD): fwd_h forms the gate vectors itself and the
        one-pass dk + dv kernel writes di and df, two launches less than with the gate kernels (one with the split
        pass, which keeps its gate kernel), with the same results. S = 150 in 32-row query tiles, with fwd_h's walk
        over the gates in 64-row steps (F and the max of a - F carried across steps, a step that ends inside a query
        tile), and 64-row key tiles in the backward (three programs per row take tickets, and only the last may
        compute the row's gate gradients: an earlier one would read the poisoned k.dk of tiles not yet done)."""
        monkeypatch.setattr(launch, "SPLIT_DKDV", mode == "split")
        monkeypatch.setattr(launch, "ONE_PASS_DKDV", True)
        monkeypatch.setattr(launch, "GATE_TILE_ROWS", 64)
        keys = dict(BS=64, BT=32)
        monkeypatch.setattr(launch, "TILE_OVERRIDES", {"fwd_h": dict(BT=32, BS=16), "dkdv": keys, "dkdv_k": keys,
                                                       "dkdv_v": keys})
        xs = _inputs(2, 2, 150, 24, 16, torch.float32, 5, False)
        launched = _record_launches(monkeypatch)
        results, gate_vectors = {}, {}
        for fold in (False, True):
            monkeypatch.setattr(launch, "FOLD_GATES_FWD", fold)
            monkeypatch.setattr(launch, "FOLD_GATES_BWD", fold)
            launched.clear()
            launch.POISON_OUTPUTS = True
            try:
                results[fold] = _run(mlstm_triton, xs, gate, True, False, 5)
                step_launches = list(launched)
                gate_vectors[fold] = function._fwd_with_gates(*xs[:5], None, None, None, gate == "exp", True, 150,
                                                              1e-6, False)[1]
            finally:
                launch.POISON_OUTPUTS = False
            assert ("mlstm_gates_fwd_kernel" in step_launches) != fold, step_launches
            # the split pass keeps the gate-gradient kernel (launch.folds_gate_grads)
            assert ("mlstm_gates_bwd_kernel" in step_launches) != (fold and mode == "one_pass"), step_launches
            assert step_launches.count("mlstm_bwd_dkdv_kernel") == (2 if mode == "split" else 1), step_launches
        for name, a, b in zip(["F", "a", "mrow", "mst"], gate_vectors[False], gate_vectors[True]):
            assert not b.isnan().any() and torch.allclose(a, b, rtol=1e-6, atol=1e-5), name  # mst[0] is -inf
        (outs0, grads0), (outs1, grads1) = results[False], results[True]
        for name, a, b in zip(["h"] + NAMES, outs0[:1] + grads0, outs1[:1] + grads1):
            if a is None:
                assert b is None, name
                continue
            assert torch.isfinite(b).all() and _rel(b, a) < TOL_VS_DEFAULT[torch.float32], name

    def test_gate_folds_apply_to_one_chunk_calls_without_states(monkeypatch, fresh_tiles):
        """Where the folds apply (launch.folds_gate_vectors / folds_gate_grads): on by default; one chunk only, no
        kept state, no state pass or final-state gradient, and the gradient fold on the one-pass dk + dv only."""
        import os

        for name in ("FOLD_GATES_FWD", "FOLD_GATES_BWD"):
            assert getattr(launch, name) or os.environ.get("TFLA_" + name) == "0", name
        monkeypatch.setattr(launch, "FOLD_GATES_FWD", True)
        monkeypatch.setattr(launch, "FOLD_GATES_BWD", True)
        one, chunked = launch.chunk_layout(196, 196), launch.chunk_layout(4096, 256)
        assert launch.folds_gate_vectors(96, 96, "cpu", one, keeps_states=False)
        assert not launch.folds_gate_vectors(96, 96, "cpu", one, keeps_states=True)
        assert not launch.folds_gate_vectors(96, 96, "cpu", chunked, keeps_states=True)
        # several column slices of h per row tile (DH 384 / 512 on the H200): no fold
        assert launch.folds_gate_vectors(192, 192, "sm90", one, keeps_states=False)
        assert not launch.folds_gate_vectors(384, 384, "sm90", one, keeps_states=False)
        long_chunk = launch.chunk_layout(launch.FOLD_GATES_MAX_CHUNK + 1, launch.FOLD_GATES_MAX_CHUNK + 1)
        assert not launch.folds_gate_vectors(96, 96, "cpu", long_chunk, keeps_states=False)
        assert not launch.folds_gate_grads(96, 96, "cpu", long_chunk, state_pass=False, has_final_grad=False)
        arch = "cpu"
        for split, want in ((False, True), (True, False)):
            monkeypatch.setattr(launch, "SPLIT_DKDV", split)
            monkeypatch.setattr(launch, "ONE_PASS_DKDV", True)
            launch.reset_tile_caches()
            assert launch.folds_gate_grads(96, 96, arch, one, state_pass=False, has_final_grad=False) == want
        monkeypatch.setattr(launch, "SPLIT_DKDV", False)
        launch.reset_tile_caches()
        assert not launch.folds_gate_grads(96, 96, arch, one, state_pass=True, has_final_grad=False)
        assert not launch.folds_gate_grads(96, 96, arch, one, state_pass=False, has_final_grad=True)
        assert not launch.folds_gate_grads(96, 96, arch, chunked, state_pass=True, has_final_grad=False)
        monkeypatch.setattr(launch, "FOLD_GATES_BWD", False)
        assert not launch.folds_gate_grads(96, 96, arch, one, state_pass=False, has_final_grad=False)

    # The score-matrix path (launch.uses_score_matrix, kernels in tfla/triton/score_kernels.py), forced on at small
    # head dims. Tiles: rows of 16 / 32 in 32-row blocks of the packed triangle (several blocks per head; key tiles
    # larger than query tiles on the key side), head-dim slices of 16 (24 = 16 + a masked 8, 40 = 3 slices, 33
    # columns of v over 3 output slices), and the shipped defaults in 128-row blocks.
    SMALL_SCORE_TILES = {"scores_fwd": dict(BT=32, BS=16, BK=16), "scores_bwd": dict(BT=16, BS=16, BK=16, BV=16),
                         "score_rows": dict(BT=32, BS=16, BO=16), "score_cols": dict(BT=16, BS=32, BO=16)}
    SCORE_CASES = {
        "24x16 exp S150": ((2, 2, 150, 24, 16, "exp", torch.float32), dict(pack=32, tiles=SMALL_SCORE_TILES)),
        "40x33 sig S97": ((1, 2, 97, 40, 33, "sig", torch.float32), dict(pack=32, tiles=SMALL_SCORE_TILES)),
        "40x33 sig unnormalised": ((1, 2, 97, 40, 33, "sig", torch.float32),
                                   dict(pack=32, tiles=SMALL_SCORE_TILES, normalize=False)),
        "16x24 fp16 S63 default tiles": ((2, 1, 63, 16, 24, "exp", torch.float16), dict(pack=128, tiles={})),
        "24x16 exp S1": ((1, 3, 1, 24, 16, "exp", torch.float32), dict(pack=32, tiles=SMALL_SCORE_TILES)),
        "24x16 exp S70 token-major": ((2, 3, 70, 24, 16, "exp", torch.float32),
                                      dict(pack=32, tiles=SMALL_SCORE_TILES, token_major=True)),
        "40x33 sig S97 split dS / Wr": ((1, 2, 97, 40, 33, "sig", torch.float32),
                                        dict(pack=32, tiles=SMALL_SCORE_TILES, split=True)),
        # chunk by chunk with the state terms: a short last chunk, initial and final states, chunks shorter than a
        # row tile, token-major, the split backward
        "24x16 exp S150 chunks of 64, states in and out": ((2, 2, 150, 24, 16, "exp", torch.float32),
                                                           dict(pack=32, tiles=SMALL_SCORE_TILES, chunk=64, init=True,
                                                                ret=True)),
        "40x33 sig S97 chunks of 32": ((1, 2, 97, 40, 33, "sig", torch.float32),
                                       dict(pack=32, tiles=SMALL_SCORE_TILES, chunk=32)),
        "40x33 sig S97 chunks of 32 unnormalised, final state": ((1, 2, 97, 40, 33, "sig", torch.float32),
                                                                 dict(pack=32, tiles=SMALL_SCORE_TILES, chunk=32,
                                                                      ret=True, normalize=False)),
        "16x24 fp16 S63 chunks of 16 default tiles, initial state": ((2, 1, 63, 16, 24, "exp", torch.float16),
                                                                     dict(pack=128, tiles={}, chunk=16, init=True)),
        "24x16 exp S1 initial state": ((1, 3, 1, 24, 16, "exp", torch.float32),
                                       dict(pack=32, tiles=SMALL_SCORE_TILES, init=True, ret=True)),
        "24x16 exp S70 chunks of 32 token-major": ((2, 3, 70, 24, 16, "exp", torch.float32),
                                                   dict(pack=32, tiles=SMALL_SCORE_TILES, token_major=True,
                                                        chunk=32)),
        "40x33 sig S97 chunks of 64 split dS / Wr": ((1, 2, 97, 40, 33, "sig", torch.float32),
                                                     dict(pack=32, tiles=SMALL_SCORE_TILES, split=True, chunk=64,
                                                          init=True)),
        # the forward's weights kept for the backward (launch.KEEP_SCORES): dv = W^T (rs dh), no Wr
        "24x16 exp S150 kept weights": ((2, 2, 150, 24, 16, "exp", torch.float32),
                                        dict(pack=32, tiles=SMALL_SCORE_TILES, keep=True)),
        "40x33 sig S97 unnormalised kept weights": ((1, 2, 97, 40, 33, "sig", torch.float32),
                                                    dict(pack=32, tiles=SMALL_SCORE_TILES, normalize=False,
                                                         keep=True)),
        "16x24 fp16 S63 default tiles kept weights": ((2, 1, 63, 16, 24, "exp", torch.float16),
                                                      dict(pack=128, tiles={}, keep=True)),
        "24x16 exp S150 chunks of 64, states in and out, kept weights": ((2, 2, 150, 24, 16, "exp", torch.float32),
                                                                         dict(pack=32, tiles=SMALL_SCORE_TILES,
                                                                              chunk=64, init=True, ret=True,
                                                                              keep=True)),
    }

    @pytest.mark.parametrize("case", list(SCORE_CASES), ids=list(SCORE_CASES))
    def test_score_matrix_path(fused, monkeypatch, fresh_tiles, case):
        """Stored weights instead of weights formed per output slice: its six launches (seven with the split
        backward; with states, its launches and the state kernels) and none of the matrix kernels, the same outputs
        and gradients (initial-state ones included) as the matrix kernels, with every buffer poisoned (an unwritten
        element of a triangle that a product reads shows as NaN), then against float64; token-major inputs read in
        place, bitwise equal to contiguous ones."""
        (B, NH, S, DQK, DHV, gate, dtype), kw = SCORE_CASES[case]
        init, ret, chunk = kw.get("init", False), kw.get("ret", False), kw.get("chunk")
        states = init or ret or (chunk is not None and chunk < S)
        monkeypatch.setattr(launch, "SCORE_PACK_ROWS", kw["pack"])
        monkeypatch.setattr(launch, "TILE_OVERRIDES", kw["tiles"])
        monkeypatch.setattr(function, "TOKEN_MAJOR_IN_PLACE", True)
        monkeypatch.setattr(launch, "SPLIT_SCORES_BWD", kw.get("split", False))
        monkeypatch.setattr(launch, "KEEP_SCORES", kw.get("keep", False))
        normalize = kw.get("normalize", True)
        xs = _inputs(B, NH, S, DQK, DHV, dtype, 11, init)
        launched = _record_launches(monkeypatch)
        recorded_launch = launch.direct_launch
        product_flags = []  # (kernel, DO_WR, X_ROW_SCALE) of the score-matrix backward's launches

        def record_flags(kernel, grid, *args, **kwargs):
            product_flags.append((kernel.fn.__name__, kwargs.get("DO_WR"), kwargs.get("X_ROW_SCALE", False)))
            recorded_launch(kernel, grid, *args, **kwargs)

        monkeypatch.setattr(launch, "direct_launch", record_flags)
        results = {}
        score_kernels = {"mlstm_scores_fwd_kernel", "mlstm_scores_bwd_kernel", "mlstm_score_rows_kernel",
                         "mlstm_score_cols_kernel"}
        for on in (False, True):
            monkeypatch.setattr(launch, "SCORE_MATRIX", on)
            launched.clear()
            launch.POISON_OUTPUTS = True
            try:
                results[on] = _run(mlstm_triton, xs, gate, normalize, ret, 11, chunk_size=chunk)
            finally:
                launch.POISON_OUTPUTS = False
            matrix_kernels = {"mlstm_fwd_h_kernel", "mlstm_bwd_dq_kernel", "mlstm_bwd_dkdv_kernel",
                              "mlstm_bwd_dk_kernel", "mlstm_bwd_dv_kernel"}
            if on and states:
                assert score_kernels <= set(launched) and not matrix_kernels & set(launched), launched
            elif on:
                assert sorted(launched) == sorted(["mlstm_gates_fwd_kernel", "mlstm_scores_fwd_kernel",
                                                   "mlstm_score_rows_kernel", "mlstm_score_rows_kernel",
                                                   "mlstm_score_cols_kernel", "mlstm_score_cols_kernel",
                                                   "mlstm_gates_bwd_kernel"]
                                                  + ["mlstm_scores_bwd_kernel"] * (2 if kw.get("split") else 1)), launched
            else:
                assert not score_kernels & set(launched) and matrix_kernels & set(launched), launched
            if on:  # kept weights: dS alone (no Wr) and dv from W with dh's rows scaled; else Wr formed, unscaled
                keep = kw.get("keep", False)
                assert [f[1] for f in product_flags if f[0] == "mlstm_scores_bwd_kernel"][-1] is (not keep)
                assert [f[2] for f in product_flags if f[0] == "mlstm_score_cols_kernel"][-2:] == [False, keep]
            product_flags.clear()
        (outs0, grads0), (outs1, grads1) = results[False], results[True]
        out_names = ["h", "C", "n", "m"][:len(outs0)]
        for name, a, b in zip(out_names + NAMES, outs0 + grads0, outs1 + grads1):
            if a is None:
                assert b is None, name
                continue
            assert torch.isfinite(b).all() and _rel(b, a) < TOL_VS_DEFAULT[dtype], (name, _rel(b, a))
        if kw.get("token_major"):
            token_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in xs[:3]] + xs[3:]
            outs_t, grads_t = _run(mlstm_triton, token_major, gate, normalize, ret, 11, chunk_size=chunk)
            assert launch.heads_per_row(outs_t[0]) == NH and "mlstm_score_rows_kernel" in launched
            for name, a, b in zip(out_names + NAMES, outs_t + grads_t, outs1 + grads1):
                assert (a is None) == (b is None), name
                if a is not None:
                    assert torch.equal(a, b), (name, _rel(a, b))
        # against float64 only: the unfused path's backward takes the matrix kernels (compared just above)
        check(B, NH, S, DQK, DHV, gate, dtype, normalize=normalize, init=init, ret=ret, chunk_size=chunk, seed=11,
              vs_default=False)

    def test_weights_are_kept_only_where_a_backward_runs(monkeypatch, fresh_tiles):
        """launch.KEEP_SCORES keeps the forward's weights (every element written, held until the backward) only for
        calls whose backward will run: not for inputs without gradients, not under no_grad. (What the backward does
        with them: test_score_matrix_path's kept-weights cases.)"""
        real = launch.mlstm_fwd_score_matrix
        kept = []

        def spy(*args, **kwargs):
            kept.append(kwargs["keep"])
            return real(*args, **kwargs)

        monkeypatch.setattr(launch, "mlstm_fwd_score_matrix", spy)
        monkeypatch.setattr(launch, "SCORE_MATRIX", True)
        monkeypatch.setattr(launch, "KEEP_SCORES", True)
        monkeypatch.setattr(launch, "TILE_OVERRIDES", SMALL_SCORE_TILES)
        monkeypatch.setattr(launch, "SCORE_PACK_ROWS", 32)
        xs = _inputs(1, 2, 40, 16, 16, torch.float32, 5, False)
        mlstm_triton(*xs)
        with torch.no_grad():
            mlstm_triton(*[x.requires_grad_() for x in xs])
        launched = _record_launches(monkeypatch)
        mlstm_triton(*xs).sum().backward()
        assert kept == [False, False, True]
        assert "mlstm_scores_bwd_kernel" in launched and all(x.grad is not None for x in xs)

    @pytest.mark.parametrize("S, chunk", [(40, None), (150, 64)], ids=["one chunk S40", "chunks of 64 S150"])
    def test_kept_weights_are_written_everywhere(monkeypatch, fresh_tiles, S, chunk):
        """Kept for the backward (launch.KEEP_SCORES), the weights are an output of the registered op, so the forward
        writes every element of their buffer (the scores kernel's ZERO_REST): into a buffer poisoned with NaN, the
        weights (q_t.k_j) exp(F_t - F_j + a_j - m_t)/sqrt(d) on and below the diagonal, zeros right of it (row tiles
        of 16 in blocks of 32: a diagonal tile leaves columns of its block) and in the rows and columns past the
        chunk's end (S 40: the second block's rows 40-63, the last row tile of them all past the end)."""
        from tfla.triton.function import _gate_vectors, mlstm_fwd_op

        P = 32
        monkeypatch.setattr(launch, "SCORE_PACK_ROWS", P)
        monkeypatch.setattr(launch, "TILE_OVERRIDES", dict(SMALL_SCORE_TILES, scores_fwd=dict(BT=16, BS=16, BK=16)))
        monkeypatch.setattr(launch, "SCORE_MATRIX", True)
        B, NH, DH = 1, 2, 24
        q, k, v, i, f = _inputs(B, NH, S, DH, DH, torch.float32, 3, False)
        lay = launch.chunk_layout(S, chunk or S)
        launch.POISON_OUTPUTS = True
        try:
            scores = mlstm_fwd_op(q, k, v, i, f, None, None, None, True, True, lay.L, 1e-6, False, True)[-1]
        finally:
            launch.POISON_OUTPUTS = False
        nb = -(-lay.L // P)
        per_matrix = P * P * nb * (nb + 1) // 2
        assert scores.numel() == B * NH * lay.NC * per_matrix and torch.isfinite(scores).all()
        Fc, a, mrow = (t.double() for t in _gate_vectors(i.view(-1, S), f.view(-1, S), None, True, lay)[:3])
        qc, kc = (torch.nn.functional.pad(x.double().view(-1, S, DH), (0, 0, 0, lay.SP - S)).view(-1, lay.NC, lay.L, DH)
                  for x in (q, k))
        rows = torch.arange(nb * P)
        for bh in range(B * NH):
            for c in range(lay.NC):
                Lc = min(lay.L, S - c * lay.L)
                packed = scores[(bh * lay.NC + c) * per_matrix:][:per_matrix].double()
                dense = torch.zeros(nb * P, nb * P, dtype=torch.float64)
                for blk in range(nb):  # block blk: rows [blk P, (blk + 1) P), columns [0, (blk + 1) P), row-major
                    start = P * P * blk * (blk + 1) // 2
                    dense[blk * P:(blk + 1) * P, :(blk + 1) * P] = packed[start:start + P * P * (blk + 1)].view(P, -1)
                want = torch.zeros_like(dense)
                decay = Fc[bh, c, :Lc, None] - Fc[bh, c, None, :Lc] + a[bh, c, None, :Lc] - mrow[bh, c, :Lc, None]
                causal = rows[:Lc, None] >= rows[None, :Lc]
                want[:Lc, :Lc] = torch.where(causal, qc[bh, c, :Lc] @ kc[bh, c, :Lc].T * decay.exp() / DH ** 0.5, 0.0)
                assert torch.allclose(dense, want, rtol=1e-4, atol=1e-5), (bh, c, (dense - want).abs().max())

    def test_score_matrix_is_the_default_for_wide_heads_in_one_chunk(monkeypatch, fresh_tiles):
        """launch.uses_score_matrix: by default where the matrix kernels slice their outputs (padded head dims above
        256; chunked calls from 256 up), in chunks of at most SCORE_MATRIX_MAX_CHUNK rows, with states unless
        SCORE_MATRIX_STATES is off; the gate folds stay off there."""
        import os

        assert launch.SCORE_MATRIX is None or os.environ.get("TFLA_SCORE_MATRIX") in ("0", "1")
        assert launch.KEEP_SCORES or os.environ.get("TFLA_KEEP_SCORES") == "0"  # the forward's weights kept
        monkeypatch.setattr(launch, "SCORE_MATRIX", None)
        one = launch.chunk_layout(196, 196)
        assert launch.uses_score_matrix(384, 384, one, keeps_states=False)
        assert launch.uses_score_matrix(512, 96, one, keeps_states=False)
        assert not launch.uses_score_matrix(192, 192, one, keeps_states=False)
        assert launch.uses_score_matrix(384, 384, one, keeps_states=True)
        assert launch.uses_score_matrix(384, 384, launch.chunk_layout(4096, 256), keeps_states=True)
        # chunked, a step lower (SCORE_MATRIX_CHUNKED_MIN_HEAD_DIM): DH 192 in chunks of 256; not DH 96, not
        # chunks of 1024 rows, not one chunk
        assert launch.uses_score_matrix(192, 192, launch.chunk_layout(4096, 256), keeps_states=True)
        assert launch.uses_score_matrix(96, 160, launch.chunk_layout(4096, 256), keeps_states=True)
        assert not launch.uses_score_matrix(96, 96, launch.chunk_layout(4096, 256), keeps_states=True)
        assert not launch.uses_score_matrix(192, 192, launch.chunk_layout(4096, 1024), keeps_states=True)
        assert not launch.uses_score_matrix(192, 192, launch.chunk_layout(196, 196), keeps_states=True)
        monkeypatch.setattr(launch, "SCORE_MATRIX_STATES", False)
        assert not launch.uses_score_matrix(192, 192, launch.chunk_layout(4096, 256), keeps_states=True)
        assert not launch.uses_score_matrix(384, 384, one, keeps_states=True)
        assert not launch.uses_score_matrix(384, 384, launch.chunk_layout(4096, 256), keeps_states=True)
        assert launch.uses_score_matrix(384, 384, one, keeps_states=False)
        monkeypatch.setattr(launch, "SCORE_MATRIX_STATES", True)
        too_long = launch.SCORE_MATRIX_MAX_CHUNK + 1
        assert not launch.uses_score_matrix(384, 384, launch.chunk_layout(too_long, too_long), keeps_states=False)
        monkeypatch.setattr(launch, "SCORE_MATRIX", True)
        assert launch.uses_score_matrix(24, 16, one, keeps_states=False)
        assert not launch.folds_gate_vectors(24, 16, "cpu", one, keeps_states=False)
        assert not launch.folds_gate_grads(24, 16, "cpu", one, state_pass=False, has_final_grad=False)
        monkeypatch.setattr(launch, "TILE_OVERRIDES", {"score_rows": dict(BT=256, BS=64)})
        with pytest.raises(ValueError, match="SCORE_PACK_ROWS"):
            launch._score_tiles("score_rows", 24, 16, "cpu", False)

    def test_narrow_heads_default_to_short_chunks_and_row_terms_in_the_state_rows_launch(monkeypatch):
        """function.default_chunk_size: one chunk up to SINGLE_CHUNK_MAX_SEQ_LEN rows, then chunks of 128 for head
        dims 65-128 (the wider of DQK, DHV) and of 256 otherwise; launch.row_terms_in_state_rows by default where the
        padded DQK is at most 128, and never above ROW_TERMS_MAX_HEAD_DIM when forced on; the forward's gate vectors
        from the state-rows launch by default at those head dims up to FOLD_GATES_FWD_CHUNKED_MAX_CHUNKS chunks."""
        import os

        limit = function.SINGLE_CHUNK_MAX_SEQ_LEN
        assert function.default_chunk_size(limit, 96) == limit
        assert [function.default_chunk_size(4096, d) for d in (64, 65, 96, 128, 129, 192, 512)] == [
            256, 128, 128, 128, 256, 256, 256]
        assert launch.ROW_TERMS_IN_STATE_ROWS is None or os.environ.get("TFLA_ROW_TERMS_IN_STATE_ROWS") in ("0", "1")
        monkeypatch.setattr(launch, "ROW_TERMS_IN_STATE_ROWS", None)
        assert [launch.row_terms_in_state_rows(d) for d in (24, 96, 128, 136, 192)] == [True, True, True, False, False]
        monkeypatch.setattr(launch, "ROW_TERMS_IN_STATE_ROWS", True)
        assert launch.row_terms_in_state_rows(192) and not launch.row_terms_in_state_rows(384)
        monkeypatch.setattr(launch, "ROW_TERMS_IN_STATE_ROWS", False)
        assert not launch.row_terms_in_state_rows(96)

        assert launch.FOLD_GATES_FWD_CHUNKED is None or os.environ.get("TFLA_FOLD_GATES_FWD_CHUNKED") in ("0", "1")
        monkeypatch.setattr(launch, "FOLD_GATES_FWD_CHUNKED", None)
        most = launch.FOLD_GATES_FWD_CHUNKED_MAX_CHUNKS

        def folds(DQK, chunks, keeps_states=True):
            lay = launch.chunk_layout(128 * chunks, 128)
            return launch.folds_gate_vectors_into_state_rows(DQK, lay, keeps_states=keeps_states)

        assert [folds(d, most) for d in (64, 96, 128, 136, 192)] == [True, True, True, False, False]
        assert not folds(96, most + 1) and not folds(96, 4, keeps_states=False)
        monkeypatch.setattr(launch, "FOLD_GATES_FWD_CHUNKED", True)
        assert folds(192, most + 1) and not folds(384, 4)
        monkeypatch.setattr(launch, "FOLD_GATES_FWD_CHUNKED", False)
        assert not folds(96, 4)

    def _inputs_in_layout(B, NH, S, DQK, DHV, dtype, seed, init, token_major):
        xs = _inputs(B, NH, S, DQK, DHV, dtype, seed, init)
        if token_major:  # [B, NH, S, D] views of [B, S, NH, D], as vil's MatrixLSTM passes them
            xs = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in xs[:3]] + xs[3:]
        return xs

    def _switch_both_ways(monkeypatch, attribute, folded_kernel, xs, gate, normalize, ret, seed, chunk_size,
                          launches=None, exact=False):
        """Outputs and gradients with launch.<attribute> off and on (outputs poisoned, same inputs): folded_kernel is
        launched exactly when the switch is off, with `launches` (a callable of on) the number of launches, and the
        two runs agree bitwise (exact) or to TOL_VS_DEFAULT."""
        launched = _record_launches(monkeypatch)
        results = {}
        for on in (False, True):
            monkeypatch.setattr(launch, attribute, on)
            launched.clear()
            launch.POISON_OUTPUTS = True
            try:
                results[on] = _run(mlstm_triton, xs, gate, normalize, ret, seed, chunk_size=chunk_size)
            finally:
                launch.POISON_OUTPUTS = False
            assert (folded_kernel in launched) != on, launched
            assert launches is None or len(launched) == launches(on), launched
        names = ["h", "C", "n", "m"][:len(results[False][0])] + NAMES
        for name, a, b in zip(names, sum(results[False], []), sum(results[True], [])):
            assert (a is None) == (b is None), name
            if a is None:
                continue
            if exact:
                assert torch.equal(a, b), (name, _rel(b, a))
            else:
                assert torch.isfinite(b).all() and _rel(b, a) <= TOL_VS_DEFAULT[a.dtype], (name, _rel(b, a))

    # launch.ROW_TERMS_IN_STATE_ROWS: the backward's per-row terms (rs, dqn, dm) of a chunked call made by the
    # state-rows launch instead of a mlstm_bwd_rows launch (test_folds_into_the_state_rows_launch).
    ROW_TERM_CASES = {
        "exp 24x16 L16 states": ((1, 2, 45, 24, 16, "exp", torch.float32), dict(init=True, ret=True, chunk_size=16)),
        "sig 16x24 L10 unnormalised": ((2, 1, 37, 16, 24, "sig", torch.float32), dict(normalize=False, chunk_size=10)),
        "exp 136x40 L32 (32-row steps)": ((1, 1, 70, 136, 40, "exp", torch.float32), dict(chunk_size=32)),
        "exp 24x24 L16 token-major fp16": ((2, 3, 40, 24, 24, "exp", torch.float16),
                                           dict(chunk_size=16, token_major=True)),
    }

    # launch.FOLD_GATES_BWD_CHUNKED: the gate gradients of a chunked call from the last dk + dv program of each
    # (batch, head) row, over all its chunks, instead of a mlstm_gates_bwd launch.
    CHUNKED_FOLD_CASES = {
        "exp 24x16 L16": ((1, 2, 45, 24, 16, "exp", torch.float32), dict(chunk_size=16)),
        "exp 16x24 L10 unnormalised, 2 key tiles": ((2, 1, 37, 16, 24, "exp", torch.float32),
                                                    dict(normalize=False, chunk_size=10, tiles=dict(BS=8, BT=8))),
        "sig 24x24 L16 fp16, row sums": ((1, 2, 70, 24, 24, "sig", torch.float16), dict(chunk_size=16, sig_rows=True)),
        "exp 24x24 L8 token-major, every chunked fold": ((2, 3, 40, 24, 24, "exp", torch.float32),
                                                         dict(chunk_size=8, token_major=True, all_folds=True)),
    }

    @pytest.mark.parametrize("case", list(CHUNKED_FOLD_CASES), ids=list(CHUNKED_FOLD_CASES))
    def test_gate_gradients_folded_into_dkdv_on_chunked_calls(fused, monkeypatch, fresh_tiles, case):
        (B, NH, S, DQK, DHV, gate, dtype), kw = CHUNKED_FOLD_CASES[case]
        normalize = kw.get("normalize", True)
        monkeypatch.setattr(launch, "ONE_PASS_DKDV", True)
        monkeypatch.setattr(launch, "SIG_STATE_TERMS_FROM_ROWS", kw.get("sig_rows", False))
        monkeypatch.setattr(launch, "ROW_TERMS_IN_STATE_ROWS", kw.get("all_folds", False))
        monkeypatch.setattr(launch, "FOLD_GATES_FWD_CHUNKED", kw.get("all_folds", False))
        if "tiles" in kw:
            monkeypatch.setattr(launch, "TILE_OVERRIDES", {"dkdv": kw["tiles"]})
        xs = _inputs_in_layout(B, NH, S, DQK, DHV, dtype, 93, False, kw.get("token_major"))
        # with every fold, seven launches: state rows, fwd state, fwd_h; state rows, bwd state, dq, dk + dv
        launches = (lambda on: 7 + (not on)) if kw.get("all_folds") else None
        _switch_both_ways(monkeypatch, "FOLD_GATES_BWD_CHUNKED", "mlstm_gates_bwd_kernel", xs, gate, normalize, False,
                          93, kw["chunk_size"], launches=launches)
        lay = launch.chunk_layout(S, kw["chunk_size"])
        arch = launch.gpu_arch(torch.device(DEVICE))
        assert launch.folds_gate_grads(DQK, DHV, arch, lay, state_pass=True, has_final_grad=False,
                                       state_terms_from_rows=True)
        # not with an initial state or a final-state gradient (their end terms are dots), nor without the row sums
        assert not launch.folds_gate_grads(DQK, DHV, arch, lay, state_pass=True, has_final_grad=True,
                                           state_terms_from_rows=True)
        assert not launch.folds_gate_grads(DQK, DHV, arch, lay, state_pass=True, has_final_grad=False, has_init=True,
                                           state_terms_from_rows=True)
        assert not launch.folds_gate_grads(DQK, DHV, arch, lay, state_pass=True, has_final_grad=False,
                                           state_terms_from_rows=False)
        check(B, NH, S, DQK, DHV, gate, dtype, normalize=normalize, chunk_size=kw["chunk_size"], seed=93)

    # launch.FOLD_GATES_FWD_CHUNKED: the gate vectors of a call with chunk states from its forward state-rows launch
    # (each program walks the rows before its chunk for the entering max state, launch.GATE_WALK_ROWS a step: walk_rows
    # lowers it to take several steps, the last one partial) instead of a mlstm_gates_fwd launch
    # (test_folds_into_the_state_rows_launch).
    STATE_ROW_GATE_CASES = {
        "exp 24x16 L16": ((1, 2, 45, 24, 16, "exp", torch.float32), dict(chunk_size=16)),
        "exp 16x24 L10 states in and out, walks of 16 rows": ((2, 1, 37, 16, 24, "exp", torch.float32),
                                                              dict(chunk_size=10, init=True, ret=True, walk_rows=16)),
        "sig 24x24 L16 fp16 unnormalised": ((1, 2, 70, 24, 24, "sig", torch.float16),
                                            dict(chunk_size=16, normalize=False)),
        "exp 24x24 one chunk, final state, token-major": ((2, 3, 40, 24, 24, "exp", torch.float32),
                                                          dict(chunk_size=64, ret=True, token_major=True)),
        "exp 136x40 L32, two head-dim slices, walks of 32 rows": ((1, 1, 70, 136, 40, "exp", torch.float32),
                                                                  dict(chunk_size=32, walk_rows=32)),
    }

    # The two folds into the state-rows launch: (switch, the launch it saves, cases, bitwise equal to the launch it
    # saves, seed). The row terms are the same sums in the same order; the gate vectors' scans may group differently.
    STATE_ROW_FOLDS = {
        "row terms": ("ROW_TERMS_IN_STATE_ROWS", "mlstm_bwd_rows_kernel", ROW_TERM_CASES, True, 91),
        "gate vectors": ("FOLD_GATES_FWD_CHUNKED", "mlstm_gates_fwd_kernel", STATE_ROW_GATE_CASES, False, 95),
    }

    @pytest.mark.parametrize("fold, case", [(fold, case) for fold, (*_, cases, _, _) in STATE_ROW_FOLDS.items()
                                            for case in cases])
    def test_folds_into_the_state_rows_launch(fused, monkeypatch, fresh_tiles, fold, case):
        attribute, saved_kernel, cases, exact, seed = STATE_ROW_FOLDS[fold]
        (B, NH, S, DQK, DHV, gate, dtype), kw = cases[case]
        init, ret, normalize = kw.get("init", False), kw.get("ret", False), kw.get("normalize", True)
        if "walk_rows" in kw:
            monkeypatch.setattr(launch, "GATE_WALK_ROWS", kw["walk_rows"])
        xs = _inputs_in_layout(B, NH, S, DQK, DHV, dtype, seed, init, kw.get("token_major"))
        _switch_both_ways(monkeypatch, attribute, saved_kernel, xs, gate, normalize, ret, seed, kw["chunk_size"],
                          exact=exact)
        # against float64 (the fold-off run above is the comparison with the default path)
        check(B, NH, S, DQK, DHV, gate, dtype, normalize=normalize, init=init, ret=ret, chunk_size=kw["chunk_size"],
              seed=seed, vs_default=False)

    @pytest.mark.parametrize("S, L, walk_rows, with_m0",
                             [(70, 8, 16, True), (45, 16, 2048, False), (33, 16, 16, False)])
    def test_gate_vectors_from_the_state_rows_launch_match_the_gate_launch(S, L, walk_rows, with_m0, monkeypatch):
        """The max states themselves (FOLD_GATES_FWD_CHUNKED's walk over the rows before each chunk, GATE_WALK_ROWS a
        step) against mlstm_gates_fwd's: the op's outputs hide an error in m wherever the normaliser's floor is not
        active, so the end-to-end cases above cannot catch one."""
        monkeypatch.setattr(launch, "GATE_WALK_ROWS", walk_rows)
        g = torch.Generator().manual_seed(7)
        BNH, D = 3, 16
        i = (torch.randn(BNH, S, generator=g) * 2.0).to(DEVICE)
        f = (torch.randn(BNH, S, generator=g) * 1.5 + 2.0).to(DEVICE)
        m0 = torch.randn(BNH, generator=g).to(DEVICE) if with_m0 else None
        k = torch.randn(BNH, S, D, generator=g).to(DEVICE)
        lay = launch.chunk_layout(S, L)
        want = launch.mlstm_gates_fwd(i, f, m0, lay, exp_gate=True)
        got = launch.gate_vector_buffers(i, lay)
        nsum = torch.zeros(BNH, lay.NC + 1, D, device=DEVICE)
        launch._state_rows(k, *got[:4], None, None, nsum, lay, 1, backward=False, gates=(i, f, m0), exp_gate=True)
        rows = [slice(c * lay.L, c * lay.L + min(lay.L, S - c * lay.L)) for c in range(lay.NC)]
        for name, a, b in zip(("F", "a", "m per row", "m per chunk"), got[:4], want[:4]):
            if name != "m per chunk":  # the padded tail of the last chunk is not read
                a, b = torch.cat([a[:, r] for r in rows], 1), torch.cat([b[:, r] for r in rows], 1)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
