"""Launch wrappers for the kernels in kernels.py: block sizes, grids, output allocation. No autograd here."""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from triton.runtime.errors import OutOfResources

from .direct_launch import direct_launch
from .kernels import (
    mlstm_bwd_delta_kernel,
    mlstm_bwd_dk_kernel,
    mlstm_bwd_dkdv_kernel,
    mlstm_bwd_dq_kernel,
    mlstm_bwd_dv_kernel,
    mlstm_bwd_rows_kernel,
    mlstm_bwd_chunk_state_kernel,
    mlstm_bwd_state_kernel,
    mlstm_fwd_h_kernel,
    mlstm_fwd_chunk_state_kernel,
    mlstm_fwd_state_kernel,
    mlstm_state_rows_kernel,
    mlstm_state_scan_kernel,
    mlstm_gates_bwd_kernel,
    mlstm_gates_fwd_kernel,
)
from .score_kernels import (
    mlstm_score_cols_kernel,
    mlstm_score_rows_kernel,
    mlstm_scores_bwd_kernel,
    mlstm_scores_fwd_kernel,
)


# Set by bench/check_mlstm_gpu.py: outputs start as NaN instead of uninitialised memory, so an unwritten tile shows.
POISON_OUTPUTS = False


def _env_override(name: str) -> Optional[bool]:
    """A switch's value forced from the environment: True for name=1, False for name=0, None (decide by the
    switch's own rule) when unset or anything else."""
    return {"1": True, "0": False}.get(os.environ.get(name, ""))


def _new(like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _row_sums(*shape: int, device: torch.device, zeroed: bool) -> torch.Tensor:
    """A float32 per-row buffer the kernels fill for every real row. `zeroed` where someone also reads the padding
    rows past the sequence's end (the PyTorch paths sum over them); otherwise no fill launch is spent on it."""
    if zeroed:
        return torch.zeros(*shape, device=device, dtype=torch.float32)
    out = torch.empty(*shape, device=device, dtype=torch.float32)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


# The kernels' exp2 as one inline PTX instruction (kernels._exp2) on NVIDIA GPUs; ROCm builds of torch also call
# their GPU "cuda" but take no PTX, and Triton's interpreter runs on the CPU: both get tl.exp2.
_PTX_GPU = torch.version.hip is None


def _fast_exp2(x: torch.Tensor) -> bool:
    return x.is_cuda and _PTX_GPU


def _rows_of(x: torch.Tensor, *trailing: int) -> int:
    """The number of (batch, head) rows of a contiguous tensor [..., *trailing]: the wrappers take any leading dims
    ([B, NH] or [B*NH]), since the kernels only see memory in that order; reshaping costs a dispatch per tensor."""
    return x.numel() // math.prod(trailing)


def heads_per_row(*xs: torch.Tensor) -> int:
    """The kernels' NHT (kernels._rows_base) for tensors [..., S, D] that share a layout: 1 when contiguous, NH for
    token-major [B, NH, S, D] views of contiguous [B, S, NH, D] tensors (a model's projections, read in place)."""
    nht = set()
    for x in xs:
        if x.is_contiguous():
            nht.add(1)
            continue
        if x.dim() == 4:
            B, NH, S, D = x.shape
            if x.stride() == (S * NH * D, D, NH * D, 1):
                nht.add(NH)
                continue
        raise ValueError(f"tensor of shape {tuple(x.shape)} with strides {x.stride()}: the kernels take contiguous "
                         "[..., S, D] tensors or [B, NH, S, D] views of contiguous [B, S, NH, D] ones")
    if len(nht) != 1:
        raise ValueError(f"tensors in different layouts (heads per row {sorted(nht)}): make them all contiguous or "
                         "all token-major")
    return nht.pop()


class ChunkLayout(NamedTuple):
    """How S rows are split: NC chunks of L rows (the last may be short); per-row vectors are padded to SP = NC*L."""

    S: int
    L: int
    NC: int
    SP: int


def chunk_layout(S: int, chunk_size: int) -> ChunkLayout:
    L = max(1, min(chunk_size, S))
    NC = _cdiv(S, L)
    return ChunkLayout(S, L, NC, NC * L)


# Plain-Python helpers: triton.cdiv / triton.next_power_of_2 go through Triton's constexpr machinery, which cost
# about 90 us of host time per fwd+bwd here (a tenth of the GPU work of a ViL-T layer).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, x - 1).bit_length())


def _dim_block(d: int, cap: int) -> int:
    """Tile width along a head dim: the whole (padded) dim when it fits under cap, else 64-wide slices."""
    p = _pow2(d)
    return p if p <= cap else 64


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get float32 products (as torch.matmul without TF32), half types the tensor cores' native path.
    return "ieee" if dtype == torch.float32 else "tf32"


def _warps(*tile: int) -> int:
    return 8 if math.prod(tile) >= 64 * 256 else 4


# Tile sizes and launch options of the five matrix kernels. Names: BT query rows, BS key rows per tile; BK / BV the
# slice of the head dim a product reduces over (the whole dim when it fits, then the tile stays in registers);
# BKO / BVO the slice of the output a program writes. Query-side kernels (fwd_h, dq) need BT % BS == 0, key-side
# ones (dk, dv, dkdv) BS % BT == 0: that is what lets every tile off the diagonal skip the causal mask.
def _default_tiles(kernel: str, DQK: int, DHV: int) -> dict:
    if kernel == "fwd_h":
        cfg = dict(BT=64, BS=64, BK=_dim_block(DQK, 128), BK2=0, BV=min(_pow2(DHV), 128), BV2=0)
        return dict(cfg, num_warps=_warps(cfg["BT"], cfg["BV"]))
    if kernel == "dq":  # reduces over DHV and writes DQK slices
        cfg = dict(BT=64, BS=64, BV=_dim_block(DHV, 128), BV2=0, BKO=min(_pow2(DQK), 128), BKO2=0)
        return dict(cfg, num_warps=_warps(64, cfg["BKO"]))
    if kernel == "dk":  # as dq
        cfg = dict(BT=64, BS=64, BV=_dim_block(DHV, 128), BKO=min(_pow2(DQK), 128))
        return dict(cfg, num_warps=_warps(64, cfg["BKO"]))
    if kernel == "dv":
        cfg = dict(BT=64, BS=64, BK=_dim_block(DQK, 128), BVO=min(_pow2(DHV), 128))
        return dict(cfg, num_warps=_warps(cfg["BS"], cfg["BVO"]))
    if kernel == "dkdv":
        wide = max(DQK, DHV) > 128  # both accumulators and both key tiles live: halve the tile to fit
        cfg = dict(BT=32 if wide else 64, BS=32 if wide else 64, BK=_pow2(DQK), BK2=0, BV=_pow2(DHV), BV2=0)
        return dict(cfg, num_warps=_warps(cfg["BS"], cfg["BK"] + cfg["BV"]), num_stages=2 if wide else 3)
    if kernel in _STATE_KERNELS:  # sequential over chunks, one program per (DQK, DHV) tile of a (batch, head) state
        rows = "BS" if kernel == "fwd_state" else "BT"
        return {rows: 64, "BK": 64, "BV": 64, "num_warps": 4, "num_stages": 3}
    if kernel in ("dkdv_k", "dkdv_v"):  # the split pass (dkdv_mode): one accumulator, so 64-row key tiles fit
        wide = max(DQK, DHV) > 128
        cfg = dict(BT=32, BS=64, BK=_pow2(DQK), BK2=0, BV=_pow2(DHV), BV2=0)
        return dict(cfg, num_warps=4, num_stages=2 if wide else 3)
    if kernel == "scores_fwd":  # score_kernels.py: BK / BV slice the products' head dims
        return dict(BT=64, BS=64, BK=_dim_block(DQK, 128), num_warps=4, num_stages=3)
    if kernel == "scores_bwd":
        return dict(BT=64, BS=64, BK=_dim_block(DQK, 128), BV=_dim_block(DHV, 128), num_warps=4, num_stages=3)
    if kernel in ("score_rows", "score_cols"):  # BO: the output slice (score_rows: h or dq, score_cols: dk or dv),
        # BD: the slice of the reduction over the head dim in the state term (calls with chunk states)
        return dict(BT=64, BS=64, BO=min(_pow2(max(DQK, DHV)), 128), BD=64, num_warps=4, num_stages=3)
    raise KeyError(kernel)


# Head dims that are not powers of two, in two power-of-two pieces (kernels._scores): 96 = 64 + 32, 192 = 128 + 64,
# 48 = 32 + 16, instead of one tile padded to 128 or 256. Where a kernel takes pieces, one program covers the whole
# head dim (the query-side kernels no longer split h or dq into slices, each of which recomputed the scores).
# Pieces replace the tiles' head-dim widths after the tuned table (its entries are keyed by the padded dims and keep
# their row tiles and launch options), then an entry keyed by the exact dims ("fwd_h:96:96") where the tuner measured
# the pieces; TFLA_HEAD_DIM_PIECES=0 or HEAD_DIM_PIECES = False turns them off (benchmarks
# compare both). Up to a padded width of 256: the whole head dim then stays in registers.
HEAD_DIM_PIECES: bool = os.environ.get("TFLA_HEAD_DIM_PIECES", "1") != "0"
# Kernel variants that take a chunk state (chunked calls, initial states) get pieces on a GPU only where this is
# True; Triton's CPU interpreter (where the tests check them) always gives them pieces. They are correct on the GPU
# (kernels._state_piece_dot), but slower there with the tiles tuned on the stateless variants: S = 4096, chunks of
# 256, fwd+bwd GPU time 1.026 ms with pieces against 0.962 padded at DH 96, 2.961 against 2.353 at DH 192, where the
# entering-state term pushed fwd_h and dq over the shared memory at three stages (bench/results/
# sweep_s4096_pieces_ab_h200.log). A kernel whose tuned table has an entry for its state variant with pieces
# ("dkdv:96:96:states", written by `bench/tune_mlstm.py --states` only where it beat the padded tiles) takes the
# pieces with those tiles regardless: fwd_h at DH 96 since session 22 (chunks of 128 at S 4096 on an H100, fwd+bwd GPU
# 0.700 -> 0.684 ms; bench/results/session22/ab_tiles_chunk128_dh96.log).
PIECES_WITH_STATES = False
PIECES_MAX_HEAD_DIM = 256
# kernel -> the (first, second) tile keys of its pieces, and whether each is along DQK (else DHV).
_PIECE_KEYS = {
    "fwd_h": (("BK", "BK2", True), ("BV", "BV2", False)),
    "dq": (("BV", "BV2", False), ("BKO", "BKO2", True)),
    "dkdv": (("BK", "BK2", True), ("BV", "BV2", False)),
    "dkdv_k": (("BK", "BK2", True), ("BV", "BV2", False)),
    "dkdv_v": (("BK", "BK2", True), ("BV", "BV2", False)),
}


def head_dim_pieces(d: int) -> tuple[int, int]:
    """(first, second) widths covering a head dim of d: the largest power of two <= d and the rest padded to a power
    of two (>= 16), or (padded d, 0) where that would be no narrower than padding d."""
    whole = _pow2(d)
    first = max(16, 1 << (d.bit_length() - 1))
    if first >= d:
        return whole, 0
    second = _pow2(d - first)
    return (first, second) if first + second < whole else (whole, 0)


def head_dim_piece_tiles(kernel: str, DQK: int, DHV: int) -> dict:
    if kernel not in _PIECE_KEYS or max(_pow2(DQK), _pow2(DHV)) > PIECES_MAX_HEAD_DIM:
        return {}
    split = {key: head_dim_pieces(DQK if along_qk else DHV) for key, _, along_qk in _PIECE_KEYS[kernel]}
    if not any(second for _, second in split.values()):
        return {}
    cfg = {}
    for key, key2, _ in _PIECE_KEYS[kernel]:
        cfg[key], cfg[key2] = split[key]
    return cfg


# Measured choices that replace the defaults: tuned_tiles.json beside this file, written by bench/tune_mlstm.py
# --write, maps a GPU architecture ("sm90") to {"kernel:DQK:DHV" (padded dims): tiles}. Other GPUs get the defaults.
# Tiles are constexprs plus Triton's launch options num_warps, num_stages and maxnreg: a cap on the registers per thread
# (ptxas .maxnreg) where one block fewer per SM fit without it. DH 96's dq took 178 registers on the H200 (Triton 3.6),
# 2 blocks of 4 warps per SM; capped at 128, 4 blocks, 229 -> 183 us at S 1024 (bench/tune_mlstm.py --register-caps,
# bench/results/register_caps_h200.md).
TUNED_TILES_FILE = Path(__file__).with_name("tuned_tiles.json")
_tuned_cache: dict[str, dict] = {}
# (kernel, DQK, DHV, arch, with_states, short, overrides) -> resolved tiles; also dkdv_mode's answers
_tiles_cache: dict[tuple, object] = {}
# Set by bench/tune_mlstm.py and by tests to try other tiles: kernel -> entries that win over everything else.
TILE_OVERRIDES: dict[str, dict] = {}
_QUERY_SIDE = ("fwd_h", "dq", "scores_fwd", "scores_bwd", "score_rows")
# The chunk-state kernels (chunked calls only): their row tile (BS / BT) is a loop step, not a causal tile.
_STATE_KERNELS = ("fwd_state", "bwd_state")


def gpu_arch(device: torch.device) -> str:
    return _arch(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _arch(device_type: str, index: Optional[int]) -> str:
    # Memoised: asked on every launch.
    if device_type != "cuda":
        return device_type
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def reset_tile_caches(arch: Optional[str] = None, table: Optional[dict] = None) -> None:
    """Forget memoised tiles; with `arch` and `table`, use that table for `arch` instead of the file (the tuner)."""
    _tiles_cache.clear()
    _tuned_cache.clear()
    if arch is not None:
        _tuned_cache[arch] = table or {}


def tuned_tiles(arch: str) -> dict:
    if arch not in _tuned_cache:
        table = json.loads(TUNED_TILES_FILE.read_text()) if TUNED_TILES_FILE.exists() else {}
        _tuned_cache[arch] = table.get(arch, {})
    return _tuned_cache[arch]


def tiles(kernel: str, DQK: int, DHV: int, arch: str = "cpu", *, with_states: bool = False, rows: int = 0) -> dict:
    """Meta-parameters of one kernel launch (a fresh dict): defaults, then the tuned table of `arch`, then
    TILE_OVERRIDES. Memoised: this runs on every launch. with_states: the launch takes a chunk state (fwd_h and dq:
    an entering state, dkdv: a leaving state's gradient); see PIECES_WITH_STATES. rows: the chunk length, when the
    call is one chunk of at most SHORT_CHUNK_ROWS rows without states (see there); 0 otherwise."""
    short = 0 < rows <= SHORT_CHUNK_ROWS and not with_states
    key = (kernel, DQK, DHV, arch, with_states, short, tuple(sorted(TILE_OVERRIDES.get(kernel, {}).items())))
    if key not in _tiles_cache:
        tuned_for_states = f"{kernel}:{DQK}:{DHV}:states" in tuned_tiles(arch)
        # The split pass's kernels take pieces with states too: they were tuned that way (bench/tune_mlstm.py --split).
        pieces = HEAD_DIM_PIECES and (not with_states or PIECES_WITH_STATES or arch == "cpu" or tuned_for_states
                                      or kernel in ("dkdv_k", "dkdv_v"))
        _tiles_cache[key] = _resolve_tiles(kernel, DQK, DHV, arch, pieces, with_states, short)
    return dict(_tiles_cache[key])


# Short sequences (one chunk of at most this many rows, no states: ViL at 224 px has 197) may take their own tiles:
# "kernel:DQK:DHV:short" entries, on top of the kernel's entry. At DH 96 / S 196 the dk + dv kernel ran faster with
# 16-row query tiles (173 -> 159 us on the H200) that lost at S 1024 (292 -> 345 us;
# bench/results/tuning/register_caps_ab2_h200.log).
SHORT_CHUNK_ROWS = 256


def _one_chunk_rows(lay: ChunkLayout) -> int:
    """The `rows` argument of tiles(): the chunk length of a one-chunk call, 0 for a chunked one."""
    return lay.L if lay.NC == 1 else 0


def _resolve_tiles(kernel: str, DQK: int, DHV: int, arch: str, pieces_on: bool, with_states: bool = False,
                   short: bool = False) -> dict:
    cfg = _default_tiles(kernel, DQK, DHV)
    table = tuned_tiles(arch)
    cfg.update(table.get(f"{kernel}:{_pow2(DQK)}:{_pow2(DHV)}", {}))
    pieces = head_dim_piece_tiles(kernel, DQK, DHV) if pieces_on else {}
    if pieces:  # then the entry tuned with these pieces, keyed by the exact head dims (bench/tune_mlstm.py)
        cfg.update(pieces)
        cfg.update(table.get(f"{kernel}:{DQK}:{DHV}", {}))
        if with_states:  # and the one tuned for the variant with a chunk state, where there is one
            cfg.update(table.get(f"{kernel}:{DQK}:{DHV}:states", {}))
    elif with_states:  # without pieces, under the padded dims (the score-matrix path's kernels), then the exact ones
        cfg.update(table.get(f"{kernel}:{_pow2(DQK)}:{_pow2(DHV)}:states", {}))
        cfg.update(table.get(f"{kernel}:{DQK}:{DHV}:states", {}))  # e.g. DH 384, whose slices divide it differently
    if short:  # under the key the kernel's own entry has: exact dims with pieces, padded ones without
        cfg.update(table.get(f"{kernel}:{DQK}:{DHV}:short" if pieces else f"{kernel}:{_pow2(DQK)}:{_pow2(DHV)}:short",
                             {}))
    if with_states and "maxnreg" not in table.get(f"{kernel}:{DQK}:{DHV}:states", {}):
        # A register cap is measured on one variant (bench/tune_mlstm.py --register-caps: one chunk, no states); the
        # state variants hold more and spilled under DH 96's caps, so they take one only from their own entry.
        cfg.pop("maxnreg", None)
    overrides = TILE_OVERRIDES.get(kernel, {})
    cfg.update(overrides)
    for key, key2, along_qk in _PIECE_KEYS.get(kernel, ()):
        if key in overrides and key2 not in overrides:
            cfg[key2] = 0  # an override of a width alone means one piece (or slices) of that width
        dim = DQK if along_qk else DHV
        if cfg[key2] and not (cfg[key2] <= cfg[key] and cfg[key] < dim <= cfg[key] + cfg[key2]):
            raise ValueError(f"{kernel} tiles {cfg}: pieces {key} + {key2} must cover a head dim of {dim} "
                             f"with {key} < {dim} and {key2} <= {key}")
    if kernel in _STATE_KERNELS:
        return cfg
    outer, inner = ("BT", "BS") if kernel in _QUERY_SIDE else ("BS", "BT")
    if cfg[outer] % cfg[inner]:
        raise ValueError(f"{kernel} tiles {cfg}: {outer} must be a multiple of {inner}")
    return cfg


# Tiles that had to shrink to launch: (kernel name, tiles, constexprs) -> the tiles that worked. Tuned tiles are
# measured on the stateless variant of a kernel; a variant with states (initial / final) keeps extra tiles live and
# can need more shared memory than the SM has. Empty unless that happened, so a launch costs no extra lookup.
_SHRUNK_TILES: dict[tuple, dict] = {}
# bench/tune_mlstm.py turns shrinking off: a candidate that does not fit must fail, not run as another candidate.
SHRINK_TILES_THAT_DO_NOT_FIT = True


def _name(kernel) -> str:
    return getattr(kernel, "__name__", None) or repr(kernel)


def _smaller(cfg: dict) -> Optional[dict]:
    """The next tiles to try after an out-of-resources launch: one pipeline stage fewer (down to one), then halved
    row tiles. Head-dim slices stay as they are, since output buffers are shaped by them. One stage at a time: a
    state variant that is a little over the limit at three stages usually fits at two and keeps its loads pipelined
    (DH 192's pieces with an entering state on an H200 needed 262144 bytes of shared memory at three stages; the
    limit is 232448)."""
    if cfg.get("num_stages", 3) > 1:
        return dict(cfg, num_stages=cfg.get("num_stages", 3) - 1)
    rows = {key: cfg[key] for key in ("BT", "BS") if key in cfg}  # the state kernels have one of the two
    if min(rows.values()) > 16:
        return dict(cfg, **{key: n // 2 for key, n in rows.items()})
    return None


def _launch_tiled(kernel, grid_of, cfg: dict, *args, **consts) -> None:
    """kernel[grid_of(tiles)](*args, **consts, **tiles), shrinking the tiles if the GPU cannot hold them (see
    _SHRUNK_TILES); the first shrink per variant warns once, later launches go straight to what worked."""
    key = None
    if _SHRUNK_TILES:
        key = (_name(kernel), tuple(cfg.items()), tuple(consts.items()))
        cfg = _SHRUNK_TILES.get(key, cfg)
    attempt = cfg
    while True:
        try:
            # num_warps / num_stages travel with the constexpr tiles: Triton takes launch options as keywords too.
            direct_launch(kernel, grid_of(attempt), *args, **consts, **attempt)
            break
        except OutOfResources as err:
            smaller = _smaller(attempt) if SHRINK_TILES_THAT_DO_NOT_FIT else None
            if smaller is None:
                raise
            attempt = smaller
            # The message, not the exception: its traceback holds this frame (a reference cycle), and with it the
            # caller's autograd graph until the garbage collector runs. A graph kept alive that way keeps the
            # leaves' AccumulateGrad nodes with the stream they were made on, which broke a later CUDA-graph capture
            # ("operation would make the legacy stream depend on a capturing blocking stream").
            failure = str(err)
    if attempt is not cfg:
        key = key or (_name(kernel), tuple(cfg.items()), tuple(consts.items()))
        _SHRUNK_TILES[key] = attempt
        warnings.warn(f"{_name(kernel)}: tiles {cfg} do not fit this GPU for {consts} ({failure}); using {attempt}. "
                      "Re-run bench/tune_mlstm.py on this GPU to choose tiles that fit.", stacklevel=3)


# How the chunk states are made (chunked calls, initial / final states): True, each chunk's own contribution in
# parallel (one program per chunk and state tile) and then a scan over the chunks that carries them along
# (mlstm_state_scan_kernel): two launches. False (the default), one launch that walks the chunks in sequence, with
# one program per state tile: at B = 12, NH = 4, S = 4096 only 192 programs at DH 96 (432 at DH 192) on 132 SMs, and
# 24-29 % of the fwd+bwd GPU time (bench/results/profile_mlstm_kernels_s4096_h200.log). On the H200 the parallel
# states saved little GPU time (fwd+bwd at S 4096: DH 96 0.942 -> 0.909 ms, DH 192 2.299 -> 2.283), and the eager
# wall time at DH 96, which that host's launch rate sets, got worse with the two extra launches (1.40 -> 1.67-1.95
# ms; bench/results/parallel_states_ab_h200.log), so they are opt-in: TFLA_PARALLEL_STATES=1.
PARALLEL_CHUNK_STATES: bool = os.environ.get("TFLA_PARALLEL_STATES", "0") == "1"

# The gate gradients of a chunked call need A_c = <C_c, dC_c> + <n_c, dn_c> at every chunk boundary. Scaling C_c by
# e^eps is adding eps to the log forget gate before it with every row max held, so A_c also equals A_NC plus the sum
# of q.dq - k.dk over the rows after the boundary, which the gate kernel has at hand (kernels._gates_bwd_row,
# STATE_TERMS). STATE_TERMS_FROM_ROWS takes them from there; mlstm_bwd_state_kernel then no longer reads the forward
# states for its shares of A_c (STATE_DOTS): 232 -> 168 registers at DH 512 for sm_90 with Triton 3.6, and one read
# of every chunk state less. The end terms A_0 (initial state) and A_NC (final-state gradient) stay dots
# (function._bwd_impl_fused): summed over every row, A_0 cancels too much in half precision for dm0.
# On an H100 at S 4096, bf16, exp gate, fwd+bwd: DH 512 4.120 -> 3.876 ms wall (GPU 4.111 -> 3.866), DH 384 2.908
# -> 2.778 (bench/results/session20/ab_state_terms_from_rows_*_h100.log); df's error against float64 unchanged
# (DH 96 / 384 / 512: 4.9e-3 / 3.4e-3 / 5.2e-3, 4.8e-3 / 3.0e-3 / 5.2e-3 before). With the sig gate the long sum's
# rounding showed in df (relative L2 4.6e-3 -> 2.5e-2 at DH 384, 4.8e-3 -> 1.1e-2 at DH 512, within bf16's 3e-2
# but too close), so that gate keeps the dots unless SIG_STATE_TERMS_FROM_ROWS. TFLA_STATE_TERMS_FROM_ROWS=0 /
# TFLA_SIG_STATE_TERMS_FROM_ROWS=1 in the environment set them.
STATE_TERMS_FROM_ROWS: bool = os.environ.get("TFLA_STATE_TERMS_FROM_ROWS", "1") != "0"
SIG_STATE_TERMS_FROM_ROWS: bool = os.environ.get("TFLA_SIG_STATE_TERMS_FROM_ROWS", "0") == "1"
SCAN_BLOCK = 1024  # state elements per scan program
# The state kernels' row weights are applied beforehand: one mlstm_state_rows_kernel launch writes the weighted rows
# (e_j k_j forward, g_t rs_t q_t backward) and the chunks' own normaliser sums, so that the state kernels multiply
# loaded tiles as they are. Until session 17 each step of the sequential walk loaded a transposed tile of k (q),
# scaled it in registers and handed it to the dot from there; at the cost of one more launch each way and a k-sized
# (q-sized) buffer written and read, the weighted rows were faster at every head dim: on an H100, bf16, S 4096 (with
# function.LOW_PRECISION_STATES), eager fwd+bwd in-kernel -> beforehand, DH 96 0.832 -> 0.788 ms, DH 192 1.940 ->
# 1.791, DH 384 3.729 -> 3.311, DH 512 5.556 -> 4.961 (bench/results/session17/ab_prescaled_states_h100.log, measured
# with the switch that chose between them, since removed): fewer registers and barriers per step (at DH 192 the
# forward state kernel compiled to 136 registers instead of 229 for sm_90).
STATE_ROWS_TILE = (64, 128)  # rows per step and head-dim columns per program of mlstm_state_rows_kernel
# The backward's per-row terms of a chunked call (rs, dqn and dm, from delta = dh.h) made by its state-rows launch
# (kernels.mlstm_state_rows_kernel's ROW_TERMS) instead of a mlstm_bwd_rows launch before it: one launch, and its
# host time, less where one program covers the head dim (padded DQK <= ROW_TERMS_MAX_HEAD_DIM; wider, every slice
# would read h and dh again). On by default where the padded DQK is at most ROW_TERMS_DEFAULT_MAX_HEAD_DIM: on an
# H100 at DH 96 / S 4096 (chunks of 128) it took GPU time too, 0.711 -> 0.695 ms fwd+bwd, wall 1.208 -> 1.170 on a
# host that bound that call (bench/results/session22/ab_folds_each.log). Wider heads were measured only with the two
# gate folds below (DH 192 / S 4096, chunks of 256: all three cost 2 % of GPU time, session21/ab_chunked_folds.log),
# so they keep the mlstm_bwd_rows launch. TFLA_ROW_TERMS_IN_STATE_ROWS=1 / 0 forces it on / off (the padded-DQK
# limit stays); None: by head dim.
ROW_TERMS_IN_STATE_ROWS: Optional[bool] = _env_override("TFLA_ROW_TERMS_IN_STATE_ROWS")
ROW_TERMS_MAX_HEAD_DIM = 256
ROW_TERMS_DEFAULT_MAX_HEAD_DIM = 128


# The gate vectors (F, a, m per row, the chunk max states) of a call with chunk states made by its forward state-rows
# launch (kernels._chunk_gate_vectors: each program walks the gates of the rows before its chunk, GATE_WALK_ROWS a
# step, for the entering max state) instead of a mlstm_gates_fwd launch before it: one launch less. None (the
# default): on where the backward's row terms are (padded DQK <= ROW_TERMS_DEFAULT_MAX_HEAD_DIM) and the call has at
# most FOLD_GATES_FWD_CHUNKED_MAX_CHUNKS chunks; TFLA_FOLD_GATES_FWD_CHUNKED=1 / 0 forces it at the head dims
# ROW_TERMS_MAX_HEAD_DIM covers. The walk's work grows with the square of the chunk count. On an H100, fwd+bwd GPU
# time off -> on (bench/results/session23/ab_gate_walk*.log): S 4096, 32 chunks of 128 at DH 96 / 128, 0.684 -> 0.682
# and 0.784 -> 0.778 ms, 16 chunks of 256 at DH 64 0.530 -> 0.531; 128 chunks (DH 96 / S 16384) 1.045 -> 1.070. The
# walk took one chunk a step until session 23, which cost 0.707 -> 0.745 ms at DH 96 / S 4096. GPU-checked with both
# gate folds on (0 failures in 9 at S 4096, DH 96 / 192: session23/check_gate_walk.log).
FOLD_GATES_FWD_CHUNKED: Optional[bool] = _env_override("TFLA_FOLD_GATES_FWD_CHUNKED")
FOLD_GATES_FWD_CHUNKED_MAX_CHUNKS = 32
# Rows a step of that walk (kernels._chunk_gate_vectors); tests lower it to take several steps. 2048 float32 rows
# are 16 per thread of the launch's 4 warps (121 registers, no spills, for sm_90 under Triton 3.6).
GATE_WALK_ROWS = 2048


def folds_gate_vectors_into_state_rows(DQK: int, lay: ChunkLayout, *, keeps_states: bool) -> bool:
    """Whether mlstm_fwd can take state_gates_from (see FOLD_GATES_FWD_CHUNKED): a call with chunk states, chunks of
    at most FOLD_GATES_MAX_CHUNK rows, padded DQK <= ROW_TERMS_MAX_HEAD_DIM; by default also padded DQK <=
    ROW_TERMS_DEFAULT_MAX_HEAD_DIM and at most FOLD_GATES_FWD_CHUNKED_MAX_CHUNKS chunks."""
    padded = _pow2(DQK)
    on = FOLD_GATES_FWD_CHUNKED
    if on is None:
        on = padded <= ROW_TERMS_DEFAULT_MAX_HEAD_DIM and lay.NC <= FOLD_GATES_FWD_CHUNKED_MAX_CHUNKS
    return on and keeps_states and lay.L <= FOLD_GATES_MAX_CHUNK and padded <= ROW_TERMS_MAX_HEAD_DIM


def row_terms_in_state_rows(DQK: int) -> bool:
    """Whether the backward's state-rows launch makes the per-row terms (see ROW_TERMS_IN_STATE_ROWS)."""
    padded = _pow2(DQK)
    on = padded <= ROW_TERMS_DEFAULT_MAX_HEAD_DIM if ROW_TERMS_IN_STATE_ROWS is None else ROW_TERMS_IN_STATE_ROWS
    return on and padded <= ROW_TERMS_MAX_HEAD_DIM


def state_rows_tile(D: int, *, row_terms: bool = False) -> tuple[int, int]:
    """(rows per step, head-dim columns per program) of mlstm_state_rows_kernel: with the row terms, one program
    covers the whole (padded) head dim, in 32-row steps above 128 columns."""
    if row_terms:
        BD = _pow2(D)
        return (STATE_ROWS_TILE[0] if BD <= 128 else 32), BD
    return STATE_ROWS_TILE[0], min(_pow2(D), STATE_ROWS_TILE[1])


def _state_rows(x: torch.Tensor, fv, av, mrow, mst, rs, dqn, nsum: torch.Tensor, lay: ChunkLayout, nht: int, *,
                backward: bool, scale: float = 1.0, dh: Optional[torch.Tensor] = None,
                rows: Optional["RowTermInputs"] = None, gates: Optional[tuple] = None,
                exp_gate: bool = True) -> torch.Tensor:
    """mlstm_state_rows_kernel: the weighted rows of x (k forward, q backward) as a new contiguous [BNH, S, D]
    tensor in x's dtype; the chunks' own normaliser sums go into nsum ([BNH, NC + 1, D]: indices 1..NC forward,
    0..NC-1 backward). rows (backward, with dh; see ROW_TERMS_IN_STATE_ROWS): rs, dqn and rows.dm_row are outputs,
    made here from h, dh and qn. gates (forward: (i, f, m0 or None), contiguous; see FOLD_GATES_FWD_CHUNKED): fv,
    av, mrow and mst are outputs, made here from the gates."""
    S, D = x.shape[-2:]
    BNH = _rows_of(x, S, D)
    xs = torch.empty(BNH, S, D, device=x.device, dtype=x.dtype)
    BT, BD = state_rows_tile(D, row_terms=rows is not None)
    if rows is not None and (not backward or dh is None or BD < D):
        raise ValueError("the row terms need the backward, dh and one program per head dim (row_terms_in_state_rows)")
    DHV = dh.shape[-1] if rows is not None else 1
    variant = dict(ROW_TERMS=True, NORMALIZE=rows.normalize, EXP_GATE=rows.exp_gate,
                   BV=min(_pow2(DHV), 128)) if rows is not None else {}
    if gates is not None:
        if backward:
            raise ValueError("the gate vectors come from the forward's state-rows launch only")
        ig, fg, m0 = gates
        variant = dict(GATES_FWD=True, EXP_GATE=exp_gate, HAS_M0=m0 is not None, GL=_pow2(lay.L),
                       GW=max(_pow2(lay.L), min(GATE_WALK_ROWS, _pow2(S))))
        gate_args = (ig, fg, m0 if m0 is not None else fv)
    else:
        gate_args = (fv, fv, fv)
    direct_launch(
        mlstm_state_rows_kernel, (_cdiv(D, BD), BNH * lay.NC),
        x, xs, nsum, fv, av, mrow, mst, fv if rs is None else rs, fv if dqn is None else dqn,
        *((rows.h, dh, rows.qn, rows.dm_row) if rows is not None else (x, x, fv, fv)), *gate_args,
        S, lay.L, lay.NC, lay.SP, DHV, scale, rows.eps if rows is not None else 0.0,
        D=D, BACKWARD=backward, BT=BT, BD=BD, NHT=nht, **variant, num_warps=4,
    )
    return xs


def _scan_states(X: torch.Tensor, XN: torch.Tensor, fv, mrow, mst, S: int, lay: ChunkLayout, DQK: int, DHV: int,
                 BNH: int, *, has_start: bool, reverse: bool) -> None:
    """mlstm_state_scan_kernel over a state buffer [BNH, NC + 1, DQK, DHV] and its normaliser part [BNH, NC + 1,
    DQK], in place."""
    n_programs = _cdiv(DQK * DHV, SCAN_BLOCK) + _cdiv(DQK, SCAN_BLOCK)
    direct_launch(
        mlstm_state_scan_kernel, (BNH, n_programs),
        X, XN, fv, mrow, mst, S, lay.L, lay.NC, lay.SP, DQK * DHV, DQK,
        HAS_START=has_start, REVERSE=reverse, BLOCK=SCAN_BLOCK, num_warps=4,
    )


def mlstm_fwd(
    q: torch.Tensor,  # [BNH, S, DQK] (or [B, NH, S, DQK]: any leading dims, here and in every wrapper below)
    k: torch.Tensor,  # [BNH, S, DQK]
    v: torch.Tensor,  # [BNH, S, DHV]
    fv: torch.Tensor,  # [BNH, SP] chunk-local cumsum of logsigmoid(f)
    av: torch.Tensor,  # [BNH, SP] log input gate
    mrow: torch.Tensor,  # [BNH, SP] max state m_t (0 for gate="sig")
    mst: torch.Tensor,  # [BNH, NC+1]
    Cst: Optional[torch.Tensor],  # [BNH, NC+1, DQK, DHV], index 0 filled when has_init
    nst: Optional[torch.Tensor],  # [BNH, NC+1, DQK]
    lay: ChunkLayout,
    *,
    exp_gate: bool,
    normalize: bool,
    eps: float,
    has_init: bool,
    gates_from: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    state_gates_from: Optional[tuple] = None,
    keep_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns h (shaped as v), qn [*lead, SP] and, with keep_scores on the score-matrix path, its weights for the
    backward (mlstm_bwd's scores; the caller asks where KEEP_SCORES and a backward will run), else None; fills
    Cst/nst[:, 1:] (chunk states) when given.
    gates_from (i, f), contiguous (where folds_gate_vectors says so): fv, av, mrow and mst are outputs, written by the
    fwd_h kernel from the gates (kernels.mlstm_fwd_h_kernel's GATES_FWD), in place of a mlstm_gates_fwd launch.
    state_gates_from (i, f, m0 or None), contiguous (where folds_gate_vectors_into_state_rows says so, with Cst): the
    same outputs, written by the state-rows launch (FOLD_GATES_FWD_CHUNKED)."""
    S, DQK = q.shape[-2:]
    DHV = v.shape[-1]
    BNH = _rows_of(q, S, DQK)
    nht = heads_per_row(q, k, v)
    prec = _precision(q.dtype)
    scale = 1.0 / math.sqrt(DQK)
    if Cst is not None:
        cfg = tiles("fwd_state", DQK, DHV, gpu_arch(q.device))
        ks = _state_rows(k, fv, av, mrow, mst, None, None, nst, lay, nht, backward=False, gates=state_gates_from,
                         exp_gate=exp_gate)
        if PARALLEL_CHUNK_STATES:
            _launch_tiled(
                mlstm_fwd_chunk_state_kernel, lambda t: (BNH * lay.NC, _cdiv(DQK, t["BK"]), _cdiv(DHV, t["BV"])), cfg,
                ks, v, Cst, S, lay.L, lay.NC, DQK, DHV, PREC=prec, NHT=nht,
            )
            _scan_states(Cst, nst, fv, mrow, mst, S, lay, DQK, DHV, BNH, has_start=has_init, reverse=False)
        else:
            _launch_tiled(
                mlstm_fwd_state_kernel, lambda t: (_cdiv(DQK, t["BK"]), _cdiv(DHV, t["BV"]), BNH), cfg,
                ks, v, fv, mrow, mst, Cst, nst, S, lay.L, lay.NC, lay.SP,
                DQK=DQK, DHV=DHV, HAS_INIT=has_init, PREC=prec, NHT=nht,
            )
    elif state_gates_from is not None:
        raise ValueError("state_gates_from needs chunk states (folds_gate_vectors_into_state_rows)")
    if gates_from is None and uses_score_matrix(DQK, DHV, lay, keeps_states=Cst is not None):
        h, qn, w = mlstm_fwd_score_matrix(q, k, v, fv, av, mrow, lay, exp_gate=exp_gate, normalize=normalize,
                                          eps=eps, Cst=Cst, nst=nst, mst=mst, keep=keep_scores)
        return h, qn, w if keep_scores else None
    h = _new(v)
    qn = _row_sums(*q.shape[:-2], lay.SP, device=q.device, zeroed=lay.SP != S)
    dummy = fv
    if gates_from is not None and (Cst is not None or lay.NC != 1):
        raise ValueError("gates_from needs one chunk without states (folds_gate_vectors)")
    _launch_tiled(
        mlstm_fwd_h_kernel, lambda t: (_cdiv(lay.L, t["BT"]), _cdiv(DHV, t["BV"] + t["BV2"]), BNH * lay.NC),
        tiles("fwd_h", DQK, DHV, gpu_arch(q.device), with_states=Cst is not None, rows=_one_chunk_rows(lay)),
        q, k, v, h, fv, av, mrow, qn,
        Cst if Cst is not None else dummy, nst if nst is not None else dummy, mst,
        *(gates_from if gates_from is not None else (dummy, dummy)),
        S, lay.L, lay.NC, lay.SP, scale, eps, DQK=DQK, DHV=DHV,
        HAS_INIT=Cst is not None, NORMALIZE=normalize, EXP_GATE=exp_gate, PREC=prec, FAST_EXP2=_fast_exp2(q),
        NHT=nht, **(dict(GATES_FWD=True, GT=min(GATE_TILE_ROWS, _pow2(lay.L))) if gates_from is not None else {}),
    )
    return h, qn, None


# The score-matrix path (score_kernels.py): each chunk's weights are formed once and stored (lower triangle, in the
# input dtype) instead of once per output column slice. By default where the matrix kernels slice their outputs
# because a row tile of the whole head dim does not fit a program: padded head dims above
# ONE_PASS_DKDV_MAX_HEAD_DIM (DH 384 / 512), where a fwd+bwd formed the causal products 16-20 times and takes 7 here.
# SCORE_MATRIX (TFLA_SCORE_MATRIX=1 / 0 in the environment) forces it on or off for every call it may take (tests,
# benchmarks). Memory: two such matrices live in the backward, B*NH*NC*L*L/2 elements each (plus up to one row block
# per chunk), about as much as q at DH = L/2.
SCORE_MATRIX: Optional[bool] = _env_override("TFLA_SCORE_MATRIX")
SCORE_MATRIX_MAX_CHUNK = 1024
# Calls with states (several chunks: S above function.default_chunk_size's one-chunk limit, or an initial or final
# state) take the path too, chunk by chunk with the state terms in its products (score_kernels.py's docstring);
# SCORE_MATRIX_STATES = False (TFLA_SCORE_MATRIX_STATES=0) keeps the matrix kernels there.
SCORE_MATRIX_STATES: bool = os.environ.get("TFLA_SCORE_MATRIX_STATES", "1") == "1"
# Chunked calls (several chunks of at most SCORE_MATRIX_CHUNKED_MAX_CHUNK rows) take the path from this padded head
# dim up, a step lower than one-chunk calls: at DH 192 / S 4096 (chunks of 256) it ran fwd+bwd 1.10x faster than the
# matrix kernels on the H100, at DH 96 0.91x (bench/results/session18/ab_score_matrix_s4096_h100.log), while one
# chunk at DH 192 lost (0.80x at S 196, 0.77x at S 1024 on the H200:
# bench/results/session14/ab_score_matrix_dh96_192_h200.log).
SCORE_MATRIX_CHUNKED_MIN_HEAD_DIM = 256
SCORE_MATRIX_CHUNKED_MAX_CHUNK = 256
SCORE_PACK_ROWS = 128  # rows per block of the packed triangle: a multiple of every row tile of its kernels
# dS and Wr in one launch of mlstm_scores_bwd_kernel (two triangles live in the backward), or (True) in two, one
# product each: dS, then dq and dk from it, then Wr in dS's memory and dv, so that one triangle lives at a time. The
# same kernels in two launches took 0.98 / 0.99 / 1.03x the time at DH 384 / S 196, 384 / 1024, 512 / 1024 on the
# H200 (bench/results/session14/ab_split_scores_bwd_h200.log, measured with both triangles allocated): off by default,
# TFLA_SPLIT_SCORES_BWD=1 to halve the path's extra memory.
SPLIT_SCORES_BWD: bool = os.environ.get("TFLA_SPLIT_SCORES_BWD", "0") == "1"
# The forward's weights W kept for the backward (mlstm_fwd returns them, mlstm_bwd takes them as scores): the backward
# then forms dS alone, one product instead of two (dS and Wr = W rs), and takes dv = W^T (rs dh) from the kept W: 6
# causal products per fwd+bwd instead of 7. On an H100, bf16, fwd+bwd GPU time off -> on (`python
# bench/profile_mlstm.py --ab keep_scores 384:1024 512:1024 384:4096 192:4096 384:196`, session 24): DH 384 / S 1024
# 2.479 -> 2.174 ms, DH 512 / S 1024 3.347 -> 2.812, DH 384 / S 4096 2.727 -> 2.598, DH 192 / S 4096 1.369 -> 1.293,
# DH 384 / S 196 1.453 -> 1.397 (with nothing written where no weight lives; with the scores kernel's zeros there,
# ZERO_REST, session 25: DH 384 / S 1024 2.580 -> 2.213, S 4096 2.758 -> 2.592, bench/results/session25/).
# Memory: W lives from the forward to the backward (one triangle per chunk and head, what the backward's Wr took
# before only while it ran): the op's peak is unchanged (bench/results/session24/), a model's activations grow by one
# triangle per layer (ViL-B at 224 px, batch 128: about 50 MB a block). Only calls whose backward will run keep them
# (function._keeps_scores): inference pays nothing. TFLA_KEEP_SCORES=0 turns it off.
KEEP_SCORES: bool = os.environ.get("TFLA_KEEP_SCORES", "1") != "0"


def uses_score_matrix(DQK: int, DHV: int, lay: ChunkLayout, *, keeps_states: bool) -> bool:
    """Whether mlstm_fwd / mlstm_bwd take the score-matrix path (see SCORE_MATRIX) for this call; the backward asks
    independently of the forward (it needs only the forward's gate vectors, qn, h and the chunk states).
    keeps_states: the call has chunk states (several chunks, or an initial or final state)."""
    if lay.L > SCORE_MATRIX_MAX_CHUNK or ((lay.NC != 1 or keeps_states) and not SCORE_MATRIX_STATES):
        return False
    if SCORE_MATRIX is not None:
        return SCORE_MATRIX
    padded = max(_pow2(DQK), _pow2(DHV))
    if lay.NC > 1 and lay.L <= SCORE_MATRIX_CHUNKED_MAX_CHUNK and padded >= SCORE_MATRIX_CHUNKED_MIN_HEAD_DIM:
        return True
    return padded > ONE_PASS_DKDV_MAX_HEAD_DIM


def _score_matrix_elements(lay: ChunkLayout) -> int:
    """Elements of one packed lower-triangular [L, L] matrix (score_kernels.py: row blocks of SCORE_PACK_ROWS)."""
    blocks = _cdiv(lay.L, SCORE_PACK_ROWS)
    return SCORE_PACK_ROWS * SCORE_PACK_ROWS * blocks * (blocks + 1) // 2


def kept_scores_numel(DQK: int, DHV: int, BNH: int, lay: ChunkLayout, *, keeps_states: bool) -> int:
    """Elements of the weights mlstm_fwd keeps for the backward when asked to (keep_scores) in a call of this shape,
    0 where the call does not take the score-matrix path: what the registered op's fake kernel promises."""
    if not uses_score_matrix(DQK, DHV, lay, keeps_states=keeps_states):
        return 0
    return BNH * lay.NC * _score_matrix_elements(lay)


def _score_matrix(like: torch.Tensor, BNH: int, lay: ChunkLayout) -> tuple[torch.Tensor, int]:
    """A packed lower-triangular [L, L] matrix per (batch, head, chunk) in like's dtype, uninitialised (NaN with
    POISON_OUTPUTS), and its elements per matrix."""
    per_matrix = _score_matrix_elements(lay)
    buf = torch.empty(BNH * lay.NC * per_matrix, device=like.device, dtype=like.dtype)
    if POISON_OUTPUTS:
        buf.fill_(float("nan"))
    return buf, per_matrix


def _score_tiles(kernel: str, DQK: int, DHV: int, arch: str, with_states: bool) -> dict:
    """tiles() of a score-matrix kernel; with_states: a chunked call ("kernel:512:512:states" entries)."""
    cfg = tiles(kernel, DQK, DHV, arch, with_states=with_states)
    if max(cfg["BT"], cfg["BS"]) > SCORE_PACK_ROWS:
        raise ValueError(f"{kernel} tiles {cfg}: row tiles must divide SCORE_PACK_ROWS = {SCORE_PACK_ROWS}")
    return cfg


_SCORE_PRODUCTS = {"score_rows": (mlstm_score_rows_kernel, "BT"), "score_cols": (mlstm_score_cols_kernel, "BS")}


def _apply_scores(name: str, m: torch.Tensor, per_matrix: int, x: torch.Tensor, out: torch.Tensor,
                  y: Optional[torch.Tensor], lay: ChunkLayout, BNH: int, nht: int, prec: str, *tail,
                  state: Optional[tuple] = None, x_scale: Optional[torch.Tensor] = None,
                  **consts) -> Optional[torch.Tensor]:
    """One product over stored score matrices (name: "score_rows" or "score_cols", see _SCORE_PRODUCTS) into out;
    with y, also the row sums y.out per output slice, returned as [slices, BNH, SP]. tail: the kernel's arguments after
    the matrix's size up to the state term's (the rows kernel's qn, m and eps); then the state term's, state =
    (kind, a, chunk states, n-vector or None, *gate vectors) for the kernel's STATE = kind (1, 2), or None: no state
    term (its gate-vector arguments then get dummies: rows kernel fv, mst, rs, dqn, scale; cols kernel fv, av, m).
    x_scale ([BNH, SP] float32, score_cols only): x's rows scaled by it before the products (X_ROW_SCALE)."""
    D = x.shape[-1]
    cfg = _score_tiles(name, D, D, gpu_arch(x.device), lay.NC > 1 or state is not None)
    cfg["BO"] = min(cfg["BO"], _pow2(D))
    n_slices = _cdiv(D, cfg["BO"])
    # zeroed past S: the gate gradients' reversed cumsum runs over the padding of the last chunk
    rsum = _row_sums(n_slices, BNH, lay.SP, device=x.device, zeroed=lay.SP != lay.S) if y is not None else None
    kernel, outer = _SCORE_PRODUCTS[name]
    if x_scale is not None and name != "score_cols":
        raise ValueError("x_scale: only the score_cols kernel scales x's rows")
    row_scale = ((x_scale if x_scale is not None else m,) if name == "score_cols" else ())
    if x_scale is not None:
        consts["X_ROW_SCALE"] = True
    if state is not None:
        kind, a, st, nvec, *gates = state
        state_args = (a, st, nvec if nvec is not None else st, *gates)
        state_consts = dict(STATE=kind, DA=a.shape[-1], SW=st.shape[-1])
    else:  # dummies for the state term's arguments (the rows kernel's last one is the float scale)
        state_args = (x,) * 3 + ((m, m, m, m, 1.0) if name == "score_rows" else (m, m, m))
        state_consts = {}
    _launch_tiled(
        kernel, lambda t: (_cdiv(lay.L, t[outer]), n_slices, BNH * lay.NC), cfg,
        m, x, out, y if y is not None else x, rsum if rsum is not None else m, *row_scale, lay.S, lay.L, lay.NC,
        lay.SP, per_matrix, *tail, *state_args,
        D=D, PREC=prec, NHT=nht, PACK=SCORE_PACK_ROWS, ROW_DOT=y is not None, **state_consts, **consts,
    )
    return rsum


def mlstm_fwd_score_matrix(q, k, v, fv, av, mrow, lay: ChunkLayout, *, exp_gate: bool, normalize: bool,
                           eps: float, Cst=None, nst=None, mst=None,
                           keep: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlstm_fwd through the stored weights (uses_score_matrix): h, qn and the weights W (the packed triangles); with
    Cst (the chunk states, filled), nst and mst, the entering states' terms too (as fwd_h's HAS_INIT). keep: W is
    kept for the backward (KEEP_SCORES) and so becomes an output of the registered op, which must be deterministic:
    the forming kernel then also writes zeros into the packed blocks' elements that hold no weight (right of the
    diagonal tiles, rows past the chunk's end), which no kernel reads but torch.library.opcheck's AOT-dispatch test
    compares (ZERO_REST; until session 25 a zero fill of the whole buffer before the launch did that)."""
    S, DQK = q.shape[-2:]
    DHV = v.shape[-1]
    BNH = _rows_of(q, S, DQK)
    nht = heads_per_row(q, k, v)
    prec = _precision(q.dtype)
    arch = gpu_arch(q.device)
    scale = 1.0 / math.sqrt(DQK)
    w, per_matrix = _score_matrix(q, BNH, lay)
    qn = _row_sums(*q.shape[:-2], lay.SP, device=q.device, zeroed=lay.SP != S)
    has_state = Cst is not None
    # kept: every row of the last row block (its padded rows get zeros); else the chunk's rows
    rows = _cdiv(lay.L, SCORE_PACK_ROWS) * SCORE_PACK_ROWS if keep else lay.L
    _launch_tiled(
        mlstm_scores_fwd_kernel, lambda t: (_cdiv(rows, t["BT"]), BNH * lay.NC),
        _score_tiles("scores_fwd", DQK, DHV, arch, lay.NC > 1 or has_state),
        q, k, fv, av, mrow, qn, w, nst if has_state else fv, mst if has_state else fv,
        S, lay.L, lay.NC, lay.SP, per_matrix, scale,
        DQK=DQK, PREC=prec, FAST_EXP2=_fast_exp2(q), NHT=nht, PACK=SCORE_PACK_ROWS, HAS_STATE=has_state,
        ZERO_REST=keep,
    )
    h = _new(v)
    _apply_scores("score_rows", w, per_matrix, v, h, None, lay, BNH, nht, prec, qn, mrow, eps,
                  state=(1, q, Cst, None, fv, mst, fv, fv, scale) if has_state else None,
                  NORMALIZE=normalize, EXP_GATE=exp_gate)
    return h, qn, w


def mlstm_bwd_score_matrix(q, k, v, dh, fv, av, mrow, rows: Optional[RowTermInputs], rs, dqn, lay: ChunkLayout, *,
                           Cst=None, nst=None, mst=None, dCst=None, dnst=None,
                           scores: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """mlstm_bwd through stored score matrices (uses_score_matrix): dq, dk, dv and the row sums q.dq, k.dk per output
    slice ([slices, BNH, SP]). With rows (one chunk without a state pass), rs, dqn and rows.dm_row are written here;
    without, rs and dqn are inputs. Cst / nst / mst (the forward's chunk states): dq's entering-state terms (as the
    dq kernel's HAS_INIT); dCst / dnst (the state gradients, filled): dk's and dv's (as HAS_FINAL).
    scores: the forward's weights W (KEEP_SCORES): dv = W^T (rs dh) from them, and Wr is not formed."""
    S, DQK = q.shape[-2:]
    DHV = v.shape[-1]
    BNH = _rows_of(q, S, DQK)
    nht = heads_per_row(q, k, v, dh, *([rows.h] if rows is not None else []))
    prec = _precision(q.dtype)
    arch = gpu_arch(q.device)
    cfg = _score_tiles("scores_bwd", DQK, DHV, arch, lay.NC > 1 or Cst is not None or dCst is not None)
    scale = 1.0 / math.sqrt(DQK)

    def form(ds, wr, do_ds: bool, do_wr: bool) -> None:
        _launch_tiled(
            mlstm_scores_bwd_kernel, lambda t: (_cdiv(lay.L, t["BT"]), BNH * lay.NC), cfg,
            q, k, v, dh, rows.h if rows else dh, fv, av, mrow, rows.qn if rows else fv, rs, dqn,
            rows.dm_row if rows else fv, ds, wr,
            S, lay.L, lay.NC, lay.SP, per_matrix, scale, rows.eps if rows else 0.0,
            DQK=DQK, DHV=DHV, PREC=prec, FAST_EXP2=_fast_exp2(q), NHT=nht, PACK=SCORE_PACK_ROWS,
            NORMALIZE=bool(rows and rows.normalize), EXP_GATE=bool(rows and rows.exp_gate), DO_DS=do_ds,
            DO_WR=do_wr, ROW_TERMS=rows is not None,
        )

    ds, per_matrix = _score_matrix(q, BNH, lay)
    wr = None
    if scores is not None and scores.numel() != BNH * lay.NC * per_matrix:
        raise ValueError(f"scores: {scores.numel()} elements, expected {BNH * lay.NC * per_matrix} (the forward's "
                         "packed weights of this call's layout)")
    # dS alone (with the row terms rs): with kept weights (dv from W, dh's rows scaled by rs) and before the split
    # pass's Wr launch (which reads rs)
    if scores is not None or SPLIT_SCORES_BWD:
        form(ds, ds, True, False)
    else:
        wr, _ = _score_matrix(q, BNH, lay)
        form(ds, wr, True, True)
    dq, dk, dv = _new(q), _new(k), _new(v)
    qdq = _apply_scores("score_rows", ds, per_matrix, k, dq, q, lay, BNH, nht, prec, fv, mrow, 0.0,
                        state=(2, dh, Cst, nst, fv, mst, rs, dqn, scale) if Cst is not None else None,
                        NORMALIZE=False, EXP_GATE=False)
    final = dCst is not None
    kdk = _apply_scores("score_cols", ds, per_matrix, q, dk, k, lay, BNH, nht, prec,
                        state=(1, v, dCst, dnst, fv, av, mrow) if final else None)
    if scores is not None:
        _apply_scores("score_cols", scores, per_matrix, dh, dv, None, lay, BNH, nht, prec,
                      state=(2, k, dCst, None, fv, av, mrow) if final else None, x_scale=rs)
        return dq, dk, dv, qdq, kdk
    if SPLIT_SCORES_BWD:  # then Wr in dS's memory: one triangle at a time
        wr = ds
        form(wr, wr, False, True)
    _apply_scores("score_cols", wr, per_matrix, dh, dv, None, lay, BNH, nht, prec,
                  state=(2, k, dCst, None, fv, av, mrow) if final else None)
    return dq, dk, dv, qdq, kdk


def mlstm_bwd_delta(h: torch.Tensor, dh: torch.Tensor, lay: ChunkLayout) -> torch.Tensor:
    BNH, S, DHV = h.shape
    delta = torch.zeros(BNH, lay.SP, device=h.device, dtype=torch.float32)
    BT, BV = 64, min(_pow2(DHV), 128)
    direct_launch(mlstm_bwd_delta_kernel, (_cdiv(S, BT), BNH), h, dh, delta, S, lay.SP, DHV, BT=BT, BV=BV, NHT=1,
                  num_warps=4)
    return delta


class RowTermInputs(NamedTuple):
    """What the dq kernel needs to compute the backward's per-row terms itself (mlstm_bwd's row_terms_from): h and
    qn from the forward, and the buffer [BNH, SP] it writes the per-row max-state gradient dm to."""

    h: torch.Tensor
    qn: torch.Tensor
    dm_row: torch.Tensor
    normalize: bool
    exp_gate: bool
    eps: float


# One-chunk calls without states (ViL at 224-512 px) may fold the two gate kernels into the matrix kernels: the fwd_h
# kernel forms the gate vectors itself (FOLD_GATES_FWD; kernels.mlstm_fwd_h_kernel, GATES_FWD) instead of reading them
# from a mlstm_gates_fwd_kernel launch before it, and the one-pass dk + dv kernel computes the gate gradients
# (FOLD_GATES_BWD; kernels.mlstm_bwd_dkdv_kernel, GATES_BWD) instead of a mlstm_gates_bwd_kernel launch after it.
# Each is one launch, and its host time, less; such calls are bound by the host (bench/results/session12/), but each
# fold adds GPU work (every fwd_h program walks the gates up to its rows; the last dk + dv program of a row does its
# gate gradients): 1-2 % of the GPU time on the H200, for 1.10-1.20x (forward fold) and up to 1.06x (backward fold)
# in eager wall time at DH 96 / 192 (bench/results/session13/fold_gates_*_ab_h200.log).
# TFLA_FOLD_GATES_FWD / TFLA_FOLD_GATES_BWD = 0 or 1 in the environment set them.
FOLD_GATES_FWD: bool = os.environ.get("TFLA_FOLD_GATES_FWD", "1") != "0"
FOLD_GATES_BWD: bool = os.environ.get("TFLA_FOLD_GATES_BWD", "1") != "0"
GATE_TILE_ROWS = 256  # rows per step of fwd_h's walk over the gates (GATES_FWD's GT)
# Longest chunk the folds take: what the GPU checks covered (S 196 and 1024). The gate-gradient code in the dk + dv
# kernel holds whole rows of pow2(L) entries in that kernel's 4 warps, where the gate kernel takes 8 above 1024.
FOLD_GATES_MAX_CHUNK = 1024


class GateGradsInDkdv(NamedTuple):
    """What mlstm_bwd's dk + dv kernel needs to write the gate gradients di, df (shaped as i, f) itself: the gate
    pre-activations, the max states, the outputs, a float32 ticket counter per row ([BNH, SP] with the counter at
    column 0, written by the dq kernel) and the per-row max-state gradient dm_row [BNH, SP]."""

    i: torch.Tensor
    f: torch.Tensor
    mst: torch.Tensor
    di: torch.Tensor
    df: torch.Tensor
    tickets: torch.Tensor
    exp_gate: bool
    dm_row: torch.Tensor


# Chunked calls (several chunks, no initial state, no final-state gradient, the state terms A_c from the row sums:
# STATE_TERMS_FROM_ROWS) may fold the gate gradients into the one-pass dk + dv kernel as well: the program that
# finishes a (batch, head) row's last key tile of any chunk walks all its chunks. One launch less for the chunked
# calls that take the one-pass kernel (DH 96). Opt-in (TFLA_FOLD_GATES_BWD_CHUNKED=1; GPU-checked as
# FOLD_GATES_FWD_CHUNKED): fwd+bwd GPU time 0.705 -> 0.716 ms at DH 96 / S 4096 in chunks of 128 on an H100, and no
# wall time won on a host that bound that call (bench/results/session22/ab_folds_each.log).
FOLD_GATES_BWD_CHUNKED: bool = os.environ.get("TFLA_FOLD_GATES_BWD_CHUNKED", "0") == "1"


def folds_gate_grads(DQK: int, DHV: int, arch: str, lay: ChunkLayout, *, state_pass: bool,
                     has_final_grad: bool, has_init: bool = False, state_terms_from_rows: bool = False) -> bool:
    """Whether mlstm_bwd can take GateGradsInDkdv: no final-state gradient, no initial state, dk and dv from one pass
    of mlstm_bwd_dkdv_kernel, chunks of at most FOLD_GATES_MAX_CHUNK rows, and either one chunk without a state pass
    (the gate gradients then need no state terms) or several with the state terms from the row sums
    (FOLD_GATES_BWD_CHUNKED). Not the split pass: where it runs (DH 192 on the H200) the backward is bound by the
    GPU, and the fold cost 2 % of GPU time and no host time that showed (0.773 -> 0.788 ms, wall 0.780 -> 0.794 at
    DH 192 / S 196; at DH 96, one pass, GPU 0.391 -> 0.396, wall 0.630 -> 0.592:
    bench/results/session13/fold_gates_bwd_ab_h200.log)."""
    if not FOLD_GATES_BWD or has_final_grad or has_init or lay.L > FOLD_GATES_MAX_CHUNK:
        return False
    if lay.NC == 1 and not state_pass:
        one_chunk = True
    elif lay.NC > 1 and FOLD_GATES_BWD_CHUNKED and state_terms_from_rows:
        one_chunk = False
    else:
        return False
    return (dkdv_mode(DQK, DHV, arch, with_states=not one_chunk) == "one_pass"
            and not uses_score_matrix(DQK, DHV, lay, keeps_states=not one_chunk))


def mlstm_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dh: torch.Tensor,  # [BNH, S, DHV], contiguous, v's dtype
    fv: torch.Tensor,
    av: torch.Tensor,
    mrow: torch.Tensor,
    rs: torch.Tensor,  # [BNH, SP] 1/denominator
    dqn: torch.Tensor,  # [BNH, SP]
    mst: torch.Tensor,
    Cst: Optional[torch.Tensor],
    nst: Optional[torch.Tensor],
    dCst: Optional[torch.Tensor],  # [BNH, NC+1, DQK, DHV]: index NC holds dC_final on entry; filled with dC_c
    dnst: Optional[torch.Tensor],
    lay: ChunkLayout,
    *,
    has_final_grad: bool,
    state_pass: bool,
    sum_slices: bool = True,
    fused_dkdv: bool = False,
    row_terms_from: Optional[RowTermInputs] = None,
    state_dots: bool = False,
    gate_grads: Optional[GateGradsInDkdv] = None,
    state_row_terms: Optional[RowTermInputs] = None,
    scores: Optional[torch.Tensor] = None,
) -> tuple:
    """Returns dq, dk, dv and the row sums q.dq [BNH, SP], k.dk [BNH, SP] (float32); with sum_slices=False the row
    sums come per output slice, [NKO, BNH, SP], for the fused gate kernel to add up. fused_dkdv takes
    dk and dv from the one-pass kernel (once, or twice as a split pass) where dkdv_mode() says so. Tiles: see tiles().
    row_terms_from (one chunk, no state pass): rs and dqn are outputs, filled by the dq kernel from these inputs
    together with the max-state gradient (see RowTermInputs), in place of a mlstm_bwd_rows launch.
    state_dots (where A_c does not come from the row sums, STATE_TERMS_FROM_ROWS): return a sixth tensor, the
    shares [BNH, NC+1, NPART] of A_c that the sequential state kernel computes (kernels._state_dot_part;
    mlstm_gates_bwd adds them up), or None where that kernel did not run (no state pass, or PARALLEL_CHUNK_STATES):
    the caller then computes A itself.
    dCst / dnst: every boundary is written by the sequential state kernel (index NC is read instead when
    has_final_grad), so they may start uninitialised there; the parallel state kernels and the calls without a state
    pass need them zeroed.
    gate_grads (where folds_gate_grads says so: one chunk with row_terms_from, or several with the state terms from
    the row sums): the one-pass dk + dv kernel also writes di and df into gate_grads' buffers, in place of a
    mlstm_gates_bwd launch by the caller.
    With row_terms_from and no state terms, where uses_score_matrix says so, dq, dk and dv come from the score-matrix
    kernels (mlstm_bwd_score_matrix) instead of the matrix kernels.
    state_row_terms (with a state pass, where row_terms_in_state_rows says so): rs and dqn are outputs, filled with
    state_row_terms.dm_row by the state-rows launch (ROW_TERMS_IN_STATE_ROWS), in place of a mlstm_bwd_rows launch
    by the caller.
    scores: the weights mlstm_fwd kept (KEEP_SCORES), for the score-matrix path; ignored by the matrix kernels."""
    S, DQK = q.shape[-2:]
    DHV = v.shape[-1]
    BNH = _rows_of(q, S, DQK)
    nht = heads_per_row(q, k, v, dh, *(t.h for t in (row_terms_from, state_row_terms) if t is not None))
    prec = _precision(q.dtype)
    scale = 1.0 / math.sqrt(DQK)
    dummy = fv
    apart = None
    if state_pass:
        cfg = tiles("bwd_state", DQK, DHV, gpu_arch(q.device))
        qs = _state_rows(q, fv, av, mrow, mst, rs, dqn, dnst, lay, nht, backward=True, scale=scale, dh=dh,
                         rows=state_row_terms)
        if PARALLEL_CHUNK_STATES:
            _launch_tiled(
                mlstm_bwd_chunk_state_kernel, lambda t: (BNH * lay.NC, _cdiv(DQK, t["BK"]), _cdiv(DHV, t["BV"])), cfg,
                qs, dh, dCst, S, lay.L, lay.NC, DQK, DHV, PREC=prec, NHT=nht,
            )
            _scan_states(dCst, dnst, fv, mrow, mst, S, lay, DQK, DHV, BNH, has_start=has_final_grad, reverse=True)
        else:
            # Head-dim tiles never shrink (_smaller), so the grid's state tiles are cfg's.
            dots = state_dots and Cst is not None
            if dots:
                apart = torch.empty(BNH, lay.NC + 1, _cdiv(DQK, cfg["BK"]) * _cdiv(DHV, cfg["BV"]), device=q.device,
                                    dtype=torch.float32)
            _launch_tiled(
                mlstm_bwd_state_kernel, lambda t: (_cdiv(DQK, t["BK"]), _cdiv(DHV, t["BV"]), BNH), cfg,
                qs, dh, fv, mrow, mst, dCst, dnst,
                Cst if dots else dummy, nst if dots else dummy, apart if dots else dummy,
                S, lay.L, lay.NC, lay.SP,
                DQK=DQK, DHV=DHV, HAS_FINAL=has_final_grad, STATE_DOTS=dots, PREC=prec, NHT=nht,
            )
    has_final = dCst is not None
    arch = gpu_arch(q.device)
    rows = row_terms_from
    if rows is not None and (state_pass or lay.NC != 1):
        raise ValueError("row_terms_from needs one chunk without a state pass (which reads rs and dqn first)")
    if (gate_grads is None and (rows is not None or state_pass)
            and uses_score_matrix(DQK, DHV, lay, keeps_states=Cst is not None or has_final)):
        dq, dk, dv, qdq, kdk = mlstm_bwd_score_matrix(q, k, v, dh, fv, av, mrow, rows, rs, dqn, lay, Cst=Cst,
                                                      nst=nst, mst=mst, dCst=dCst, dnst=dnst, scores=scores)
        out = (dq, dk, dv, qdq, kdk) if not sum_slices else (dq, dk, dv, qdq.sum(0), kdk.sum(0))
        return (*out, apart) if state_dots else out
    dcst, dnst_ = (dCst, dnst) if has_final else (dummy, dummy)
    common = dict(DQK=DQK, DHV=DHV, PREC=prec, FAST_EXP2=_fast_exp2(q), NHT=nht)

    cfg = tiles("dq", DQK, DHV, arch, with_states=Cst is not None, rows=_one_chunk_rows(lay))
    nko = _cdiv(DQK, cfg["BKO"] + cfg["BKO2"])
    dq = _new(q)
    qdq = _row_sums(nko, BNH, lay.SP, device=q.device, zeroed=sum_slices)
    mode = dkdv_mode(DQK, DHV, arch, with_states=has_final) if fused_dkdv else "slices"
    if gate_grads is not None and (mode != "one_pass" or (lay.NC == 1 and (rows is None or has_final))):
        raise ValueError("gate_grads needs the one-pass dk + dv kernel and, for one chunk, row_terms_from and no "
                         "final-state gradient (folds_gate_grads)")
    _launch_tiled(
        mlstm_bwd_dq_kernel, lambda t: (_cdiv(lay.L, t["BT"]), nko, BNH * lay.NC), cfg,
        q, k, v, dh, fv, av, mrow, rs, dqn,
        Cst if Cst is not None else dummy, nst if nst is not None else dummy, mst, dq, qdq,
        rows.h if rows else dummy, rows.qn if rows else dummy, rows.dm_row if rows else dummy,
        gate_grads.tickets if gate_grads is not None else dummy,
        S, lay.L, lay.NC, lay.SP, scale, rows.eps if rows else 0.0, HAS_INIT=Cst is not None,
        ROW_TERMS=rows is not None, NORMALIZE=bool(rows and rows.normalize), EXP_GATE=bool(rows and rows.exp_gate),
        ZERO_TICKETS=gate_grads is not None, **common,
    )
    if mode != "slices":
        dk, dv = _new(k), _new(v)
        kdk = _row_sums(1, BNH, lay.SP, device=q.device, zeroed=sum_slices)
        gates = gate_grads  # one pass: k.dk of a row is complete once its programs are done
        if gates is not None:
            gate_args = (gates.dm_row, gates.mst, gates.i, gates.f, gates.di, gates.df, gates.tickets)
            BL = _pow2(lay.L)
            gate_consts = dict(GATES_BWD=True, EXP_GATE=gates.exp_gate, BL=BL, GATES_STATE_TERMS=lay.NC > 1,
                               GATES_CB=max(1, min(_pow2(lay.NC, lo=1), 1024 // BL)))
        else:
            gate_args, gate_consts = (dummy,) * 7, {}
        for name, do_k, do_v in _DKDV_PASSES[mode]:
            cfg = tiles(name, DQK, DHV, arch, with_states=has_final, rows=_one_chunk_rows(lay))
            _launch_tiled(
                mlstm_bwd_dkdv_kernel, lambda t: (_cdiv(lay.L, t["BS"]), BNH * lay.NC), cfg,
                q, k, v, dh, fv, av, mrow, rs, dqn, dcst, dnst_, dk, dv, kdk,
                qdq, *gate_args,
                S, lay.L, lay.NC, lay.SP, scale, nko, BNH, HAS_FINAL=has_final, SL=min(64, cfg["BK"], cfg["BV"]),
                DO_K=do_k, DO_V=do_v, **gate_consts, **common,
            )
        out = (dq, dk, dv, qdq, kdk) if not sum_slices else (dq, dk, dv, qdq.sum(0), kdk.sum(0))
        return (*out, apart) if state_dots else out

    cfg = tiles("dk", DQK, DHV, arch, with_states=has_final, rows=_one_chunk_rows(lay))
    nko_k = _cdiv(DQK, cfg["BKO"])
    dk = _new(k)
    kdk = _row_sums(nko_k, BNH, lay.SP, device=q.device, zeroed=sum_slices)
    _launch_tiled(
        mlstm_bwd_dk_kernel, lambda t: (_cdiv(lay.L, t["BS"]), nko_k, BNH * lay.NC), cfg,
        q, k, v, dh, fv, av, mrow, rs, dqn, dcst, dnst_, dk, kdk,
        S, lay.L, lay.NC, lay.SP, scale, HAS_FINAL=has_final, **common,
    )
    dv = _new(v)
    _launch_tiled(
        mlstm_bwd_dv_kernel, lambda t: (_cdiv(lay.L, t["BS"]), _cdiv(DHV, t["BVO"]), BNH * lay.NC),
        tiles("dv", DQK, DHV, arch, with_states=has_final, rows=_one_chunk_rows(lay)),
        q, k, dh, fv, av, mrow, rs, dqn, dcst, dv,
        S, lay.L, lay.NC, lay.SP, scale, HAS_FINAL=has_final, **common,
    )
    out = (dq, dk, dv, qdq, kdk) if not sum_slices else (dq, dk, dv, qdq.sum(0), kdk.sum(0))
    return (*out, apart) if state_dots else out


# Fused paths (the default, see function.FUSED_KERNELS).
# Longest chunk the one-program-per-row gate kernels take; function.py keeps the PyTorch gates above it.
FUSED_GATES_MAX_CHUNK = 8192
# Where dk and dv come from one kernel (both accumulators in registers) rather than from a dk and a dv kernel: the tuned
# table lists the padded head dims where one pass won ("dkdv_one_pass"); untuned GPUs take it up to 128.
# ONE_PASS_DKDV, when set (tuner, tests), wins over both: True everywhere it fits, False nowhere.
ONE_PASS_DKDV: Optional[bool] = None
ONE_PASS_DKDV_MAX_HEAD_DIM = 256  # wider: the two accumulators no longer fit a program
DEFAULT_ONE_PASS_DKDV_MAX_HEAD_DIM = 128


def one_pass_dkdv(DQK: int, DHV: int, arch: str) -> bool:
    widest = max(_pow2(DQK), _pow2(DHV))
    if widest > ONE_PASS_DKDV_MAX_HEAD_DIM:
        return False
    if ONE_PASS_DKDV is not None:
        return ONE_PASS_DKDV
    table = tuned_tiles(arch)
    if "dkdv_one_pass" in table:
        return widest in table["dkdv_one_pass"]
    return widest <= DEFAULT_ONE_PASS_DKDV_MAX_HEAD_DIM


# The split pass: mlstm_bwd_dkdv_kernel twice, dk (DO_K) then dv (DO_V), tiles "dkdv_k" / "dkdv_v". The same products
# as one pass, but each launch holds one [BS, D] float32 accumulator instead of two, so a head dim of 192-256 can take
# 64-row key tiles (Hopper's wgmma; one pass spills there: bench/results/inspect_dkdv_dh192_sm90.md). The tuned table
# lists the padded head dims where it beat one pass ("dkdv_split", and "dkdv_split:states" for the variants with a
# chunk state, tuned apart by `bench/tune_mlstm.py --split`); SPLIT_DKDV, when set (tuner, tests), wins over it.
SPLIT_DKDV: Optional[bool] = None
# dkdv_mode -> the launches of mlstm_bwd_dkdv_kernel: (tile key, DO_K, DO_V) each.
_DKDV_PASSES = {"one_pass": (("dkdv", True, True),), "split": (("dkdv_k", True, False), ("dkdv_v", False, True))}


def dkdv_mode(DQK: int, DHV: int, arch: str, *, with_states: bool = False) -> str:
    """Where the fused backward's dk and dv come from: "one_pass", "split" (see SPLIT_DKDV) or "slices" (the dk and
    dv kernels, which slice the output head dim: any width). Memoised with the tiles (reset_tile_caches): it runs
    on every backward, where small shapes are bound by the host (bench/results/session11/host_timeline_h200.log)."""
    key = ("dkdv_mode", DQK, DHV, arch, with_states, SPLIT_DKDV, ONE_PASS_DKDV)
    if key not in _tiles_cache:
        _tiles_cache[key] = _dkdv_mode(DQK, DHV, arch, with_states)
    return _tiles_cache[key]


def _dkdv_mode(DQK: int, DHV: int, arch: str, with_states: bool) -> str:
    widest = max(_pow2(DQK), _pow2(DHV))
    if widest > ONE_PASS_DKDV_MAX_HEAD_DIM:
        return "slices"
    if SPLIT_DKDV is not None:
        split = SPLIT_DKDV
    else:
        split = widest in tuned_tiles(arch).get("dkdv_split:states" if with_states else "dkdv_split", ())
    if split:
        return "split"
    return "one_pass" if one_pass_dkdv(DQK, DHV, arch) else "slices"


def _row_warps(BL: int) -> int:
    return 4 if BL <= 1024 else 8


# The gate kernels take this many chunk rows at once (CB chunks of BL rows, CB a power of two): a few chunks' worth of
# per-row vectors per program, which stays in registers at 8 warps. Tests lower it to get several groups.
GATE_GROUP_ROWS = 2048


def _gate_chunks_per_group(lay: ChunkLayout, BL: int) -> int:
    return max(1, min(_pow2(lay.NC, lo=1), GATE_GROUP_ROWS // BL))


def folds_gate_vectors(DQK: int, DHV: int, arch: str, lay: ChunkLayout, *, keeps_states: bool) -> bool:
    """Whether mlstm_fwd can take gates_from: one chunk of at most FOLD_GATES_MAX_CHUNK rows, no initial or kept
    state (see FOLD_GATES_FWD), and fwd_h's tiles cover h's columns in one program per row tile. Wider heads (DH 384 /
    512 on the H200) take several, each of which would walk the gates again; they are bound by the GPU, where the fold
    saves nothing, and the GPU checks of the fold covered DH 96 and 192 only."""
    if not (FOLD_GATES_FWD and lay.NC == 1 and lay.L <= FOLD_GATES_MAX_CHUNK and not keeps_states):
        return False
    if uses_score_matrix(DQK, DHV, lay, keeps_states=keeps_states):
        return False
    cfg = tiles("fwd_h", DQK, DHV, arch, rows=_one_chunk_rows(lay))
    return cfg["BV"] + cfg["BV2"] >= DHV


class GateVectors(NamedTuple):
    """The gate vectors of a call: fv (F), av (a), mrow (m) [*lead, SP], views of rows [3, *lead, SP] (one
    allocation, which the registered op saves for its backward whole), and the max states mst [*lead, NC+1]."""

    fv: torch.Tensor
    av: torch.Tensor
    mrow: torch.Tensor
    mst: torch.Tensor
    rows: torch.Tensor


def gate_vector_buffers(i: torch.Tensor, lay: ChunkLayout) -> GateVectors:
    """Uninitialised gate vectors for i's leading dims."""
    lead = i.shape[:-1]
    # One allocation and an unbind for the three per-row vectors: this op is host-bound at ViL's shapes, and an
    # allocation costs 5-6 us of host time on the H200 machine (bench/results/session12/launch_floor_h200.log).
    rows = torch.empty(3, *lead, lay.SP, device=i.device, dtype=torch.float32)
    mst = torch.empty(*lead, lay.NC + 1, device=i.device, dtype=torch.float32)
    if POISON_OUTPUTS:
        rows.fill_(float("nan"))
        mst.fill_(float("nan"))
    return GateVectors(*rows.unbind(0), mst, rows)


def mlstm_gates_fwd(
    i: torch.Tensor,  # [BNH, S] input-gate pre-activations
    f: torch.Tensor,  # [BNH, S] forget-gate pre-activations
    m0: Optional[torch.Tensor],  # [BNH] initial max state
    lay: ChunkLayout,
    *,
    exp_gate: bool,
) -> GateVectors:
    """fv, av, mrow [*lead, SP] and mst [*lead, NC+1] (lead: i's leading dims), as function._gate_vectors, in one
    launch."""
    BNH = _rows_of(i, lay.S)
    gates = gate_vector_buffers(i, lay)
    fv, av, mrow, mst = gates[:4]
    BL = _pow2(lay.L)
    CB = _gate_chunks_per_group(lay, BL)
    direct_launch(
        mlstm_gates_fwd_kernel, (BNH,),
        i.contiguous(), f.contiguous(), m0.contiguous() if m0 is not None else fv, fv, av, mrow, mst,
        lay.S, lay.L, lay.NC, lay.SP,
        EXP_GATE=exp_gate, HAS_M0=m0 is not None, BL=BL, CB=CB, num_warps=_row_warps(CB * BL),
    )
    return gates


def mlstm_bwd_rows(
    h: torch.Tensor,  # [BNH, S, DHV]
    dh: torch.Tensor,  # [BNH, S, DHV]
    qn: torch.Tensor,  # [BNH, SP]
    mrow: torch.Tensor,  # [BNH, SP]
    lay: ChunkLayout,
    *,
    exp_gate: bool,
    normalize: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rs (1/denominator), dqn and the per-row max-state gradient dm [*lead, SP], in one launch."""
    S, DHV = h.shape[-2:]
    BNH = _rows_of(h, S, DHV)
    nht = heads_per_row(h, dh)
    rs = torch.empty(*h.shape[:-2], lay.SP, device=h.device, dtype=torch.float32)
    dqn, dm_row = torch.empty_like(rs), torch.empty_like(rs)
    BT, BV = 64, min(_pow2(DHV), 128)
    direct_launch(
        mlstm_bwd_rows_kernel, (_cdiv(lay.SP, BT), BNH),
        h, dh, qn, mrow, rs, dqn, dm_row, S, lay.SP, DHV, eps,
        NORMALIZE=normalize, EXP_GATE=exp_gate, BT=BT, BV=BV, NHT=nht, num_warps=4,
    )
    return rs, dqn, dm_row


def mlstm_gates_bwd(
    qdq: torch.Tensor,  # [NKO, BNH, SP] partial row sums q.dq (one per output slice of the dq kernel)
    kdk: torch.Tensor,  # [NKO_K, BNH, SP] (the dk kernel's output slices; may differ from the dq kernel's)
    dm_row: torch.Tensor,  # [BNH, SP]
    fv: torch.Tensor,
    av: torch.Tensor,
    mst: torch.Tensor,  # [BNH, NC+1]
    a_ends: Optional[torch.Tensor],  # [BNH, 2] float32: A_0, A_NC (A_c = <C_c, dC_c> + <n_c, dn_c>; 0 where absent)
    a_shares: Optional[torch.Tensor],  # [BNH, NC+1, NPART]: every A_c in NPART shares (or None: row sums)
    dm_final: Optional[torch.Tensor],  # [BNH] gradient of the final max state
    i: torch.Tensor,  # [BNH, S]
    f: torch.Tensor,  # [BNH, S]
    lay: ChunkLayout,
    *,
    exp_gate: bool,
    has_init: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """di, df (shaped as i, f, in their dtypes) and dm0 [BNH] (float32; None without has_init), in one launch. The
    state terms A_c come from a_shares where given, else from the row sums (kernels._gates_bwd_row, STATE_TERMS)
    with a_ends, which an initial state needs (its A_0)."""
    if has_init and a_ends is None and a_shares is None:
        raise ValueError("mlstm_gates_bwd: an initial state needs a_ends (its A_0) or a_shares")
    NKO_Q, BNH, _ = qdq.shape
    i, f = i.contiguous(), f.contiguous()
    di, df = torch.empty_like(i), torch.empty_like(f)
    dm0 = _row_sums(BNH, device=i.device, zeroed=False) if has_init else None  # written for every row when has_init
    BL = _pow2(lay.L)
    nparts = a_shares.shape[-1] if a_shares is not None else 1
    CB = _gate_chunks_per_group(lay, BL)
    direct_launch(
        mlstm_gates_bwd_kernel, (BNH,),
        qdq, kdk, dm_row, fv, av, mst, a_shares if a_shares is not None else fv, a_ends if a_ends is not None else fv,
        dm_final if dm_final is not None else fv,
        i, f, di, df, dm0 if has_init else fv, lay.S, lay.L, lay.NC, lay.SP, NKO_Q, kdk.shape[0], BNH, nparts,
        EXP_GATE=exp_gate, STATE_TERMS=lay.NC > 1 or a_ends is not None or a_shares is not None,
        A_SHARES=a_shares is not None, HAS_AEND=a_shares is None and a_ends is not None,
        HAS_DMF=dm_final is not None, HAS_INIT=has_init, BL=BL, BP=_pow2(nparts), CB=CB, num_warps=_row_warps(CB * BL),
    )
    return di, df, dm0
