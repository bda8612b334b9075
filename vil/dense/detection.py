"""ViL as a backbone of torchvision's detection models (Faster R-CNN, Mask R-CNN, or any model that takes a backbone
with `out_channels` returning an OrderedDict of feature maps).

    import vil
    from vil.dense.detection import ViLDetectionBackbone, vil_fasterrcnn, vil_maskrcnn

    model = vil_maskrcnn("vil_small", num_classes=91, pretrained_backbone=True,
                         backbone_kwargs={"pretrained_cfg_overlay": {"file": "vil2_small16_e400_in1k.th"}})
    losses = model(images, targets)          # training: dict of losses (torchvision's target format)
    model.eval(); detections = model(images) # list of {"boxes", "labels", "scores"(, "masks")}

The backbone taps 4 sub-blocks of the ViL (no final norm), turns the stride-16 maps into strides 4/8/16/32 with
`MultiScaleNeck`, projects every level to `out_channels` (ViTDet's simple feature pyramid: 1x1 conv + LN, 3x3 conv
+ LN) and adds a stride-64 "pool" level. The keys "0", "1", "2", "3", "pool" are those of torchvision's
BackboneWithFPN, so torchvision's default anchor generator and RoI poolers fit it unchanged.
"""

import math
from collections import OrderedDict
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from vil.models.vil import MODEL_ARGS

from .neck import MultiScaleNeck

__all__ = ["ViLDetectionBackbone", "vil_fasterrcnn", "vil_maskrcnn"]

POOL_LEVEL_NAME = "pool"


def _level_projection(in_channels: int, out_channels: int) -> nn.Sequential:
    """ViTDet's per-level output: 1x1 lateral conv + LN, 3x3 output conv + LN.

    Channel LayerNorm rather than BatchNorm because detection trains on a couple of images per GPU; the convs
    have no bias because a norm follows each.
    """
    return nn.Sequential(
        OrderedDict(
            lateral=nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            lateral_norm=LayerNorm2d(out_channels),
            output=nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            output_norm=LayerNorm2d(out_channels),
        )
    )


class ViLDetectionBackbone(nn.Module):
    """Vision-LSTM (via timm, any input size) -> MultiScaleNeck -> per-level projection (+ stride-64 pool level).

    forward(images [B, 3, H, W]) returns an OrderedDict {"0": stride 4, "1": stride 8, "2": stride 16,
    "3": stride 32, "pool": stride 64}, every map of width `out_channels`. H and W must be multiples of the patch
    size (16); torchvision's detection models pad their batches to a multiple of 32, which satisfies it.

    Args:
        model_name: a registered ViL model ("vil_tiny", "vil_small", "vil_base", "vil1_*" without stride 8).
        pretrained: load the ViL's ImageNet weights through timm (the model's registered file, or
            pretrained_cfg_overlay={"file": ...} in backbone_kwargs for a local .th/.pth/.safetensors file).
        out_indices: the 4 sub-blocks to tap; None: the model's default (7, 11, 15, 23 for 24 sub-blocks as in the
            segmentation recipe, evenly spaced for other depths).
        out_channels: width of every output map (256, what torchvision's detection heads are built for).
        drop_path_rate: stochastic depth of the ViL.
        extra_pool_level: add the stride-64 "pool" level (max-pool stride 2 of level "3"), as torchvision's FPN
            backbones do; their default anchor generator expects 5 levels.
        **backbone_kwargs: passed to timm.create_model (img_size, embed_dim, depth, pretrained_cfg_overlay, ...).
            img_size sets the stored position grid; other sizes resample it on every forward.
    """

    def __init__(
        self,
        model_name: str = "vil_tiny",
        pretrained: bool = False,
        out_indices: tuple[int, ...] | None = None,
        out_channels: int = 256,
        drop_path_rate: float = 0.0,
        extra_pool_level: bool = True,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        if out_indices is not None:
            out_indices = tuple(out_indices)
            self._check_out_indices(model_name, out_indices, backbone_kwargs)
            backbone_kwargs["out_indices"] = out_indices
        self.vil = timm.create_model(
            model_name,
            pretrained=pretrained,
            features_only=True,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            **backbone_kwargs,
        )
        self.out_indices = tuple(self.vil.out_indices)
        if len(self.out_indices) != 4:
            raise ValueError(
                f"{model_name} with {len(self.vil.model.blocks)} sub-blocks gives the taps {self.out_indices}, but the "
                f"pyramid needs 4 distinct sub-blocks; use a model with at least 4 sub-blocks"
            )
        patch_embed = self.vil.model.patch_embed
        patch, stride = tuple(patch_embed.patch_size), tuple(patch_embed.stride)
        # torchvision's MultiScaleRoIAlign infers each level's scale as a power of two from the map sizes, so every
        # level's stride (patch / 4 ... patch * 4) must be one: square, non-overlapping, power-of-two patches.
        if patch != stride or patch[0] != patch[1] or patch[0] < 4 or patch[0] & (patch[0] - 1):
            raise ValueError(
                f"{model_name}: patch size {patch} with stride {stride} does not give power-of-two pyramid strides; "
                f"the detection backbone needs square non-overlapping patches of a power-of-two size (use a stride-16 "
                f"model such as vil_tiny/vil_small/vil_base, not a *_stride8 one)"
            )
        self.patch_size = patch[0]
        self.embed_dim = self.vil.feature_info.channels()[0]
        self.out_channels = out_channels
        self.neck = MultiScaleNeck(self.embed_dim)
        self.projections = nn.ModuleList(_level_projection(self.embed_dim, out_channels) for _ in range(4))
        level_strides = [int(self.patch_size * factor) for factor in self.neck.stride_factors]
        if extra_pool_level:
            level_strides.append(2 * level_strides[-1])
        self.extra_pool_level = extra_pool_level
        names = [str(i) for i in range(4)] + ([POOL_LEVEL_NAME] if extra_pool_level else [])
        self.strides: dict[str, int] = dict(zip(names, level_strides, strict=True))

    @staticmethod
    def _check_out_indices(model_name: str, out_indices: tuple[int, ...], backbone_kwargs: dict[str, Any]) -> None:
        if len(out_indices) != 4:
            raise ValueError(
                f"out_indices must name 4 sub-blocks (one per pyramid level), got {len(out_indices)}: {out_indices}"
            )
        if not all(isinstance(i, int) and i >= 0 for i in out_indices) or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"out_indices must be 4 distinct non-negative ints in increasing order, got {out_indices}")
        depth = backbone_kwargs.get("depth", MODEL_ARGS.get(model_name, {}).get("depth"))
        if depth is not None and out_indices[-1] >= depth:
            raise ValueError(
                f"out_indices {out_indices} reach sub-block {out_indices[-1]} but {model_name} has depth={depth} "
                f"sub-blocks (valid indices 0..{depth - 1}); pass out_indices inside the depth"
            )

    @property
    def feature_names(self) -> list[str]:
        """Keys of forward's output, finest level first."""
        return list(self.strides)

    @property
    def roi_feature_names(self) -> list[str]:
        """The levels RoI pooling reads: all but the pool level, as in torchvision's FPN models."""
        return [name for name in self.strides if name != POOL_LEVEL_NAME]

    def _check_image_size(self, images: torch.Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"ViLDetectionBackbone expects images [B, C, H, W], got shape {tuple(images.shape)}")
        height, width = int(images.shape[2]), int(images.shape[3])
        if height % self.patch_size or width % self.patch_size:
            padded = [math.ceil(size / self.patch_size) * self.patch_size for size in (height, width)]
            raise ValueError(
                f"ViLDetectionBackbone: image size {height}x{width} is not a multiple of the patch size "
                f"{self.patch_size}; pad the images at the bottom/right to {padded[0]}x{padded[1]} (torchvision's "
                f"detection models do this themselves: their transform pads to size_divisible=32)"
            )

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """[B, 3, H, W] -> {name: [B, out_channels, H / stride, W / stride]} for the strides in `self.strides`."""
        self._check_image_size(images)
        taps = self.vil(images)  # 4 x [B, D, H / 16, W / 16]
        levels = [project(level) for project, level in zip(self.projections, self.neck(taps), strict=True)]
        if self.extra_pool_level:
            # torchvision's LastLevelMaxPool: a stride-2 subsampling of the coarsest level
            levels.append(F.max_pool2d(levels[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(self.feature_names, levels, strict=True))


def _backbone_and_default_heads(
    model_name: str,
    pretrained_backbone: bool,
    backbone_kwargs: dict[str, Any] | None,
    detector_kwargs: dict[str, Any],
) -> ViLDetectionBackbone:
    """Build the backbone; put the anchor generator and box RoI pooler that fit its levels into detector_kwargs
    unless the caller gave them."""
    backbone = ViLDetectionBackbone(model_name, pretrained=pretrained_backbone, **(backbone_kwargs or {}))
    # torchvision's FPN anchors: one size per level, 8x its stride (32 px at stride 4 ... 512 px at stride 64)
    anchor_sizes = tuple((8 * stride,) for stride in backbone.strides.values())
    detector_kwargs.setdefault(
        "rpn_anchor_generator", AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    )
    detector_kwargs.setdefault(
        "box_roi_pool", MultiScaleRoIAlign(backbone.roi_feature_names, output_size=7, sampling_ratio=2)
    )
    return backbone


def vil_fasterrcnn(
    model_name: str = "vil_tiny",
    num_classes: int | None = 91,
    pretrained_backbone: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """torchvision FasterRCNN on a ViLDetectionBackbone.

    num_classes counts the background (91 for COCO's category ids). backbone_kwargs go to ViLDetectionBackbone
    (out_channels, out_indices, drop_path_rate, pretrained_cfg_overlay, ...); everything else to FasterRCNN
    (min_size / max_size keep torchvision's 800 / 1333 unless given, rpn_* / box_* settings, a custom
    rpn_anchor_generator or box_roi_pool).
    """
    backbone = _backbone_and_default_heads(model_name, pretrained_backbone, backbone_kwargs, kwargs)
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


def vil_maskrcnn(
    model_name: str = "vil_tiny",
    num_classes: int | None = 91,
    pretrained_backbone: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """torchvision MaskRCNN on a ViLDetectionBackbone; arguments as vil_fasterrcnn (plus MaskRCNN's mask_*)."""
    backbone = _backbone_and_default_heads(model_name, pretrained_backbone, backbone_kwargs, kwargs)
    kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(backbone.roi_feature_names, output_size=14, sampling_ratio=2))
    return MaskRCNN(backbone, num_classes=num_classes, **kwargs)
