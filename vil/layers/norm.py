"""Norms of the ViL layer.

Weight convention: every norm here stores a standard scale (effective scale = weight, initialised to 1). The
authors' checkpoints store three of their norms as offsets (effective scale = 1 + weight, initialised to 0);
`vil.models.vil.checkpoint_filter_fn` adds 1 to those when it converts a checkpoint, so a converted model
computes exactly what the authors' model computes.
"""

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadLayerNorm(nn.Module):
    """Per-head LayerNorm of the mLSTM output: each head's DH features are normalised on their own, then a
    per-channel affine over all NH * DH channels is applied (a GroupNorm with NH groups, applied per token)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        eps: float = 1e-5,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"MultiHeadLayerNorm: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, NH, S, DH] -> [B, S, NH * DH]."""
        # Normalised as [B, S, NH, DH]: the Triton mLSTM writes h token-major (a [B, NH, S, DH] view of that), so the
        # transpose is free, layer_norm reads it in place and the flatten to [B, S, E] is a view, and so are their
        # gradients. A contiguous h (the PyTorch backends) is copied once, as the transpose after the norm did.
        h = F.layer_norm(h.transpose(1, 2), (self.head_dim,), eps=self.eps)
        h = h.flatten(2)  # [B, S, E]
        h = h * self.weight
        if self.bias is not None:
            h = h + self.bias
        return h

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, eps={self.eps}, bias={self.bias is not None}"
