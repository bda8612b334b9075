"""Building blocks of Vision-LSTM: the ViL layer, its block-diagonal projection, norms, patch and position embedding."""

from .embed import PatchEmbed, check_image, resample_pos_embed
from .linear import BlockDiagonalLinear
from .norm import MultiHeadLayerNorm
from .vil_layer import CausalConv1d, GridConv2d, MatrixLSTM, ViLLayer, mlstm_op

__all__ = [
    "BlockDiagonalLinear",
    "CausalConv1d",
    "GridConv2d",
    "MatrixLSTM",
    "MultiHeadLayerNorm",
    "PatchEmbed",
    "ViLLayer",
    "check_image",
    "mlstm_op",
    "resample_pos_embed",
]
