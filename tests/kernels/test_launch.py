"""Launch wrappers without running kernels: tiles that do not fit a GPU shrink instead of failing the call."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("triton")

from triton.runtime.errors import OutOfResources

from tfla.triton import launch


class FakeKernel:
    """Stands in for a Triton kernel: `kernel[grid](*args, **meta)` records the launch, and raises OutOfResources
    (as Triton does at launch) while the tiles need more shared memory than `fits` allows."""

    __name__ = "fake_kernel"

    def __init__(self, fits):
        self.fits = fits
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            if not self.fits(meta):
                raise OutOfResources(300_000, 232_448, "shared memory")
            self.launches.append((grid, args, meta))

        return run


@pytest.fixture(autouse=True)
def clean_shrunk_tiles(monkeypatch):
    monkeypatch.setattr(launch, "_SHRUNK_TILES", {})
    monkeypatch.setattr(launch, "SHRINK_TILES_THAT_DO_NOT_FIT", True)


TILES = dict(BT=64, BS=64, BK=256, BV=256, num_warps=4, num_stages=3)


def grid_of(t):
    return (1024 // t["BS"], 8)


def test_tiles_that_fit_launch_unchanged():
    kernel = FakeKernel(lambda meta: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launch._launch_tiled(kernel, grid_of, dict(TILES), "x", HAS_FINAL=True)
    (grid, args, meta), = kernel.launches
    assert grid == (16, 8) and args == ("x",)
    assert meta == dict(TILES, HAS_FINAL=True)
    assert launch._SHRUNK_TILES == {}


def test_tiles_that_do_not_fit_shrink_once_and_are_remembered():
    # Fits only with one pipeline stage and 32-row tiles: stages drop first, then the row tiles halve.
    kernel = FakeKernel(lambda meta: meta["num_stages"] == 1 and meta["BS"] <= 32)
    with pytest.warns(UserWarning, match="fake_kernel: tiles .* do not fit this GPU"):
        launch._launch_tiled(kernel, grid_of, dict(TILES), "x", HAS_FINAL=True)
    (grid, _, meta), = kernel.launches
    assert (meta["num_stages"], meta["BT"], meta["BS"], meta["BK"], meta["BV"]) == (1, 32, 32, 256, 256)
    assert grid == (32, 8)  # the grid follows the shrunk tiles
    # The next launch of the same variant goes straight to the tiles that worked, without a warning.
    kernel.fits = lambda meta: meta["BS"] <= 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launch._launch_tiled(kernel, grid_of, dict(TILES), "x", HAS_FINAL=True)
    assert kernel.launches[-1][2]["BS"] == 32
    # Another variant (other constexprs) starts from its own tiles again.
    kernel.fits = lambda meta: True
    launch._launch_tiled(kernel, grid_of, dict(TILES), "x", HAS_FINAL=False)
    assert kernel.launches[-1][2]["BS"] == 64


def test_stages_drop_one_at_a_time():
    # A variant a little over the limit at three stages keeps two (pipelined loads), not one.
    kernel = FakeKernel(lambda meta: meta["num_stages"] <= 2)
    with pytest.warns(UserWarning, match="do not fit"):
        launch._launch_tiled(kernel, grid_of, dict(TILES), "x")
    (_, _, meta), = kernel.launches
    assert (meta["num_stages"], meta["BT"], meta["BS"]) == (2, 64, 64)


def test_shrinking_leaves_no_reference_cycle():
    """The caller's objects (in the model: the autograd graph of the step) must not outlive the call through the
    OutOfResources traceback: a kept graph broke a later CUDA-graph capture on the H200."""
    import gc
    import weakref

    class Payload:
        pass

    kernel = FakeKernel(lambda meta: meta["num_stages"] == 1)

    def caller():
        payload = Payload()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            launch._launch_tiled(kernel, grid_of, dict(TILES), payload)
        return weakref.ref(payload)

    gc.disable()
    try:
        ref = caller()
        kernel.launches.clear()  # the fake kernel's own record of the argument
        assert ref() is None, "the launch's arguments are still alive after the call"
    finally:
        gc.enable()


def test_tiles_that_never_fit_raise():
    kernel = FakeKernel(lambda meta: False)
    with pytest.raises(OutOfResources):
        launch._launch_tiled(kernel, grid_of, dict(TILES), "x")


def test_tuner_mode_does_not_shrink(monkeypatch):
    monkeypatch.setattr(launch, "SHRINK_TILES_THAT_DO_NOT_FIT", False)
    kernel = FakeKernel(lambda meta: meta["num_stages"] == 1)
    with pytest.raises(OutOfResources):
        launch._launch_tiled(kernel, grid_of, dict(TILES), "x")
    assert kernel.launches == []


@pytest.mark.parametrize("d, want", [(16, (16, 0)), (24, (32, 0)), (40, (32, 16)), (48, (32, 16)), (64, (64, 0)),
                                     (96, (64, 32)), (100, (128, 0)), (192, (128, 64)), (200, (256, 0)),
                                     (384, (256, 128)), (512, (512, 0))])
def test_head_dim_pieces_cover_the_dim_with_less_padding(d, want):
    first, second = launch.head_dim_pieces(d)
    assert (first, second) == want
    assert first + second >= d and first + second <= launch._pow2(d)


def test_register_cap_travels_from_the_table_to_the_launch(monkeypatch):
    """A "maxnreg" in a tuned entry (bench/tune_mlstm.py --register-caps) is a Triton launch option: tiles() returns
    it with that entry's tiles only, the launch passes it on, and a shrink after an out-of-resources failure keeps
    it."""
    monkeypatch.setattr(launch, "HEAD_DIM_PIECES", True)
    monkeypatch.setattr(launch, "TILE_OVERRIDES", {})
    monkeypatch.setattr(launch, "_SHRUNK_TILES", {})
    launch.reset_tile_caches("sm90", {"dq:96:96": dict(BT=64, BS=32, num_warps=4, num_stages=3, maxnreg=128)})
    try:
        cfg = launch.tiles("dq", 96, 96, "sm90")
        assert (cfg["maxnreg"], cfg["BKO"], cfg["BKO2"]) == (128, 64, 32)
        assert "maxnreg" not in launch.tiles("dq", 128, 128, "sm90")
        assert "maxnreg" not in launch.tiles("fwd_h", 96, 96, "sm90")
        monkeypatch.setattr(launch, "PIECES_WITH_STATES", True)  # the states variant reads the same entry
        launch.reset_tile_caches("sm90", {"dq:96:96": dict(BT=64, BS=32, num_warps=4, num_stages=3, maxnreg=128)})
        assert "maxnreg" not in launch.tiles("dq", 96, 96, "sm90", with_states=True)  # the cap was measured without
        assert launch.tiles("dq", 96, 96, "sm90", with_states=True)["BKO2"] == 32
        calls = []

        class RecordingKernel:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    calls.append(kwargs)
                    if len(calls) == 1:
                        raise OutOfResources(240000, 232448, "shared memory")
                return run

        with pytest.warns(UserWarning, match="do not fit this GPU"):
            launch._launch_tiled(RecordingKernel(), lambda t: (1,), cfg, DQK=96)
        assert [c["maxnreg"] for c in calls] == [128, 128]
        assert [c["num_stages"] for c in calls] == [3, 2]
    finally:
        launch.reset_tile_caches()


def test_short_chunk_entries_apply_to_one_short_chunk_without_states(monkeypatch):
    """A "kernel:DQK:DHV:short" entry (launch.SHORT_CHUNK_ROWS) changes the tiles of a one-chunk call of at most that
    many rows without states, on top of the kernel's own entry, and of nothing else."""
    monkeypatch.setattr(launch, "HEAD_DIM_PIECES", True)
    monkeypatch.setattr(launch, "TILE_OVERRIDES", {})
    launch.reset_tile_caches("sm90", {"dkdv:96:96": dict(BT=32, BS=64, num_warps=4, num_stages=3),
                                      "dkdv:96:96:short": dict(BT=16),
                                      "dq:128:128:short": dict(BT=128)})
    try:
        short = launch.tiles("dkdv", 96, 96, "sm90", rows=196)
        assert (short["BT"], short["BS"], short["BK2"]) == (16, 64, 32)
        assert launch.tiles("dkdv", 96, 96, "sm90", rows=launch.SHORT_CHUNK_ROWS)["BT"] == 16
        assert launch.tiles("dkdv", 96, 96, "sm90", rows=1024)["BT"] == 32
        assert launch.tiles("dkdv", 96, 96, "sm90")["BT"] == 32  # chunked: rows 0
        assert launch.tiles("dkdv", 96, 96, "sm90", rows=196, with_states=True)["BT"] != 16
        chunked_dq = launch.tiles("dq", 128, 128, "sm90")["BT"]
        assert chunked_dq != 128 and launch.tiles("dq", 128, 128, "sm90", rows=1024)["BT"] == chunked_dq
        assert launch.tiles("dq", 128, 128, "sm90", rows=196)["BT"] == 128  # a power of two: the padded key
    finally:
        launch.reset_tile_caches()


def test_pieces_replace_widths_and_one_program_covers_the_head_dim(monkeypatch):
    monkeypatch.setattr(launch, "HEAD_DIM_PIECES", True)
    monkeypatch.setattr(launch, "TILE_OVERRIDES", {})
    launch.reset_tile_caches("sm90", {"fwd_h:256:256": dict(BK=64, BV=128, BT=64, BS=32, num_warps=8),
                                      "dq:192:192": dict(BT=128, BS=64, num_warps=8)})
    try:
        fwd = launch.tiles("fwd_h", 192, 192, "sm90")
        # widths from the pieces, row tiles and warps from the padded dims' entry
        assert (fwd["BK"], fwd["BK2"], fwd["BV"], fwd["BV2"]) == (128, 64, 128, 64)
        assert (fwd["BS"], fwd["num_warps"]) == (32, 8)
        dq = launch.tiles("dq", 192, 192, "sm90")  # an entry measured with the pieces, under the exact dims
        assert (dq["BKO"], dq["BKO2"], dq["BT"], dq["num_warps"]) == (128, 64, 128, 8)
        assert launch.tiles("fwd_h", 256, 256, "sm90")["BK2"] == 0  # a power of two: no pieces
        assert launch.tiles("fwd_h", 384, 384, "sm90")["BV2"] == 0  # wider than PIECES_MAX_HEAD_DIM
        launch.TILE_OVERRIDES["fwd_h"] = dict(BV=64)  # a width alone: one piece of that width (slices)
        assert launch.tiles("fwd_h", 192, 192, "sm90")["BV2"] == 0
        launch.TILE_OVERRIDES["fwd_h"] = dict(BV=64, BV2=64)  # pieces that leave columns unwritten
        with pytest.raises(ValueError, match="must cover a head dim of 192"):
            launch.tiles("fwd_h", 192, 192, "sm90")
        launch.TILE_OVERRIDES.clear()
        monkeypatch.setattr(launch, "HEAD_DIM_PIECES", False)
        assert launch.tiles("fwd_h", 96, 96, "sm90")["BK2"] == 0
    finally:
        launch.reset_tile_caches()


def test_state_variants_take_no_pieces_on_a_gpu_unless_enabled_or_tuned(monkeypatch):
    """launch.PIECES_WITH_STATES: the kernels with a chunk state keep padded tiles on a GPU, where they were faster,
    unless the shipped table has an entry for their state variant (fwd_h at DH 96 since session 22); the
    interpreter, where the tests check the pieces' state terms, keeps the pieces."""
    monkeypatch.setattr(launch, "HEAD_DIM_PIECES", True)
    monkeypatch.setattr(launch, "TILE_OVERRIDES", {})
    launch.reset_tile_caches()
    try:
        for kernel in ("fwd_h", "dq", "dkdv"):
            assert launch.head_dim_piece_tiles(kernel, 96, 96)
            plain = launch.tiles(kernel, 96, 96, "sm90")
            states = launch.tiles(kernel, 96, 96, "sm90", with_states=True)
            assert any(plain[k] for k in ("BK2", "BV2", "BKO2") if k in plain), kernel
            tuned = f"{kernel}:96:96:states" in launch.tuned_tiles("sm90")
            assert tuned == (kernel == "fwd_h"), kernel
            assert any(states.get(k) for k in ("BK2", "BV2", "BKO2")) == tuned, (kernel, states)
            assert any(launch.tiles(kernel, 96, 96, "cpu", with_states=True).get(k) for k in ("BK2", "BV2", "BKO2"))
        monkeypatch.setattr(launch, "PIECES_WITH_STATES", True)
        launch.reset_tile_caches()
        assert launch.tiles("dkdv", 96, 96, "sm90", with_states=True)["BV2"] == 32
    finally:
        launch.reset_tile_caches()


def test_a_tuned_state_entry_gives_the_state_variant_pieces_and_its_tiles(monkeypatch):
    """`bench/tune_mlstm.py --states` writes "dkdv:96:96:states" only where pieces beat the padded tiles there: such an
    entry turns the pieces on for that kernel's state variant on a GPU and brings its own tiles."""
    monkeypatch.setattr(launch, "HEAD_DIM_PIECES", True)
    monkeypatch.setattr(launch, "PIECES_WITH_STATES", False)
    monkeypatch.setattr(launch, "TILE_OVERRIDES", {})
    table = {"dkdv:96:96": dict(BT=32, BS=64), "dkdv:96:96:states": dict(BT=16, BS=32, num_stages=2)}
    launch.reset_tile_caches("sm90", table)
    try:
        states = launch.tiles("dkdv", 96, 96, "sm90", with_states=True)
        assert (states["BK2"], states["BV2"], states["BT"], states["BS"], states["num_stages"]) == (32, 32, 16, 32, 2)
        plain = launch.tiles("dkdv", 96, 96, "sm90")
        assert (plain["BT"], plain["BS"]) == (32, 64)  # the stateless variant keeps its own entry
        assert not launch.tiles("fwd_h", 96, 96, "sm90", with_states=True)["BK2"]  # no entry: padded
    finally:
        launch.reset_tile_caches()


def test_score_products_of_a_chunked_head_dim_that_is_no_power_of_two_read_their_exact_entry(monkeypatch):
    """The score-matrix products kernels of a chunked call look up "score_rows:512:512:states" (the padded dims), then
    an entry under the exact dims on top: DH 384 may slice its 384 columns differently from DH 512 (bench/tune_mlstm.py
    --score-matrix writes chunked non-power-of-two head dims there). One-chunk calls and DH 512 ignore it."""
    monkeypatch.setattr(launch, "TILE_OVERRIDES", {})
    table = {"score_rows:512:512:states": dict(BT=64, BO=128, num_warps=4),
             "score_rows:384:384:states": dict(BT=128, num_warps=8)}
    launch.reset_tile_caches("sm90", table)
    try:
        dh384 = launch.tiles("score_rows", 384, 384, "sm90", with_states=True)
        assert (dh384["BT"], dh384["BO"], dh384["num_warps"]) == (128, 128, 8)
        dh512 = launch.tiles("score_rows", 512, 512, "sm90", with_states=True)
        assert (dh512["BT"], dh512["num_warps"]) == (64, 4)
        one_chunk = launch.tiles("score_rows", 384, 384, "sm90")
        assert (one_chunk["BT"], one_chunk["num_warps"]) == (64, 4)  # the defaults: no ":states" entry applies
    finally:
        launch.reset_tile_caches()


def test_tuner_keeps_the_current_tiles_when_a_candidate_wins_by_noise(monkeypatch):
    """bench/tune_mlstm.py writes a candidate only where it beats the current tiles by more than MIN_GAIN (1 %): a
    0.5 % "win" is measurement noise and must not become a table entry; a 2 % one must."""
    import sys
    from pathlib import Path

    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    tune_mlstm = pytest.importorskip("tune_mlstm")
    monkeypatch.setattr(tune_mlstm, "fwd", lambda x, S: [torch.ones(3)] * 5)  # the kernel's outputs, all equal

    def run(times, cands):
        it = iter(times)
        monkeypatch.setattr(tune_mlstm, "gpu_ms", lambda step: next(it))  # current first, then each candidate
        return tune_mlstm.tune_kernel("fwd_h", 96, 196, None, {}, 60, lambda msg: None, cands=cands)

    best, base_ms, best_ms, rows = run([1.0, 0.995, 0.9999], [{"BT": 32}, {"BT": 16}])
    assert best is None and best_ms == base_ms == 1.0 and len(rows) == 2
    best, _, best_ms, _ = run([1.0, 0.995, 0.98], [{"BT": 32}, {"BT": 16}])
    assert best == {"BT": 16} and best_ms == 0.98
    sys.modules.pop("tune_mlstm", None)
