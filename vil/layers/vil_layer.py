"""The ViL layer: gated mLSTM mixer over a token grid (vil-architecture.md, "Model", item 5).

Tensors flow channels-last on the token grid, [B, H, W, C], so the convolution always sees the actual grid of the
input (any resolution at run time); the mLSTM sees the row-major sequence S = H * W of that grid.
"""

import math

import torch
import torch.fx
import torch.nn.functional as F
from tfla import mlstm
from timm.layers import register_notrace_function
from torch import nn

from .linear import BlockDiagonalLinear
from .norm import MultiHeadLayerNorm


@register_notrace_function
@torch.jit.ignore
def mlstm_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """tfla's mLSTM (exponential input gate), kept opaque to TorchScript and torch.fx: the kernel dispatch is
    Python. q, k: [B, NH, S, DQK]; v: [B, NH, S, DHV]; i, f: [B, NH, S] pre-activations -> h [B, NH, S, DHV]."""
    return mlstm(q, k, v, i, f, gate="exp", backend=backend, chunk_size=chunk_size)


torch.fx.wrap("mlstm_op")


class GridConv2d(nn.Conv2d):
    """Depthwise 2D convolution (v2) on a channels-last token grid [B, H, W, C] -> [B, H, W, C]."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"GridConv2d keeps the grid size and needs an odd kernel_size, got {kernel_size}")
        super().__init__(
            dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(
            x.permute(0, 3, 1, 2), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return y.permute(0, 2, 3, 1)


class CausalConv1d(nn.Conv1d):
    """Causal depthwise 1D convolution (v1) along the row-major sequence of a token grid [B, H, W, C]: the output
    at token t sees tokens t - kernel_size + 1 .. t of the (possibly flipped) sequence."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 4,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, dim, kernel_size, padding=0, groups=dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.flatten(1, 2).transpose(1, 2)  # [B, C, S]
        seq = F.pad(seq, (self.kernel_size[0] - 1, 0))
        y = F.conv1d(seq, self.weight, self.bias, 1, 0, 1, self.groups)
        return y.transpose(1, 2).reshape(x.shape)


class MatrixLSTM(nn.Module):
    """Multi-head mLSTM cell: gate pre-activations from cat(q, k, v), tfla's mLSTM, per-head LayerNorm."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        norm_bias: bool = True,
        norm_eps: float = 1e-5,
        backend: str = "auto",
        chunk_size: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"MatrixLSTM: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.chunk_size = chunk_size
        self.igate = nn.Linear(3 * dim, num_heads, device=device, dtype=dtype)
        self.fgate = nn.Linear(3 * dim, num_heads, device=device, dtype=dtype)
        self.norm = MultiHeadLayerNorm(dim, num_heads, eps=norm_eps, bias=norm_bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Forget gates start open (sigmoid(3..6) ~ 0.95..0.998), spread over the heads; input gates near exp(0).
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        self.norm.reset_parameters()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, W, E] -> [B, S, E] (S = H * W, row-major)."""
        # One matmul for both gates: [B, H, W, 3E] -> [B, 2 * NH, S].
        gate_weight = torch.cat([self.igate.weight, self.fgate.weight], dim=0)
        gate_bias = torch.cat([self.igate.bias, self.fgate.bias], dim=0)
        gates = F.linear(torch.cat([q, k, v], dim=-1), gate_weight, gate_bias).flatten(1, 2).transpose(1, 2)
        i, f = gates.chunk(2, dim=1)  # [B, NH, S] each
        h = mlstm_op(
            self._split_heads(q), self._split_heads(k), self._split_heads(v), i, f, self.backend, self.chunk_size
        )  # [B, NH, S, DH]
        return self.norm(h)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, E] -> [B, NH, S, DH]."""
        return x.flatten(1, 2).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


class ViLLayer(nn.Module):
    """x [B, H, W, D] -> [B, H, W, D].

    proj_up to (x_m, z), each of width E = expansion * D; x_c = SiLU(conv(x_m)); q, k from x_c and v from x_m
    through block-diagonal maps; h = mLSTM(q, k, v) with per-head norm; out = proj_down((h + skip * x_c) * SiLU(z)).
    With reverse=True the layer reads the grid from the bottom-right corner: it flips the row-major sequence
    (both grid axes) on the way in and flips the result back, so its output is in image order.
    """

    def __init__(
        self,
        dim: int,
        reverse: bool = False,
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
        dd = {"device": device, "dtype": dtype}
        inner_dim = expansion * dim
        self.dim = dim
        self.inner_dim = inner_dim
        self.reverse = reverse
        self.proj_down_std = 2 / math.sqrt(dim) if proj_down_std is None else proj_down_std
        self.proj_up = nn.Linear(dim, 2 * inner_dim, bias=proj_bias, **dd)
        if conv_kind == "2d":
            self.conv = GridConv2d(inner_dim, conv_kernel_size, **dd)
        elif conv_kind == "causal1d":
            self.conv = CausalConv1d(inner_dim, conv_kernel_size, **dd)
        else:
            raise ValueError(f"conv_kind must be '2d' (ViL v2) or 'causal1d' (ViL v1), got {conv_kind!r}")
        self.q_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, bias=proj_bias, **dd)
        self.k_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, bias=proj_bias, **dd)
        self.v_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, bias=proj_bias, **dd)
        self.mlstm = MatrixLSTM(
            inner_dim, num_heads, norm_bias, norm_eps, backend=mlstm_backend, chunk_size=mlstm_chunk_size, **dd
        )
        self.learnable_skip = nn.Parameter(torch.ones(inner_dim, **dd))
        self.proj_down = nn.Linear(inner_dim, dim, bias=proj_bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # "Small init" with the model width D (not E) for every map that reads the block input, as published.
        small_std = math.sqrt(2 / (5 * self.dim))
        nn.init.normal_(self.proj_up.weight, std=small_std)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.reset_parameters(std=small_std)
        nn.init.normal_(self.proj_down.weight, std=self.proj_down_std)
        for linear in (self.proj_up, self.proj_down):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.ones_(self.learnable_skip)
        self.mlstm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reverse:
            x = x.flip([1, 2])
        x_m, z = self.proj_up(x).chunk(2, dim=-1)  # [B, H, W, E] each
        x_c = F.silu(self.conv(x_m))
        h = self.mlstm(self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m))  # [B, S, E]
        h = (h.reshape(x_c.shape) + self.learnable_skip * x_c) * F.silu(z)
        x = self.proj_down(h)
        if self.reverse:
            x = x.flip([1, 2])
        return x
