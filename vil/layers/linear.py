"""Block-diagonal linear map: the q/k/v projections of the ViL layer."""

import math

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_DIAGONAL_IMPLS = ("einsum", "grouped_conv")
# How every BlockDiagonalLinear computes its map (see the class); module-wide, so a benchmark can switch all of them.
BLOCK_DIAGONAL_IMPL = "einsum"


@torch.jit.ignore
def _grouped_conv_chosen() -> bool:
    """Reads the module-level switch (TorchScript cannot read a str global, so scripted code never calls this)."""
    if BLOCK_DIAGONAL_IMPL not in BLOCK_DIAGONAL_IMPLS:
        raise ValueError(
            f"vil.layers.linear.BLOCK_DIAGONAL_IMPL must be one of {BLOCK_DIAGONAL_IMPLS}, got {BLOCK_DIAGONAL_IMPL!r}"
        )
    return BLOCK_DIAGONAL_IMPL == "grouped_conv"


class BlockDiagonalLinear(nn.Module):
    """Independent `block_size` x `block_size` linear maps on consecutive chunks of the last dimension.

    With `num_blocks = dim // block_size`, `weight[h, o, i]` maps input `x[block_size * h + i]` to output
    `y[block_size * h + o]`. This is the authors' `LinearHeadwiseExpand` with expansion 1; the parameter shapes
    ([num_blocks, block_size, block_size] and [dim]) match their checkpoints.

    `BLOCK_DIAGONAL_IMPL` (module-wide, so a benchmark can switch every instance) chooses how forward computes it:
    - "einsum": batched block_size x block_size matmuls. Measured in bench/results/models_h100.md.
    - "grouped_conv": one grouped 1x1 convolution, 1 op each way instead of about 20 views, permutes and bmm's
      (bench/bench_models.py --qkv-impl). An eager ViL-T step runs 5x the ATen ops of a ViT-T step, and this map is
      40 % of them. Not the default: on an H100 one ViL-T training run took 4x the einsum step time with it (README,
      "Measured speed"; a single run, cause not measured).
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
        if not torch.jit.is_scripting() and _grouped_conv_chosen():  # scripted models take the einsum
            return self._grouped_conv(x)
        y = torch.einsum("...hi,hoi->...ho", x.unflatten(-1, (self.num_blocks, self.block_size)), self.weight)
        y = y.flatten(-2)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _grouped_conv(self, x: torch.Tensor) -> torch.Tensor:
        # Each token is one sample of a length-1 sequence with `dim` channels, in `num_blocks` groups.
        y = F.conv1d(x.reshape(-1, self.dim, 1), self.weight.view(self.dim, self.block_size, 1), self.bias,
                     groups=self.num_blocks)
        return y.view(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block_size={self.block_size}, bias={self.bias is not None}"
