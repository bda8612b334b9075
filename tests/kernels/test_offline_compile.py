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
