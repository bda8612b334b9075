"""Vision-LSTM (ViL) backbones for timm.

    import timm, vil
    model = timm.create_model("vil_base")   # importing vil registers vil_* and vil1_* in timm
"""

from . import models
from .models import VisionLSTM, checkpoint_filter_fn, load_checkpoint_file

__all__ = ["VisionLSTM", "checkpoint_filter_fn", "load_checkpoint_file", "models"]
__version__ = "0.1.0"
