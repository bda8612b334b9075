"""tfla: Tiled Flash Linear Attention kernels for the mLSTM, with a pure-PyTorch reference beside them.

    from tfla import mlstm
    h = mlstm(q, k, v, i, f, gate="exp")            # [B, NH, S, DHV]
    h, state = mlstm(..., return_state=True)         # state = (C, n, m), fp32
"""

from .op import BACKENDS, GATES, mlstm
from .reference import MLSTMState, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent

__all__ = ["mlstm", "MLSTMState", "mlstm_parallel", "mlstm_chunkwise", "mlstm_recurrent", "BACKENDS", "GATES"]
