"""The matrix kernels compile for the H100 (sm_90) with the shipped tiles, here on a CPU. The CUDA-only code never
runs in Triton's interpreter (FAST_EXP2's inline PTX, the wgmma tile shapes, the shared memory a tile needs), so
this is where CI sees it break."""

import os

import pytest

from tfla.triton import launch

triton = pytest.importorskip("triton")
_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="compiles the kernels; under the interpreter they are not compilable objects"),
    # tfla.triton.offline uses ASTSource's attribute format of Triton 3.8 (the version pip resolves here).
    pytest.mark.skipif(_TRITON < (3, 8), reason="offline compilation is written against Triton 3.8's ASTSource"),
]

H100_SHARED_MEMORY_PER_BLOCK = 227 * 1024


# DH 192's dk and dv come from the split pass (launch.dkdv_mode: "dkdv_k" / "dkdv_v", one accumulator each, which lets
# its 64-row key tiles take wgmma); its one-pass tiles stay compilable for GPUs whose table has no split.
@pytest.mark.parametrize("DH, names", [(96, ("fwd_h", "dq", "dk", "dv", "dkdv")),
                                       (192, ("fwd_h", "dq", "dkdv", "dkdv_k", "dkdv_v"))])
def test_matrix_kernels_compile_for_sm90_with_the_shipped_tiles(DH, names):
    from tfla.triton.offline import compile_kernel, sass_report

    for name in names:
        tiles = launch.tiles(name, DH, DH, "sm90")
        compiled = compile_kernel(name, DH, DH, 196, tiles, arch=90)
        # The decay's exp2 is the single flush-to-zero instruction (tl.exp would add a multiply and a denormal
        # fix-up per element).
        assert "ex2.approx.ftz.f32" in compiled.asm["ptx"], name
        assert compiled.metadata.shared <= H100_SHARED_MEMORY_PER_BLOCK, (name, tiles, compiled.metadata.shared)
        report = sass_report(compiled)
        counts = report["counts"]
        assert counts["HGMMA"] + counts["HMMA"] > 0, f"{name}: matrix products not on the tensor cores"
        # the products sit in the key / query loops (what bench/inspect_kernels.py --sections reads)
        assert any(loop["mma"] for loop in report["sections"]["loops"]), (name, report["sections"])
        if name in ("dkdv_k", "dkdv_v"):  # what the split is for: wgmma at 64-row key tiles, without the one pass's
            # spills (the tuned dk tiles keep an 8-byte stack with Triton 3.8; one pass at 64 rows had 320 bytes)
            assert counts["HGMMA"] > 0 and report["stack"] <= 16, (name, tiles, report["stack"])
        assert counts["MUFU"] > 0, name


def test_token_major_variants_compile_for_sm90():
    """NHT = 4: q, k, v, h and the gradients as token-major views (kernels._rows_base), what the ViL layers pass."""
    from tfla.triton.offline import compile_kernel

    for name in ("fwd_h", "dq", "dkdv"):
        tiles = dict(launch.tiles(name, 96, 96, "sm90"), NHT=4)
        compiled = compile_kernel(name, 96, 96, 196, tiles, arch=90)
        assert compiled.metadata.shared <= H100_SHARED_MEMORY_PER_BLOCK, name


@pytest.mark.parametrize("exp_gate", [True, False], ids=["exp", "sig"])
def test_gate_and_state_kernels_compile_for_sm90(exp_gate):
    """The gate kernels over groups of chunks (2-D scans along both axes: S = 4096 in chunks of 256, eight chunks a
    group) and one chunk of 1024 rows, the state kernels (the backward's with its shares of A_c) and the kernel that
    weights their rows: compilable for sm_90,
    the gate kernels without real spills (Triton 3.8 keeps an 8-byte stack in the grouped sig-gate backward; 3.6, the
    H200's, none: 120 registers)."""
    from tfla.triton import kernels as K
    from tfla.triton.offline import compile_launch, sass_report

    S, L = 4096, 256
    lay = launch.chunk_layout(S, L)
    BL = launch._pow2(L)
    CB = launch._gate_chunks_per_group(lay, BL)
    assert CB == 8
    ints = dict(S=S, L=L, NC=lay.NC, SP=lay.SP, NKO_Q=2, NKO_K=1, BNH=48, NPART=6)
    for cb, bl, ints_ in ((CB, BL, ints), (1, 1024, dict(ints, S=1024, L=1024, NC=1, SP=1024))):
        warps = launch._row_warps(cb * bl)
        fwd = compile_launch(K.mlstm_gates_fwd_kernel, dict(EXP_GATE=exp_gate, HAS_M0=True, BL=bl, CB=cb), ints_,
                             dict(num_warps=warps))
        bwd = [compile_launch(K.mlstm_gates_bwd_kernel, dict(EXP_GATE=exp_gate, STATE_TERMS=True, A_SHARES=shares,
                                                             HAS_AEND=not shares, HAS_DMF=True, HAS_INIT=True, BL=bl,
                                                             BP=16, CB=cb), ints_, dict(num_warps=warps))
               for shares in (True, False)]  # A_c from the state kernel's shares, or from the row sums
        for name, compiled in (("gates_fwd", fwd), ("gates_bwd", bwd[0]), ("gates_bwd rows", bwd[1])):
            assert sass_report(compiled)["stack"] <= 16, (name, cb, bl)
    ints = dict(S=S, L=L, NC=lay.NC, SP=lay.SP, DQK=96, DHV=96)
    for name, kernel, flags in (("bwd_state", K.mlstm_bwd_state_kernel, dict(HAS_FINAL=False, STATE_DOTS=True)),
                                ("fwd_state", K.mlstm_fwd_state_kernel, dict(HAS_INIT=False))):
        tiles = launch.tiles(name, 96, 96, "sm90")
        options = dict(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
        consts = dict(flags, PREC="tf32", NHT=1, **{k: v for k, v in tiles.items() if k not in options})
        compiled = compile_launch(kernel, consts, ints, options)
        assert compiled.metadata.shared <= H100_SHARED_MEMORY_PER_BLOCK, name
        assert sass_report(compiled)["stack"] == 0, name  # bf16 states, weighted rows: no spills
    # the kernel that weights the state kernels' rows (launch._state_rows), both ways; forward also with the gate
    # vectors (FOLD_GATES_FWD_CHUNKED)
    for backward, gates_fwd in ((False, False), (True, False), (False, True)):
        BT, BD = launch.STATE_ROWS_TILE
        consts = dict(D=96, BACKWARD=backward, BT=BT, BD=BD, NHT=4, ROW_TERMS=False, NORMALIZE=True, EXP_GATE=True,
                      BV=16, GATES_FWD=gates_fwd, HAS_M0=False, GL=L,  # defaults are no constexprs to ASTSource
                      GW=launch.GATE_WALK_ROWS)
        compiled = compile_launch(K.mlstm_state_rows_kernel, consts, ints, dict(num_warps=4))
        assert sass_report(compiled)["stack"] == 0, (backward, gates_fwd)
    # the backward one with the row terms (launch.ROW_TERMS_IN_STATE_ROWS), at its tiles for DH 96 and DH 192
    for D in (96, 192):
        BT, BD = launch.state_rows_tile(D, row_terms=True)
        consts = dict(D=D, BACKWARD=True, BT=BT, BD=BD, NHT=4, ROW_TERMS=True, NORMALIZE=True, EXP_GATE=True,
                      BV=min(launch._pow2(D), 128), GATES_FWD=False, HAS_M0=False, GL=16, GW=16)
        compiled = compile_launch(K.mlstm_state_rows_kernel, consts, dict(ints, DHV=D), dict(num_warps=4))
        assert sass_report(compiled)["stack"] == 0, D


@pytest.mark.parametrize("DH, S, chunk", [(384, 1024, 0), (512, 1024, 0), (192, 4096, 256), (384, 4096, 256),
                                          (512, 4096, 256)])
def test_score_matrix_kernels_compile_for_sm90_with_the_shipped_tiles(DH, S, chunk):
    """The score-matrix path's kernels (launch.uses_score_matrix: DH 384 / 512 in one chunk, DH 192 / 384 / 512 in
    chunks of 256 with the state terms) at their shipped tiles: products on the tensor cores' wgmma, within the
    shared memory, the decay's exp2 one instruction."""
    from tfla.triton.offline import compile_kernel, sass_report

    for name in ("scores_fwd", "scores_bwd", "score_rows", "score_cols"):
        tiles = launch.tiles(name, DH, DH, "sm90", with_states=chunk > 0)
        compiled = compile_kernel(name, DH, DH, S, tiles, arch=90, chunk=chunk)
        assert compiled.metadata.shared <= H100_SHARED_MEMORY_PER_BLOCK, (name, tiles, compiled.metadata.shared)
        report = sass_report(compiled)
        assert report["counts"]["HGMMA"] > 0, f"{name}: products not on wgmma ({tiles})"
        if name.startswith("scores"):
            assert "ex2.approx.ftz.f32" in compiled.asm["ptx"], name
