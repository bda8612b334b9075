"""Segmentation heads: UperNet (pyramid pooling + FPN) and the auxiliary FCN head."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "FCNAuxHead", "PyramidPooling", "UperNetHead"]


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias, "same" padding) -> BatchNorm2d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    # small logits at init, so the first losses are close to log(num_classes)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class PyramidPooling(nn.Module):
    """PSPNet pooling: average-pool to each scale, 1x1 ConvBNReLU, upsample back, concat with the input,
    3x3 ConvBNReLU to `channels`."""

    def __init__(self, in_channels: int, channels: int, scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels, channels, 1)) for scale in scales]
        )
        self.bottleneck = ConvBNReLU(in_channels + len(scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, h, w] -> [B, channels, h, w]."""
        pooled = [_resize(stage(x), x.shape[2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """UperNet decode head on a 4-level pyramid (strides 4, 8, 16, 32 from the neck).

    Pyramid pooling on the last level; 1x1 lateral convs on the others; top-down path (upsample and add);
    3x3 FPN convs; all levels upsampled to level 0, concatenated, fused by a 3x3 conv; dropout; 1x1 classifier.
    Returns logits [B, num_classes, H0, W0] at the resolution of level 0 (stride 4).

    Args:
        in_channels: widths of the 4 levels.
        channels: width inside the head (192 for ViL-T, 384 for ViL-S/B in the ADE20K recipe).
        num_classes: 150 for ADE20K.
        pool_scales: pyramid pooling output sizes.
        dropout: Dropout2d before the classifier.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...] | list[int],
        channels: int,
        num_classes: int = 150,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        in_channels = tuple(in_channels)
        if len(in_channels) != 4:
            raise ValueError(f"UperNetHead expects 4 input levels, got in_channels={in_channels}")
        if channels < 1 or num_classes < 1:
            raise ValueError(f"UperNetHead: channels and num_classes must be >= 1, got {channels}, {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UperNetHead: dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.psp = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = _classifier(channels, num_classes)

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f"UperNetHead expects {len(self.in_channels)} feature maps, got {len(features)}")
        for i, (feature, width) in enumerate(zip(features, self.in_channels)):
            if feature.ndim != 4 or feature.shape[1] != width:
                raise ValueError(
                    f"UperNetHead level {i}: expected shape [B, {width}, H, W], got {tuple(feature.shape)}"
                )
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features[:-1])]
        laterals.append(self.psp(features[-1]))
        # top-down: each level receives the upsampled coarser one
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        fused = self.fuse(torch.cat([outs[0], *[_resize(x, size) for x in outs[1:]]], dim=1))  # [B, C, H0, W0]
        return self.classifier(self.dropout(fused))


class FCNAuxHead(nn.Module):
    """Auxiliary FCN head on one pyramid level: 3x3 ConvBNReLU -> dropout -> 1x1 classifier.

    `loss_weight` (0.4 in the ADE20K recipe) is not applied here: it is read by whoever sums the losses
    (`ViLUperNet.loss`). `in_index` says which pyramid level the head reads (2, the stride-16 level).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        num_classes: int = 150,
        dropout: float = 0.1,
        in_index: int = 2,
        loss_weight: float = 0.4,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FCNAuxHead: dropout must be in [0, 1), got {dropout}")
        self.in_index = in_index
        self.loss_weight = loss_weight
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = _classifier(channels, num_classes)

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Pyramid (list of maps) -> logits [B, num_classes, h, w] at the size of level `in_index`."""
        if not -len(features) <= self.in_index < len(features):
            raise ValueError(f"FCNAuxHead reads level {self.in_index} but got only {len(features)} feature maps")
        return self.classifier(self.dropout(self.conv(features[self.in_index])))
