"""Block-diagonal linear map: the q/k/v projections of the ViL layer."""

import math

import torch
from torch import nn


class BlockDiagonalLinear(nn.Module):
    """Independent `block_size` x `block_size` linear maps on consecutive chunks of the last dimension.

    With `num_blocks = dim // block_size`, `weight[h, o, i]` maps input `x[block_size * h + i]` to output
    `y[block_size * h + o]`. This is the authors' `LinearHeadwiseExpand` with expansion 1; the parameter shapes
    ([num_blocks, block_size, block_size] and [dim]) match their checkpoints.
    """

    def __init__(
        self,
        dim: int,
        block_size: int = 4,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % block_size != 0:
            raise ValueError(f"BlockDiagonalLinear: dim={dim} must be divisible by block_size={block_size}")
        self.dim = dim
        self.block_size = block_size
        self.num_blocks = dim // block_size
        self.weight = nn.Parameter(torch.empty(self.num_blocks, block_size, block_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Normal init with `std` (default: the small-init std of the block width); bias 0."""
        nn.init.normal_(self.weight, mean=0.0, std=math.sqrt(2 / (5 * self.block_size)) if std is None else std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("...hi,hoi->...ho", x.unflatten(-1, (self.num_blocks, self.block_size)), self.weight)
        y = y.flatten(-2)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block_size={self.block_size}, bias={self.bias is not None}"
