"""BEiT/ViTDet-style simple feature pyramid: four stride-16 maps of a plain backbone -> strides 4, 8, 16, 32."""

import torch
from torch import nn

__all__ = ["MultiScaleNeck"]


class MultiScaleNeck(nn.Module):
    """Turn four same-stride (16) feature maps of width `dim` into a pyramid at strides 4, 8, 16 and 32.

    Level 0: ConvTranspose2d(2, 2) -> BatchNorm -> GELU -> ConvTranspose2d(2, 2) (x4 resolution);
    level 1: ConvTranspose2d(2, 2) (x2); level 2: identity; level 3: MaxPool2d(2) (x1/2, floor for odd sizes).
    Every level keeps the width `dim`.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"MultiScaleNeck: dim (feature width) must be >= 1, got {dim}")
        self.dim = dim
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)
        # the factor each level applies to the stride of its input (16 -> 4, 8, 16, 32)
        self.stride_factors = (0.25, 0.5, 1.0, 2.0)

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Four maps [B, dim, h, w] (same h, w) -> [B, dim, 4h, 4w], [B, dim, 2h, 2w], [B, dim, h, w],
        [B, dim, h // 2, w // 2]."""
        if len(features) != 4:
            raise ValueError(
                f"MultiScaleNeck expects 4 feature maps (one per pyramid level), got {len(features)}; "
                f"take 4 backbone outputs (out_indices of length 4)"
            )
        for i, feature in enumerate(features):
            if feature.ndim != 4 or feature.shape[1] != self.dim:
                raise ValueError(
                    f"MultiScaleNeck feature {i}: expected shape [B, {self.dim}, H, W], got {tuple(feature.shape)}; "
                    f"build the neck with the backbone's width (dim) and pass NCHW maps"
                )
            if feature.shape[2:] != features[0].shape[2:]:
                raise ValueError(
                    f"MultiScaleNeck: all feature maps must share one size, got {tuple(features[0].shape[2:])} "
                    f"(feature 0) and {tuple(feature.shape[2:])} (feature {i})"
                )
        return [self.up4(features[0]), self.up2(features[1]), self.same(features[2]), self.down2(features[3])]
