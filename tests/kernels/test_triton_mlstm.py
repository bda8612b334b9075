"""Triton TFLA kernels vs the float64 reference: outputs and every gradient, odd sizes, both gates, states, chunks.

On a machine without a GPU the kernels run in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before the kernels are defined. So that the rest of the suite keeps its normal process, this module then re-runs
itself in a child process with the variable set (one test here, the per-case results in its output). With a GPU, or
when TRITON_INTERPRET=1 is already set, the cases run directly. The interpreter computes bfloat16 products wrong,
so bfloat16 is tested on the GPU only (also bench/check_mlstm_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _interpreter import DEVICE, ON_GPU, RUN_HERE, run_module_in_interpreter

if not RUN_HERE:

    def test_triton_kernels_in_interpreter():
        """Runs this file's cases in a child process with TRITON_INTERPRET=1 (the interpreter is CPU-only)."""
        run_module_in_interpreter(__file__)

else:
    from tfla import MLSTMState, mlstm, mlstm_parallel
    from tfla.triton import mlstm_triton

    DTYPES = (torch.float32, torch.float16) if not ON_GPU else (torch.float32, torch.float16, torch.bfloat16)
    # Relative L2 error against float64, at least; ill-conditioned draws may take 5x what the float32 reference makes.
    TOL = {torch.float32: 3e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

    def _inputs(B, NH, S, DQK, DHV, dtype, seed, init):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, scale=1.0, shift=0.0):
            return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE)

        xs = [rnd(B, NH, S, DQK).to(dtype), rnd(B, NH, S, DQK).to(dtype), rnd(B, NH, S, DHV).to(dtype),
              rnd(B, NH, S, scale=2.0), rnd(B, NH, S, scale=1.5, shift=2.0)]
        if init:
            xs += [rnd(B, NH, DQK, DHV, scale=0.5), rnd(B, NH, DQK, scale=0.5), rnd(B, NH, scale=1.0)]
        return xs

    def _run(fn, xs, gate, normalize, ret, seed, **kw):
        state = MLSTMState(*xs[5:8]) if len(xs) > 5 else None
        out = fn(*xs[:5], gate=gate, normalize=normalize, initial_state=state, return_state=ret, **kw)
        h, st = (out if ret else (out, None))
        g = torch.Generator().manual_seed(seed + 7)
        loss = (h.double() * torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.device)).sum()
        if ret:
            for t in st:
                loss = loss + (t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)).sum()
        loss.backward()
        return [h] + (list(st) if ret else [])

    def _rel(a, b):
        # Relative L2 error; a reference that is ~0 everywhere (df at S=1) is measured against an RMS of 1e-2.
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-2 * b.numel() ** 0.5)).item()

    def check(B, NH, S, DQK, DHV, gate, dtype, *, normalize=True, init=False, ret=False, chunk_size=None, seed=0):
        xs = [t.requires_grad_() for t in _inputs(B, NH, S, DQK, DHV, dtype, seed, init)]
        ref_xs = [t.detach().double().requires_grad_() for t in xs]
        outs = _run(mlstm_triton, xs, gate, normalize, ret, seed, chunk_size=chunk_size)
        ref_outs = _run(mlstm_parallel, ref_xs, gate, normalize, ret, seed)
        r32_xs = [t.detach().float().requires_grad_() for t in xs]
        r32_outs = _run(mlstm_parallel, r32_xs, gate, normalize, ret, seed)
        assert outs[0].dtype == dtype and outs[0].shape == (B, NH, S, DHV)
        names = ["h", "C", "n", "m"][: len(outs)]
        errors, limits = {}, {}
        for name, a, b, b32 in zip(names, outs, ref_outs, r32_outs):
            if name == "m" and gate == "sig":
                assert torch.all(a == 0)
                continue
            assert torch.isfinite(a).all(), name
            errors[name], limits[name] = _rel(a, b), max(TOL[dtype], 5 * _rel(b32, b))
        for name, x, rx, x32 in zip(["q", "k", "v", "i", "f", "C0", "n0", "m0"], xs, ref_xs, r32_xs):
            if rx.grad is None:  # m0 does not enter the sigmoid-gate mLSTM
                assert x.grad is None or torch.all(x.grad == 0), name
                continue
            assert x.grad is not None and x.grad.dtype == x.dtype and torch.isfinite(x.grad).all(), name
            errors["d" + name] = _rel(x.grad, rx.grad)
            limits["d" + name] = max(TOL[dtype], 5 * _rel(x32.grad, rx.grad))
        bad = {k: (f"{v:.1e}", f"{limits[k]:.1e}") for k, v in errors.items() if not v <= limits[k]}
        assert not bad, f"errors above limits: {bad} (all: {errors})"

    # Odd sizes: S in {1, 17, 63, 196}, head dims 16, 24, 96 (dqk != dhv included), both gates, fp32 and fp16.
    SHAPES = [(1, 2, 1, 16, 16), (1, 2, 17, 24, 16), (2, 1, 63, 16, 24), (1, 2, 196, 96, 96)]

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("gate", ["exp", "sig"])
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_single_chunk(shape, gate, dtype):
        check(*shape, gate, dtype)

    @pytest.mark.parametrize("shape", [(1, 2, 17, 16, 24), (1, 1, 63, 24, 16)], ids=lambda s: "x".join(map(str, s)))
    def test_sig_without_normaliser(shape):
        check(*shape, "sig", torch.float32, normalize=False)

    @pytest.mark.parametrize("chunk_size", [None, 16, 23], ids=lambda c: f"L{c}")
    @pytest.mark.parametrize("gate", ["exp", "sig"])
    def test_states_and_chunks(gate, chunk_size):
        """Initial state in, final state out, gradients through both; several chunks with a short last one."""
        check(1, 2, 63, 24, 16, gate, torch.float32, init=True, ret=True, chunk_size=chunk_size, seed=3)

    @pytest.mark.parametrize("chunk_size", [1, 64], ids=lambda c: f"L{c}")
    def test_chunk_size_extremes(chunk_size):
        check(1, 1, 37, 16, 16, "exp", torch.float32, ret=True, chunk_size=chunk_size, seed=5)

    def test_chunked_fp16_with_state():
        check(1, 1, 63, 16, 24, "exp", torch.float16, init=True, ret=True, chunk_size=20, seed=4)

    def test_deterministic():
        xs = _inputs(1, 2, 63, 24, 24, torch.float32, 11, False)
        runs = []
        for _ in range(2):
            ys = [t.detach().clone().requires_grad_() for t in xs]
            h = mlstm_triton(*ys, gate="exp", chunk_size=20)
            h.backward(torch.ones_like(h))
            runs.append([h.detach()] + [y.grad for y in ys])
        for a, b in zip(*runs):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("ret", [False, True])
    def test_eager_call_frees_its_buffers_without_the_garbage_collector(ret):
        # The eager autograd.Function keeps gate vectors, normaliser sums and internal states on ctx; if one of them
        # were also an output, ctx and output would hold each other and the GPU memory would wait for gc.collect().
        import gc
        import weakref

        xs = [t.requires_grad_() for t in _inputs(1, 2, 30, 16, 16, torch.float32, 5, False)]
        out = mlstm_triton(*xs, gate="exp", chunk_size=16, return_state=ret)
        h = out[0] if ret else out
        kept = [h.grad_fn.qn, *h.grad_fn.gates] + ([] if ret else list(h.grad_fn.states))
        refs = [weakref.ref(t) for t in kept]
        del kept
        gc.disable()
        try:
            del out, h
            alive = [r() is not None for r in refs]
        finally:
            gc.enable()
        assert not any(alive), alive

    def test_op_dispatch():
        xs = _inputs(1, 1, 17, 16, 16, torch.float32, 2, False)
        h_triton = mlstm(*xs, backend="triton")
        h_ref = mlstm(*xs, backend="parallel")
        assert _rel(h_triton, h_ref) < 1e-5
        with pytest.raises(ValueError, match="head dims"):
            mlstm(*_inputs(1, 1, 5, 8, 8, torch.float32, 0, False), backend="triton")

    @pytest.mark.parametrize("in_place", [False, True], ids=["copied", "in-place"])
    @pytest.mark.parametrize("init", [False, True])
    @pytest.mark.parametrize("kept_scores", [False, True])
    def test_fake_kernels_match_real_strides(init, kept_scores, in_place, monkeypatch):
        # The ViL layer hands the op transposed views ([B, S, NH, DH] memory); torch.compile trusts the fake kernels'
        # strides and asserts them on the real outputs, so fake and real must agree for such inputs and for states,
        # and for the score-matrix path's weights that the forward keeps for the backward (launch.KEEP_SCORES).
        from tfla.triton import function, launch
        from tfla.triton.function import mlstm_bwd_op, mlstm_fwd_op

        monkeypatch.setattr(function, "TOKEN_MAJOR_IN_PLACE", in_place)
        monkeypatch.setattr(launch, "SCORE_MATRIX", True if kept_scores else None)
        monkeypatch.setattr(launch, "KEEP_SCORES", kept_scores)
        B, NH, S, DH = 1, 2, 21, 16
        g = torch.Generator().manual_seed(4)
        q, k, v = (torch.randn(B, S, NH, DH, generator=g).transpose(1, 2) for _ in range(3))
        i, f = (torch.randn(B, S, NH, generator=g).transpose(1, 2) for _ in range(2))
        assert not q.is_contiguous()
        C0, n0, m0 = ((torch.randn(B, NH, DH, DH, generator=g), torch.randn(B, NH, DH, generator=g),
                       torch.randn(B, NH, generator=g)) if init else (None, None, None))
        fwd_args = (q, k, v, i, f, C0, n0, m0, True, True, 8, 1e-6, True, kept_scores)
        # with kept weights, also the AOT-dispatch test: it compares every output of two runs, the kept W's unused
        # elements included (which is why its buffer starts zeroed: launch.mlstm_fwd_score_matrix)
        aot = ("test_aot_dispatch_dynamic",) if kept_scores else ()
        torch.library.opcheck(mlstm_fwd_op, fwd_args, test_utils=("test_schema", "test_faketensor", *aot))
        h, Cst, nst, mst, qn, gate_rows, scores = mlstm_fwd_op(*fwd_args)
        assert (scores.numel() > 0) == kept_scores
        dh = torch.randn(B, S, NH, DH, generator=g).transpose(1, 2)
        bwd_args = (dh, None, None, None, q, k, v, i, f, C0, n0, m0, h, Cst, nst, qn, mst, gate_rows, scores, True,
                    True, 8, 1e-6)
        torch.library.opcheck(mlstm_bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))

    def test_compiled_graph_uses_the_custom_op_and_matches_eager():
        """Eager calls go through an autograd.Function (the custom op's host cost is ~1 ms on an H100); a compiled
        graph must still capture the custom op, without graph breaks, and give the eager gradients."""
        xs = [x.requires_grad_() for x in _inputs(1, 2, 23, 16, 24, torch.float32, 3, False)]

        def loss_fn(q, k, v, i, f):
            return mlstm_triton(q, k, v, i, f, gate="exp").square().sum()

        eager = loss_fn(*xs)
        g_eager = torch.autograd.grad(eager, xs)
        graphs = []

        def record(gm, example_inputs):
            graphs.append(str(gm.graph))
            return gm.forward

        torch._dynamo.reset()
        try:
            out = torch.compile(loss_fn, backend=record, fullgraph=True)(*xs)
            g_comp = torch.autograd.grad(out, xs)
        finally:
            torch._dynamo.reset()
        assert len(graphs) == 1 and "tfla.mlstm_fwd" in graphs[0], graphs
        assert _rel(out, eager) < 1e-6
        for a, b in zip(g_comp, g_eager):
            assert _rel(a, b) < 1e-6

    # Tile shapes other than the defaults: what the tuned table picks on a GPU (query tiles twice the key tiles and
    # the reverse, head dims read in slices narrower than the dim with a ragged last slice, one-pass dk+dv or not).
    TILE_CASES = {
        "query-side 2:1, sliced dims": dict(
            fwd_h=dict(BT=32, BS=16, BK=16, BV=16), dq=dict(BT=32, BS=16, BV=16, BKO=16)),
        "key-side 1:2, sliced dims": dict(
            dk=dict(BT=16, BS=32, BV=16, BKO=16), dv=dict(BT=16, BS=32, BK=16, BVO=16)),
        "key-side one pass 1:2": dict(dkdv=dict(BT=16, BS=32)),
        "state kernels, narrow tiles": dict(  # chunked cases only (the second check below)
            fwd_state=dict(BS=16, BK=16, BV=32, num_warps=2), bwd_state=dict(BT=32, BK=32, BV=16, num_warps=2)),
        "exact slices": dict(
            fwd_h=dict(BT=32, BS=32, BK=16, BV=32), dq=dict(BT=32, BS=32, BV=16, BKO=32),
            dk=dict(BT=32, BS=32, BV=16, BKO=16), dv=dict(BT=32, BS=32, BK=16, BVO=16)),
    }

    @pytest.mark.parametrize("one_pass", [False, True], ids=["dk+dv", "dkdv"])
    @pytest.mark.parametrize("case", list(TILE_CASES), ids=list(TILE_CASES))
    def test_other_tiles(case, one_pass):
        from tfla.triton import launch

        from tfla.triton import function

        launch.TILE_OVERRIDES.update(TILE_CASES[case])
        launch.ONE_PASS_DKDV = one_pass
        # The one-pass kernel runs on the fused path only; without it, the unfused path's dk and dv kernels.
        shipped = function.FUSED_KERNELS
        function.FUSED_KERNELS = bool(one_pass)
        try:
            check(1, 2, 70, 40, 24, "exp", torch.float32, seed=11)
            check(1, 1, 45, 24, 40, "sig", torch.float32, init=True, ret=True, chunk_size=16, seed=12)
            check(1, 1, 50, 48, 32, "exp", torch.float32, seed=13)  # head dims that the slices divide
        finally:
            launch.TILE_OVERRIDES.clear()
            launch.ONE_PASS_DKDV = None
            function.FUSED_KERNELS = shipped

    def test_tile_table_is_well_formed():
        """Every entry of the shipped tuned table names a kernel, satisfies the tile constraints and fits the dims."""
        import json

        from tfla.triton import launch

        table = json.loads(launch.TUNED_TILES_FILE.read_text())
        for arch, entries in table.items():
            for key in ("dkdv_one_pass", "dkdv_split", "dkdv_split:states"):  # lists of padded head dims
                assert set(entries.get(key, [])) <= {16, 32, 64, 128, 256}, (arch, key)
            for key, cfg in entries.items():
                if key.startswith(("dkdv_one_pass", "dkdv_split")):
                    continue
                # "dkdv_k:192:192:states": a chunk-state variant's; "dkdv:96:96:short": one short chunk's, on top
                # of the kernel's own entry, which is resolved with it
                kernel, dqk, dhv, *qualifier = key.split(":")
                assert qualifier in ([], ["states"], ["short"]), key
                base = f"{kernel}:{dqk}:{dhv}"
                launch.reset_tile_caches(arch, {k: entries[k] for k in (base, key) if k in entries})
                try:
                    got = launch.tiles(kernel, int(dqk), int(dhv), arch, with_states=qualifier == ["states"],
                                       rows=196 if qualifier == ["short"] else 0)
                finally:
                    launch.reset_tile_caches()
                assert "num_warps" in got and ({"BT", "BS"} & set(got)), key
                # widths are powers of two >= 16; a second head-dim piece (BK2, BV2, BKO2) may be 0: none
                assert all((v >= 16 or (k.endswith("2") and v == 0)) and v & (v - 1) == 0
                           for k, v in got.items() if k.startswith("B")), key

    def test_tiles_that_break_the_mask_rule_are_refused():
        from tfla.triton import launch

        launch.TILE_OVERRIDES["fwd_h"] = dict(BT=16, BS=32)
        try:
            with pytest.raises(ValueError, match="BT must be a multiple of BS"):
                launch.tiles("fwd_h", 32, 32)
        finally:
            launch.TILE_OVERRIDES.clear()
