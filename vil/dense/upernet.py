"""ViL + multi-scale neck + UperNet (+ auxiliary FCN head) for semantic segmentation, with sliding-window inference.

import vil
from vil.dense import ViLUperNet, reduce_ade20k_labels

model = ViLUperNet("vil_tiny", num_classes=150, img_size=512)       # channels 192 (T), 384 (S/B)
logits, aux_logits = model(images)                                   # training mode: both, at the input size
loss = model.loss(logits, aux_logits, reduce_ade20k_labels(raw_labels))
model.eval()
logits = model.slide_inference(images, window=512, stride=341)       # [B, 150, H, W]
"""

import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vil.models.vil import MODEL_ARGS

from .heads import FCNAuxHead, UperNetHead
from .neck import MultiScaleNeck

__all__ = ["ViLUperNet", "reduce_ade20k_labels", "segmentation_cross_entropy"]

ADE20K_OUT_INDICES = (7, 11, 15, 23)


def reduce_ade20k_labels(labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """ADE20K annotations -> training targets: raw label 0 ("other"/unlabelled) becomes `ignore_index` (255),
    the 150 classes 1..150 become 0..149 (mmseg's reduce_zero_label). Returns int64."""
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"reduce_ade20k_labels expects integer label maps, got dtype {labels.dtype}")
    labels = labels.long()
    return torch.where(labels == 0, torch.full_like(labels, ignore_index), labels - 1)


def segmentation_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over the pixels whose target is not `ignore_index`.

    logits [B, K, H, W], target [B, H, W] integer in [0, K) or == ignore_index. A batch with no labelled pixel
    gives 0 (with a graph), not NaN.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, K, H, W], got shape {tuple(logits.shape)}")
    if target.ndim != 3 or target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(
            f"target must be [B, H, W] matching logits {tuple(logits.shape)} (B, K, H, W), got shape "
            f"{tuple(target.shape)}; resize the logits to the label size (ViLUperNet.forward already returns the "
            f"input size)"
        )
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    target = target.long()
    num_classes = logits.shape[1]
    labelled = target != ignore_index
    bad = labelled & ((target < 0) | (target >= num_classes))
    if bad.any():
        values = torch.unique(target[bad])[:8].tolist()
        raise ValueError(
            f"target holds labels {values} outside [0, {num_classes}) that are not ignore_index={ignore_index}; "
            f"for raw ADE20K annotations (0 = unlabelled, classes 1..150) apply reduce_ade20k_labels first"
        )
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / labelled.sum().clamp(min=1)


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of windows of `window` pixels, `stride` apart, covering [0, size) (size >= window); the last
    window is shifted back to end at `size`."""
    count = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(count)]


class ViLUperNet(nn.Module):
    """Vision-LSTM backbone (via timm) -> MultiScaleNeck -> UperNetHead, plus FCNAuxHead on pyramid level 2.

    forward(images) returns logits [B, num_classes, H, W] at the input size in eval mode, and
    (logits, aux_logits), both at the input size, in training mode. Images whose sides are not a multiple of the
    patch stride are zero-padded at the bottom/right for the backbone and the logits cropped back.

    Args:
        name: a registered ViL model ("vil_tiny", "vil_small", "vil_base", "vil1_*").
        num_classes: 150 for ADE20K.
        img_size: nominal backbone size (sets its position-embedding grid; other sizes are resampled at run time).
        out_indices: the 4 sub-blocks whose outputs feed the pyramid (paper: 7, 11, 15, 23 of 24).
        channels: UperNet width; None: min(D, 384), i.e. 192 for ViL-T and 384 for ViL-S/B as in the recipe.
        aux_channels: width of the auxiliary FCN head (256, the usual UperNet-on-ViT value; the spec does not fix it).
        aux_loss_weight: weight of the auxiliary loss in `loss` (0.4).
        dropout: Dropout2d before both classifiers.
        pool_scales: pyramid pooling scales.
        drop_path_rate: backbone stochastic depth (recipe: T/S/B 0 / 0.05 / 0.1).
        pretrained: load the backbone's ImageNet weights through timm.
        **backbone_kwargs: passed to timm.create_model (embed_dim, depth, pretrained_cfg_overlay, ...).
    """

    def __init__(
        self,
        name: str = "vil_tiny",
        num_classes: int = 150,
        img_size: int | tuple[int, int] = 512,
        out_indices: tuple[int, ...] = ADE20K_OUT_INDICES,
        channels: int | None = None,
        aux_channels: int = 256,
        aux_loss_weight: float = 0.4,
        dropout: float = 0.1,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        drop_path_rate: float = 0.0,
        pretrained: bool = False,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        out_indices = tuple(out_indices)
        if len(out_indices) != 4:
            raise ValueError(
                f"out_indices must name 4 sub-blocks (one per pyramid level), got {len(out_indices)}: {out_indices}"
            )
        if not all(isinstance(i, int) and i >= 0 for i in out_indices) or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"out_indices must be 4 distinct non-negative ints in increasing order, got {out_indices}")
        depth = backbone_kwargs.get("depth", MODEL_ARGS.get(name, {}).get("depth"))
        if depth is not None and out_indices[-1] >= depth:
            raise ValueError(
                f"out_indices {out_indices} reach sub-block {out_indices[-1]} but {name} has depth={depth} "
                f"sub-blocks (valid indices 0..{depth - 1}); pass out_indices inside the depth"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be >= 1 (or None for the recipe's default), got {channels}")
        self.backbone = timm.create_model(
            name,
            pretrained=pretrained,
            features_only=True,
            out_indices=out_indices,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            **backbone_kwargs,
        )
        widths = self.backbone.feature_info.channels()
        strides = self.backbone.feature_info.reduction()
        if len(set(widths)) != 1 or len(set(strides)) != 1:
            raise ValueError(f"{name}: the neck needs 4 maps of one width and stride, got {widths} / {strides}")
        dim = widths[0]
        self.out_indices = out_indices
        self.num_classes = num_classes
        self.embed_dim = dim
        self.channels = min(dim, 384) if channels is None else channels
        patch_embed = self.backbone.model.patch_embed
        self.patch_size = tuple(patch_embed.patch_size)
        self.patch_stride = tuple(patch_embed.stride)
        self.neck = MultiScaleNeck(dim)
        self.decode_head = UperNetHead([dim] * 4, self.channels, num_classes, pool_scales, dropout)
        self.aux_head = FCNAuxHead(
            dim, aux_channels, num_classes, dropout=dropout, in_index=2, loss_weight=aux_loss_weight
        )

    def _padded_size(self, size: int, axis: int) -> int:
        patch, stride = self.patch_size[axis], self.patch_stride[axis]
        if size <= patch:
            return patch
        return patch + math.ceil((size - patch) / stride) * stride

    def _predict(self, images: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (and aux logits) at the size of `images`."""
        if images.ndim != 4:
            hint = " (a single image? add the batch dimension with images.unsqueeze(0))" if images.ndim == 3 else ""
            raise ValueError(f"ViLUperNet expects images [B, C, H, W], got shape {tuple(images.shape)}{hint}")
        height, width = images.shape[2:]
        padded = (self._padded_size(height, 0), self._padded_size(width, 1))
        x = F.pad(images, (0, padded[1] - width, 0, padded[0] - height))
        pyramid = self.neck(self.backbone(x))  # strides 4, 8, 16, 32
        logits = F.interpolate(self.decode_head(pyramid), size=padded, mode="bilinear", align_corners=False)
        logits = logits[:, :, :height, :width]
        if not with_aux:
            return logits, None
        aux = F.interpolate(self.aux_head(pyramid), size=padded, mode="bilinear", align_corners=False)
        return logits, aux[:, :, :height, :width]

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> logits [B, K, H, W] (eval) or (logits, aux_logits) (training)."""
        logits, aux = self._predict(images, with_aux=self.training)
        return (logits, aux) if aux is not None else logits

    def slide_inference(
        self,
        images: torch.Tensor,
        window: int | tuple[int, int] = 512,
        stride: int | tuple[int, int] = 341,
    ) -> torch.Tensor:
        """Logits [B, K, H, W] averaged over overlapping `window`-sized crops `stride` apart (ADE20K: 512 / 341).

        The last crop of a row or column is shifted back to end at the image border, so every pixel is covered.
        Images smaller than the window are zero-padded at the bottom/right to the window (zero is the mean after
        ImageNet normalisation) and the logits cropped back. Call in eval mode, under torch.no_grad() to save memory.
        """
        window_hw = _pair(window, "window")
        stride_hw = _pair(stride, "stride")
        if stride_hw[0] > window_hw[0] or stride_hw[1] > window_hw[1]:
            raise ValueError(f"stride {stride_hw} larger than window {window_hw} would leave pixels uncovered")
        if images.ndim != 4:
            raise ValueError(f"slide_inference expects images [B, C, H, W], got shape {tuple(images.shape)}")
        batch, _, height, width = images.shape
        padded_h, padded_w = max(height, window_hw[0]), max(width, window_hw[1])
        x = F.pad(images, (0, padded_w - width, 0, padded_h - height))
        summed = images.new_zeros(batch, self.num_classes, padded_h, padded_w)
        count = images.new_zeros(1, 1, padded_h, padded_w)
        for top in _window_starts(padded_h, window_hw[0], stride_hw[0]):
            for left in _window_starts(padded_w, window_hw[1], stride_hw[1]):
                rows, cols = slice(top, top + window_hw[0]), slice(left, left + window_hw[1])
                crop_logits, _ = self._predict(x[:, :, rows, cols], with_aux=False)
                summed[:, :, rows, cols] += crop_logits
                count[:, :, rows, cols] += 1
        return (summed / count)[:, :, :height, :width]

    def loss(
        self,
        logits: torch.Tensor,
        aux_logits: torch.Tensor | None,
        target: torch.Tensor,
        ignore_index: int = 255,
    ) -> torch.Tensor:
        """Cross-entropy of the main logits + aux_head.loss_weight (0.4) x that of the aux logits (if given).

        target [B, H, W]: class indices, `ignore_index` where unlabelled. For ADE20K pass
        reduce_ade20k_labels(raw) (raw 0 -> 255, 1..150 -> 0..149).
        """
        total = segmentation_cross_entropy(logits, target, ignore_index)
        if aux_logits is not None:
            total = total + self.aux_head.loss_weight * segmentation_cross_entropy(aux_logits, target, ignore_index)
        return total
