"""Triton TFLA kernels for the mLSTM: forward and backward, both gates, any S, head dims 16..512.

Importing this subpackage needs triton; tfla.op falls back to the PyTorch reference when it is missing.
"""

from __future__ import annotations

import torch

from .function import default_chunk_size, mlstm_triton

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 512
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels take these inputs: float16/bfloat16/float32 and head dims in [16, 512]."""
    dims_ok = all(MIN_HEAD_DIM <= d <= MAX_HEAD_DIM for d in (q.shape[-1], v.shape[-1]))
    return dims_ok and q.dtype in DTYPES and v.dtype in DTYPES


__all__ = ["mlstm_triton", "supports", "default_chunk_size", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]
