"""Vision-LSTM (ViL): xLSTM as a generic vision backbone, as a timm model family.

Paper: "Vision-LSTM: xLSTM as Generic Vision Backbone", Alkin et al., arXiv 2406.04303.
Written from the description in shared/spec/vil-architecture.md; loads the authors' released checkpoints.

    import timm, vil
    model = timm.create_model("vil_base")                                   # ViL v2, random init
    model = timm.create_model(
        "vil_base", pretrained=True, pretrained_cfg_overlay=dict(file="vil2_base16_e400_in1k.th"))

One class serves both published versions:
- v2 (`vil_*`): depthwise 3x3 conv on the token grid, biases everywhere, concat pooling of the first and last
  token (width 2D).
- v1 (`vil1_*`): causal depthwise conv1d (kernel 4) along the sequence, no biases in the projections and norms,
  mean of the first and last token (width D).

`depth` counts sub-blocks (24 for ViL-T/S/B). Even sub-blocks read the token grid row by row from the top-left,
odd ones from the bottom-right. Layer-wise lr decay groups each pair of sub-blocks into one layer, like a ViT of
depth/2 blocks.

Loading: `pretrained=True` with `pretrained_cfg_overlay=dict(file=...)` (or the registered URL) goes through
`VisionLSTM.load_pretrained`, which reads the authors' .th files and ours (.safetensors, .pth) without unpickling
objects; `checkpoint_filter_fn` does the conversion for timm's other paths. `timm.create_model(checkpoint_path=...)`
expects our layout: convert the authors' files first with `vil-convert`.

Norm weights are stored as standard scales (init 1). The authors' files store the block norms, the mLSTM output
norm and the final per-token norm as offsets (scale = 1 + w); `checkpoint_filter_fn` adds the 1 on loading.
"""

import logging
import math
import os
import pickle
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv
from torch import nn

from vil.layers import PatchEmbed, ViLLayer, resample_pos_embed

try:
    from timm.models._input import update_model_args, update_model_input_size
except ImportError:  # timm versions before the model-traits bookkeeping: nothing to record

    def update_model_args(model: nn.Module, **model_args: Any) -> None:
        pass

    def update_model_input_size(model: nn.Module, img_size: Any, **model_args: Any) -> None:
        pass


# Plain torch.fx.symbolic_trace treats the resampling as a leaf here too (its shape checks are control flow).
torch.fx.wrap("resample_pos_embed")

__all__ = ["ViLBlock", "VisionLSTM", "checkpoint_filter_fn", "convert_authors_state_dict", "load_checkpoint_file"]

_logger = logging.getLogger(__name__)

GLOBAL_POOLS = ("bilateral_flatten", "bilateral_avg", "avg", "")


class ViLBlock(nn.Module):
    """Pre-norm residual sub-block: x + DropPath(ViLLayer(LayerNorm(x))) on a token grid [B, H, W, D]."""

    def __init__(
        self,
        dim: int,
        reverse: bool = False,
        drop_path: float = 0.0,
        expansion: int = 2,
        num_heads: int = 4,
        qkv_block_size: int = 4,
        conv_kind: str = "2d",
        conv_kernel_size: int = 3,
        proj_bias: bool = True,
        norm_bias: bool = True,
        norm_eps: float = 1e-5,
        proj_down_std: float | None = None,
        mlstm_backend: str = "auto",
        mlstm_chunk_size: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps, bias=norm_bias, device=device, dtype=dtype)
        self.layer = ViLLayer(
            dim,
            reverse=reverse,
            expansion=expansion,
            num_heads=num_heads,
            qkv_block_size=qkv_block_size,
            conv_kind=conv_kind,
            conv_kernel_size=conv_kernel_size,
            proj_bias=proj_bias,
            norm_bias=norm_bias,
            norm_eps=norm_eps,
            proj_down_std=proj_down_std,
            mlstm_backend=mlstm_backend,
            mlstm_chunk_size=mlstm_chunk_size,
            device=device,
            dtype=dtype,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer(self.norm(x)))


def _layer_group(name: str, last_group: int) -> tuple[float, ...]:
    """Layer-decay ordinal of a parameter: stem 0, sub-blocks 2j and 2j+1 share 1 + j, the final norm joins the last
    pair (timm's MATCH_PREV_GROUP marker 99999), fc_norm and head come last."""
    if name.startswith(("patch_embed.", "pos_embed")):
        return (0.0,)
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return (1.0 + int(match.group(1)) // 2,)
    if name.startswith("norm."):
        return (float(last_group), 99999.0)
    return (float("inf"),)


class VisionLSTM(nn.Module):
    """Vision-LSTM: patch embedding + 2D position embedding, `depth` ViL sub-blocks of alternating direction,
    final LayerNorm, bilateral pooling, LayerNorm, linear head.

    Widths as timm reads them: `num_features` = D, the width of forward_features' tokens [B, S, D] and of every
    feature map; `head_hidden_size` = the pooled (pre-logits) width, 2D for the v2 concat pooling and D otherwise,
    which is also what forward returns with num_classes=0.

    Args:
        img_size: nominal input size; other sizes need dynamic_img_size=True or set_input_size().
        patch_size: patch-embedding kernel.
        patch_stride: patch-embedding stride (None: = patch_size; 8 for the long-sequence variants).
        in_chans: image channels.
        num_classes: classes of the linear head (0: no head, forward returns pooled features).
        global_pool: "bilateral_flatten" (v2: concat of first and last token, width 2D), "bilateral_avg" (v1: their
            mean, width D), "avg" (mean of all tokens, width D) or "" (no pooling, head per token).
        embed_dim: model width D. The layer's inner width E = expansion * D must split into num_heads heads
            and into qkv_block_size blocks.
        depth: number of sub-blocks (24 for ViL-T/S/B; the authors' v2 code counts pairs, 12).
        num_heads: mLSTM heads (4 in every published model).
        qkv_block_size: block size of the block-diagonal q/k/v maps (4).
        expansion: E / D (2).
        conv_kind: "2d" (v2: depthwise conv on the token grid) or "causal1d" (v1: causal conv along the sequence).
        conv_kernel_size: 3 for "2d", 4 for "causal1d".
        proj_bias: biases in proj_up, q/k/v and proj_down (v2 True, v1 False).
        norm_bias: biases in the block norms, mLSTM output norm and final norm (v2 True, v1 False).
        norm_eps: eps of those norms (1e-5).
        fc_norm_eps: eps of the LayerNorm after pooling (1e-6).
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth of every sub-block (the published recipe: uniform over depth).
        drop_path_decay: instead, increase it linearly from 0 to drop_path_rate (segmentation fine-tuning).
        proj_down_init: "single" (std 2 / sqrt(D), the released weights) or "depth" (std 2 / (depth * sqrt(D))).
        dynamic_img_size: accept any image size at run time; the position embedding is resampled per forward.
        mlstm_backend, mlstm_chunk_size: passed to `tfla.mlstm` ("auto" picks the fastest available).
        device, dtype: where and in which dtype to create the parameters ("meta" works).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        patch_stride: int | tuple[int, int] | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "bilateral_flatten",
        embed_dim: int = 192,
        depth: int = 24,
        num_heads: int = 4,
        qkv_block_size: int = 4,
        expansion: int = 2,
        conv_kind: str = "2d",
        conv_kernel_size: int = 3,
        proj_bias: bool = True,
        norm_bias: bool = True,
        norm_eps: float = 1e-5,
        fc_norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_path_decay: bool = False,
        proj_down_init: str = "single",
        dynamic_img_size: bool = False,
        mlstm_backend: str = "auto",
        mlstm_chunk_size: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        inner_dim = expansion * embed_dim
        if depth < 1:
            raise ValueError(f"depth (number of sub-blocks) must be >= 1, got {depth}")
        if inner_dim % num_heads or inner_dim % qkv_block_size:
            raise ValueError(
                f"embed_dim={embed_dim}: the inner width {expansion} * embed_dim = {inner_dim} must be divisible by "
                f"num_heads={num_heads} and qkv_block_size={qkv_block_size}; use an even embed_dim"
            )
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if proj_down_init not in ("single", "depth"):
            raise ValueError(f"proj_down_init must be 'single' or 'depth', got {proj_down_init!r}")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.head_hidden_size = self._pooled_width(global_pool)
        self.num_prefix_tokens = 0
        self.depth = depth
        self.conv_kind = conv_kind
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size, patch_size, patch_stride, in_chans, embed_dim, strict_img_size=not dynamic_img_size, **dd
        )
        grid_h, grid_w = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_h, grid_w, embed_dim, **dd))  # [1, H', W', D]

        if drop_path_decay:
            drop_paths = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        else:
            drop_paths = [drop_path_rate] * depth
        proj_down_std = 2 / math.sqrt(embed_dim) / (depth if proj_down_init == "depth" else 1)
        self.blocks = nn.Sequential(
            *[
                ViLBlock(
                    embed_dim,
                    reverse=i % 2 == 1,
                    drop_path=drop_paths[i],
                    expansion=expansion,
                    num_heads=num_heads,
                    qkv_block_size=qkv_block_size,
                    conv_kind=conv_kind,
                    conv_kernel_size=conv_kernel_size,
                    proj_bias=proj_bias,
                    norm_bias=norm_bias,
                    norm_eps=norm_eps,
                    proj_down_std=proj_down_std,
                    mlstm_backend=mlstm_backend,
                    mlstm_chunk_size=mlstm_chunk_size,
                    **dd,
                )
                for i in range(depth)
            ]
        )
        reduction = self.patch_embed.stride[0]
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": embed_dim, "reduction": reduction} for i in range(depth)
        ]
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, bias=norm_bias, **dd)
        self.fc_norm = nn.LayerNorm(self.head_hidden_size, eps=fc_norm_eps, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """The published initialisation of the stem and head (the blocks initialise themselves)."""
        self.patch_embed.reset_parameters()
        trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def _pooled_width(self, global_pool: str) -> int:
        return 2 * self.embed_dim if global_pool == "bilateral_flatten" else self.embed_dim

    def _device_dtype(self) -> dict[str, Any]:
        param = next(self.parameters())
        return {"device": param.device, "dtype": param.dtype}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """Parameter-name -> layer ordinal for timm's layer-wise lr decay (a pair of sub-blocks is one layer)."""
        return partial(_layer_group, last_group=1 + (len(self.blocks) - 1) // 2)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head for num_classes (0: none); a pooling that changes the pooled width also gets a new fc_norm.
        Device, dtype and train/eval mode are kept."""
        dd = self._device_dtype()
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            width = self._pooled_width(global_pool)
            if width != self.head_hidden_size and isinstance(self.fc_norm, nn.LayerNorm):
                self.fc_norm = nn.LayerNorm(width, eps=self.fc_norm.eps, **dd)
                self.fc_norm.train(self.training)
            self.global_pool = global_pool
            self.head_hidden_size = width
            update_model_args(self, global_pool=global_pool)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        self.head.train(self.training)

    @torch.jit.ignore
    def set_input_size(
        self,
        img_size: int | tuple[int, int] | None = None,
        patch_size: int | tuple[int, int] | None = None,
    ) -> None:
        """Change the nominal input size (and patch size): the position embedding is resampled bicubically."""
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        grid = list(self.patch_embed.grid_size)
        if list(self.pos_embed.shape[1:3]) != grid:
            with torch.no_grad():
                pos_embed = resample_pos_embed(self.pos_embed.detach(), grid)
            self.pos_embed = nn.Parameter(pos_embed, requires_grad=self.pos_embed.requires_grad)
        update_model_input_size(self, self.patch_embed.img_size, patch_size=patch_size)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load a checkpoint file: the authors' .th (either key spelling, v1 or v2) or ours (.safetensors/.pth).

        Reads with torch.load(weights_only=True) or safetensors only. Converts keys and norm offsets, resamples the
        position embedding, adapts in_chans, drops the head when the class count differs; raises ValueError naming
        the keys and shapes when the checkpoint belongs to another model. (timm calls this for pretrained=True.)
        """
        state_dict = checkpoint_filter_fn(load_checkpoint_file(checkpoint_path), self)
        result = self.load_state_dict(state_dict, strict=False)
        if result.missing_keys:
            _logger.info(f"Not in the checkpoint, left at init: {', '.join(result.missing_keys)}")

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:
            return x + resample_pos_embed(self.pos_embed, [x.shape[1], x.shape[2]])
        return x + self.pos_embed

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the sub-blocks in `indices` (int: the last n; None: all), in image order.

        Returns the list of intermediates ([B, D, H', W'] for "NCHW", [B, H' * W', D] for "NLC"), or
        (final features as forward_features returns them, intermediates) unless intermediates_only.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._pos_embed(self.patch_embed(x))  # [B, H', W', D]
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y.flatten(1, 2))
        if intermediates_only:
            return intermediates
        return self.norm(x).flatten(1, 2), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the sub-blocks after the last of `indices` (and the final norm / head); returns the indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> normed tokens [B, S, D], S = H' * W' in row-major (image) order."""
        x = self._pos_embed(self.patch_embed(x))  # [B, H', W', D]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x).flatten(1, 2)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, head_hidden_size] (or [B, S, D] for global_pool="")."""
        if self.global_pool == "bilateral_flatten":
            return torch.cat([x[:, 0], x[:, -1]], dim=-1)
        if self.global_pool == "bilateral_avg":
            return (x[:, 0] + x[:, -1]) / 2
        if self.global_pool == "avg":
            return x.mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _unsafe_globals(path: str) -> list[str]:
    # Only for the error message: a file that cannot even be listed has no names to report.
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, ValueError, pickle.UnpicklingError, AttributeError):
        return []


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint without executing anything from it: safetensors, or torch.load(weights_only=True).

    Accepts a bare state dict or a dict holding one under "state_dict" / "model" (the authors' files are
    {"state_dict": ..., "ctor_kwargs": ..., ...}). Raises ValueError for files that need arbitrary unpickling.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise ValueError(
                f"refusing to load {path}: it contains pickled Python objects ({', '.join(unsafe)}). vil reads "
                f"checkpoints with torch.load(weights_only=True) and never unpickles arbitrary objects from files. "
                f"If you trust the file, re-save only its tensors in a trusted environment, e.g. "
                f"torch.save({{'state_dict': ckpt['state_dict']}}, 'clean.th'), or use .safetensors."
            ) from err
        raise ValueError(
            f"could not read {path} as a PyTorch checkpoint with weights_only=True ({str(err).splitlines()[0]}); "
            f"is it complete and a torch.save file? .safetensors files must end in .safetensors"
        ) from err
    return unwrap_state_dict(obj, source=path)


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object, with DDP / torch.compile prefixes removed."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source} holds no state dict (got {type(obj).__name__}); expected a dict of tensors")
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(  # noqa: TRY004 (bad file content, not a bad argument type)
                f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a dict of tensors "
                f"(or a dict with one under 'state_dict')"
            )
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state_dict[key] = value
    return state_dict


def is_authors_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for the authors' key spellings (training code or standalone files), False for ours."""
    return any(
        key == "pos_embed.embed"
        or key.startswith(("xlstm.", "legacy_norm.", "head.0.", "head.1."))
        or ".rowwise_from_" in key
        for key in state_dict
    )


def _layer_key(rest: str) -> str:
    """Authors' key inside a ViL layer -> ours."""
    match = re.fullmatch(r"(?:conv1d|conv)(?:\.conv)?\.(weight|bias)", rest)
    if match:
        return f"conv.{match.group(1)}"
    if rest.startswith("mlstm_cell.outnorm."):
        return "mlstm.norm." + rest[len("mlstm_cell.outnorm.") :]
    if rest.startswith("mlstm_cell."):
        return "mlstm." + rest[len("mlstm_cell.") :]
    return rest


def _sub_block_key(index: int, module: str, rest: str) -> str:
    return f"blocks.{index}.norm.{rest}" if module == "norm" else f"blocks.{index}.layer.{_layer_key(rest)}"


def convert_authors_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' ViL state dict (v1 or v2; training or standalone spelling) in our key layout and norm convention.

    Training spelling: xlstm.blocks.{j}.xlstm_norm / .xlstm.*, xlstm.post_blocks_norm, head.0 (pooled norm), head.1.
    v2 standalone: blocks.{j//2}.rowwise_from_{top_left,bot_right}.{norm,layer}.*, norm (per token), legacy_norm
    (pooled), head. v1 standalone: blocks.{j}.{norm,layer}.*, legacy_norm (per token), norm (pooled), head.
    Offset weights (block norms, mLSTM output norm, final per-token norm) become standard scales: w + 1.
    Keys that match nothing are kept unchanged, so that a mismatch report names them.
    """
    v2_standalone = any(".rowwise_from_" in key for key in state_dict)
    top_level = {
        "xlstm.post_blocks_norm.": "norm.",
        "head.0.": "fc_norm.",
        "head.1.": "head.",
        "patch_embed.": "patch_embed.",
        "head.": "head.",
        # map by role: the per-token norm is "norm" in the v2 standalone file and "legacy_norm" in the v1 one
        "norm.": "norm." if v2_standalone else "fc_norm.",
        "legacy_norm.": "fc_norm." if v2_standalone else "norm.",
    }
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = None
        if key == "pos_embed.embed":
            new_key = "pos_embed"
        elif match := re.fullmatch(r"xlstm\.blocks\.(\d+)\.(xlstm_norm|xlstm)\.(.+)", key):
            module = "norm" if match.group(2) == "xlstm_norm" else "layer"
            new_key = _sub_block_key(int(match.group(1)), module, match.group(3))
        elif match := re.fullmatch(r"blocks\.(\d+)\.rowwise_from_(top_left|bot_right)\.(norm|layer)\.(.+)", key):
            index = 2 * int(match.group(1)) + (match.group(2) == "bot_right")
            new_key = _sub_block_key(index, match.group(3), match.group(4))
        elif match := re.fullmatch(r"blocks\.(\d+)\.(norm|layer)\.(.+)", key):
            new_key = _sub_block_key(int(match.group(1)), match.group(2), match.group(3))
        else:
            for prefix, ours in top_level.items():
                if key.startswith(prefix):
                    new_key = ours + key[len(prefix) :]
                    break
        new_key = key if new_key is None else new_key
        if new_key in converted:
            raise ValueError(f"checkpoint keys collide after conversion: {key!r} -> {new_key!r}")
        if _is_offset_norm_weight(new_key):
            value = value.to(torch.promote_types(value.dtype, torch.float32)) + 1.0
        converted[new_key] = value
    return converted


def _is_offset_norm_weight(key: str) -> bool:
    return key == "norm.weight" or re.fullmatch(r"blocks\.\d+\.(norm|layer\.mlstm\.norm)\.weight", key) is not None


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """One line about the architecture a state dict (in our layout) belongs to."""
    parts = []
    conv = state_dict.get("blocks.0.layer.conv.weight")
    if conv is not None:
        parts.append("v1 (causal conv1d)" if conv.ndim == 3 else "v2 (3x3 conv)")
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is not None:
        parts.append(f"embed_dim={proj.shape[0]}, patch {proj.shape[-1]}, in_chans={proj.shape[1]}")
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if indices:
        parts.append(f"depth={max(indices) + 1} sub-blocks")
    if "pos_embed" in state_dict:
        parts.append(f"position grid {tuple(state_dict['pos_embed'].shape[1:3])}")
    head = state_dict.get("head.weight")
    if head is not None:
        parts.append(f"{head.shape[0]} classes")
    return ", ".join(parts) if parts else "unknown layout"


def matching_model_names(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Registered ViL names whose architecture (version, width, depth) fits a state dict in our layout."""
    conv = state_dict.get("blocks.0.layer.conv.weight")
    proj = state_dict.get("patch_embed.proj.weight")
    if conv is None or proj is None:
        return []
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    conv_kind = "causal1d" if conv.ndim == 3 else "2d"
    return [
        name
        for name, args in MODEL_ARGS.items()
        if args["embed_dim"] == proj.shape[0] and args["depth"] == depth and args.get("conv_kind", "2d") == conv_kind
    ]


def _fit_to_model(state_dict: dict[str, torch.Tensor], model: VisionLSTM) -> dict[str, torch.Tensor]:
    """Resample the position grid, adapt in_chans, drop a head that does not fit; refuse anything else that
    differs from the model."""
    expected = model.state_dict()
    state_dict = dict(state_dict)
    pos = state_dict.get("pos_embed")
    target = expected.get("pos_embed")
    if (
        pos is not None
        and target is not None
        and pos.ndim == 4
        and pos.shape[-1] == target.shape[-1]
        and pos.shape[1:3] != target.shape[1:3]
    ):
        _logger.info(f"Resampling pos_embed grid {tuple(pos.shape[1:3])} -> {tuple(target.shape[1:3])}")
        state_dict["pos_embed"] = resample_pos_embed(pos, list(target.shape[1:3]))
    proj = state_dict.get("patch_embed.proj.weight")
    target = expected.get("patch_embed.proj.weight")
    same_kernel = proj is not None and target is not None and proj.ndim == 4 and proj.shape[2:] == target.shape[2:]
    if same_kernel and proj.shape[0] == target.shape[0] and proj.shape[1] != target.shape[1]:
        state_dict["patch_embed.proj.weight"] = adapt_input_conv(target.shape[1], proj, base_chans=proj.shape[1])
    for key in [k for k in state_dict if k.startswith(("head.", "fc_norm."))]:
        if key not in expected or state_dict[key].shape != expected[key].shape:
            _logger.info(f"Dropping {key} {tuple(state_dict[key].shape)}: the model's head differs")
            del state_dict[key]

    missing = [k for k in expected if k not in state_dict and not k.startswith(("head.", "fc_norm."))]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:

        def listing(title: str, items: list[str]) -> str:
            shown = "; ".join(items[:8]) + (f"; ... ({len(items) - 8} more)" if len(items) > 8 else "")
            return f"\n  {len(items)} {title}: {shown}" if items else ""

        names = matching_model_names(state_dict)
        hint = f" It fits {', '.join(names)}." if names else ""
        raise ValueError(
            "checkpoint does not match the model."
            f"\n  checkpoint: {describe_state_dict(state_dict)}"
            f"\n  model:      {describe_state_dict(expected)}"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("shape mismatches", mismatched)
            + f"\n Create the model that the checkpoint was trained as.{hint}"
        )
    return state_dict


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VisionLSTM) -> dict[str, torch.Tensor]:
    """Any ViL checkpoint (authors' v1/v2 in either spelling, or ours) -> a state dict that loads into `model`."""
    state_dict = unwrap_state_dict(state_dict)
    if is_authors_layout(state_dict):
        state_dict = convert_authors_state_dict(state_dict)
    return _fit_to_model(state_dict, model)


def _default_out_indices(depth: int) -> tuple[int, ...]:
    """Four sub-blocks spread like the segmentation recipe's [7, 11, 15, 23] for 24 sub-blocks."""
    indices = {max(0, round(depth * fraction) - 1) for fraction in (1 / 3, 1 / 2, 2 / 3, 1)}
    return tuple(sorted(indices))


def _create_vil(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    out_indices = kwargs.pop("out_indices", _default_out_indices(kwargs.get("depth", 24)))
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and (overlay.get("file") or overlay.get("url")) and "custom_load" not in overlay:
        # timm resets custom_load for a user-supplied file; keep our loader (VisionLSTM.load_pretrained): it reads
        # the authors' .th files and ours without unpickling objects, and keeps a head whose shape fits.
        kwargs["pretrained_cfg_overlay"] = dict(overlay, custom_load=True)
    return build_model_with_cfg(
        VisionLSTM,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"feature_cls": "getter", "out_indices": out_indices},
        **kwargs,
    )


_URL = "https://ml.jku.at/research/vision_lstm/download/"


def _cfg(file: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": _URL + file if file else "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "fixed_input_size": True,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "origin_url": "https://github.com/NX-AI/vision-lstm",
        "paper_name": "Vision-LSTM: xLSTM as Generic Vision Backbone",
        "paper_ids": "arXiv:2406.04303",
        # our loader: weights_only reads, key conversion of the authors' .th files, refusal messages
        "custom_load": True,
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vil_tiny.in1k_e800": _cfg("vil2_tiny16_e800_in1k.th", notes=("ImageNet-1K top-1 78.3",)),
        "vil_tiny.in1k_e400": _cfg("vil2_tiny16_e400_in1k.th", notes=("ImageNet-1K top-1 77.2",)),
        "vil_small.in1k_e400": _cfg("vil2_small16_e400_in1k.th", notes=("ImageNet-1K top-1 81.5",)),
        "vil_base.in1k_e400": _cfg("vil2_base16_e400_in1k.th", notes=("ImageNet-1K top-1 82.4",)),
        "vil_large": _cfg(notes=("no published weights: the paper's speed-benchmark configuration",)),
        "vil1_tiny.in1k_e800": _cfg("vil_tiny16_e800_in1k.th", notes=("ImageNet-1K top-1 77.3",)),
        "vil1_tiny.in1k_e400": _cfg("vil_tiny16_e400_in1k.th"),
        "vil1_tinyplus.in1k_e800": _cfg("vil_tinyplus16_e800_in1k.th", notes=("ImageNet-1K top-1 78.1",)),
        "vil1_tinyplus.in1k_e400": _cfg("vil_tinyplus16_e400_in1k.th"),
        # The authors' hubconf points this entry at the stride-16 file; the name below follows their naming of the
        # other stride-8 files. Override with pretrained_cfg_overlay=dict(file=...) if it differs.
        "vil1_tinyplus_stride8.in1k_e800": _cfg("vil_tinyplus16_e800_in1k_stride8.th", notes=("top-1 80.0",)),
        "vil1_small.in1k_e400": _cfg("vil_small16_e400_in1k.th", notes=("ImageNet-1K top-1 80.7",)),
        "vil1_smallplus.in1k_e400": _cfg("vil_smallplus16_e400_in1k.th", notes=("ImageNet-1K top-1 80.9",)),
        "vil1_smallplus_stride8.in1k_e400": _cfg("vil_smallplus16_e400_in1k_stride8.th", notes=("top-1 82.2",)),
        "vil1_base.in1k_e400": _cfg("vil_base16_e400_in1k.th", notes=("ImageNet-1K top-1 81.6",)),
        "vil1_base_stride8.in1k_e400": _cfg("vil_base16_e400_in1k_stride8.th", notes=("top-1 82.7",)),
    }
)

_V1 = {
    "conv_kind": "causal1d",
    "conv_kernel_size": 4,
    "proj_bias": False,
    "norm_bias": False,
    "global_pool": "bilateral_avg",
}

# Constructor kwargs of every registered variant (also used to name the model that fits a checkpoint).
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "vil_tiny": {"embed_dim": 192, "depth": 24},
    "vil_small": {"embed_dim": 384, "depth": 24},
    "vil_base": {"embed_dim": 768, "depth": 24},
    "vil_large": {"embed_dim": 1024, "depth": 48},
    "vil1_tiny": dict(embed_dim=192, depth=24, **_V1),
    "vil1_tinyplus": dict(embed_dim=192, depth=29, **_V1),
    "vil1_tinyplus_stride8": dict(embed_dim=192, depth=29, patch_stride=8, **_V1),
    "vil1_small": dict(embed_dim=384, depth=24, **_V1),
    "vil1_smallplus": dict(embed_dim=384, depth=26, **_V1),
    "vil1_smallplus_stride8": dict(embed_dim=384, depth=26, patch_stride=8, **_V1),
    "vil1_base": dict(embed_dim=768, depth=24, **_V1),
    "vil1_base_stride8": dict(embed_dim=768, depth=24, patch_stride=8, **_V1),
}


def _create_variant(name: str, pretrained: bool, kwargs: dict[str, Any]) -> VisionLSTM:
    return _create_vil(name, pretrained=pretrained, **dict(MODEL_ARGS[name], **kwargs))


@register_model
def vil_tiny(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-T (v2): D 192, 24 sub-blocks, 6.39 M parameters."""
    return _create_variant("vil_tiny", pretrained, kwargs)


@register_model
def vil_small(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-S (v2): D 384, 24 sub-blocks, 23.4 M parameters."""
    return _create_variant("vil_small", pretrained, kwargs)


@register_model
def vil_base(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-B (v2): D 768, 24 sub-blocks, 89.3 M parameters."""
    return _create_variant("vil_base", pretrained, kwargs)


@register_model
def vil_large(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-L (v2): D 1024, 48 sub-blocks; no published weights."""
    return _create_variant("vil_large", pretrained, kwargs)


@register_model
def vil1_tiny(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-T v1: D 192, 24 sub-blocks, 6.09 M parameters."""
    return _create_variant("vil1_tiny", pretrained, kwargs)


@register_model
def vil1_tinyplus(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-T+ v1: D 192, 29 sub-blocks."""
    return _create_variant("vil1_tinyplus", pretrained, kwargs)


@register_model
def vil1_tinyplus_stride8(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-T+ v1, long-sequence fine-tune: patch 16 with stride 8 (729 tokens at 224 px)."""
    return _create_variant("vil1_tinyplus_stride8", pretrained, kwargs)


@register_model
def vil1_small(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-S v1: D 384, 24 sub-blocks."""
    return _create_variant("vil1_small", pretrained, kwargs)


@register_model
def vil1_smallplus(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-S+ v1: D 384, 26 sub-blocks."""
    return _create_variant("vil1_smallplus", pretrained, kwargs)


@register_model
def vil1_smallplus_stride8(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-S+ v1, long-sequence fine-tune: patch 16 with stride 8."""
    return _create_variant("vil1_smallplus_stride8", pretrained, kwargs)


@register_model
def vil1_base(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-B v1: D 768, 24 sub-blocks."""
    return _create_variant("vil1_base", pretrained, kwargs)


@register_model
def vil1_base_stride8(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-B v1, long-sequence fine-tune: patch 16 with stride 8."""
    return _create_variant("vil1_base_stride8", pretrained, kwargs)
