"""Block-diagonal linear map: the q/k/v projections of the ViL layer."""

import math

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_DIAGONAL_IMPLS = ("einsum", "grouped_conv", "dense")
# How every BlockDiagonalLinear computes its map (see the class); module-wide, so a benchmark can switch all of them.
BLOCK_DIAGONAL_IMPL = "dense"
# "dense" multiplies by block-diagonal groups this wide (whole blocks): one plain matmul when dim fits in one group,
# as every published width does (ViL-L's 2048 included). One matmul beat groups of 512 at ViL-B's width 1536 on an
# H200: 248.5 against 286.9 ms of GPU time per fwd+bwd (bench/results/models_base_group{512,1536}_h200.md).
DENSE_GROUP_MAX = 2048


@torch.jit.ignore
def _chosen_impl() -> str:
    """Reads the module-level switch (TorchScript cannot read a str global, so scripted code never calls this)."""
    if BLOCK_DIAGONAL_IMPL not in BLOCK_DIAGONAL_IMPLS:
        raise ValueError(
            f"vil.layers.linear.BLOCK_DIAGONAL_IMPL must be one of {BLOCK_DIAGONAL_IMPLS}, got {BLOCK_DIAGONAL_IMPL!r}"
        )
    return BLOCK_DIAGONAL_IMPL


def block_diagonal_groups(weight: torch.Tensor, block_size: int, group: int) -> torch.Tensor:
    """[num_blocks, b, b] blocks (b = block_size) -> [num_blocks * b // group, group, group]: each run of group // b
    consecutive blocks as one dense block-diagonal matrix (zeros off the blocks). Differentiable: the gradient reaches
    the blocks alone, so training updates exactly the published parameters. Sizes come in as ints, not from
    weight.shape, so that torch.fx can trace it."""
    per_group = group // block_size
    eye = torch.eye(per_group, dtype=weight.dtype, device=weight.device)
    blocks = weight.view(-1, per_group, block_size, block_size)
    return torch.einsum("gaoi,ac->gaoci", blocks, eye).reshape(-1, group, group)


class BlockDiagonalLinear(nn.Module):
    """Independent `block_size` x `block_size` linear maps on consecutive chunks of the last dimension.

    With `num_blocks = dim // block_size`, `weight[h, o, i]` maps input `x[block_size * h + i]` to output
    `y[block_size * h + o]`. This is the authors' `LinearHeadwiseExpand` with expansion 1; the parameter shapes
    ([num_blocks, block_size, block_size] and [dim]) match their checkpoints.

    `BLOCK_DIAGONAL_IMPL` (module-wide, so a benchmark can switch every instance) chooses how forward computes it:
    - "einsum": batched block_size x block_size matmuls (the default until session 6; what TorchScript runs).
    - "grouped_conv": one grouped 1x1 convolution, 1 op each way instead of about 20 views, permutes and bmm's
      (bench/bench_models.py --qkv-impl). An eager ViL-T step runs 5x the ATen ops of a ViT-T step, and this map is
      40 % of them. Not the default: on an H100 one ViL-T training run took 4x the einsum step time with it (README,
      "Measured speed"; a single run, cause not measured).
    - "dense" (default): the blocks laid out as dense block-diagonal matrices of up to DENSE_GROUP_MAX columns
      (one matrix at every published width), multiplied as plain (batched) matmuls. It multiplies by zeros, but on
      tensor-core GEMMs with a useful inner dimension; the einsum's bmm has an inner dimension of block_size (4),
      runs on slow legacy kernels and was a third of ViL-T's GPU time, with permute copies beside it
      (bench/profile_model.py). On an H200, one fwd+bwd replayed from a CUDA graph (GPU time alone) took ViL-T
      122.0 -> 71.2 ms and ViL-B 366.3 -> 283.8 ms (bench/results/models_{einsum,dense}_graph_h200.md; ViL-B in
      groups of 512, 248.5 ms as one matrix). The gradient reaches the blocks alone.
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
        if not torch.jit.is_scripting():  # scripted models take the einsum
            impl = _chosen_impl()
            if impl == "grouped_conv":
                return self._grouped_conv(x)
            if impl == "dense":
                return self._dense(x)
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

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        group = self.dense_group()
        groups = block_diagonal_groups(self.weight, self.block_size, group)
        if group == self.dim:
            return F.linear(x, groups[0], self.bias)
        y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (self.dim // group, group)), groups).flatten(-2)
        return y if self.bias is None else y + self.bias

    def dense_group(self) -> int:
        """Width of the dense groups: the largest divisor of dim that is a multiple of block_size and at most
        DENSE_GROUP_MAX (at least one block)."""
        per_group = max(1, min(self.num_blocks, DENSE_GROUP_MAX // self.block_size))
        while self.num_blocks % per_group:
            per_group -= 1
        return per_group * self.block_size

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block_size={self.block_size}, bias={self.bias is not None}"
