"""ViL model families, registered in timm on import."""

from .vil import (
    MODEL_ARGS,
    ViLBlock,
    VisionLSTM,
    checkpoint_filter_fn,
    convert_authors_state_dict,
    load_checkpoint_file,
)

__all__ = [
    "MODEL_ARGS",
    "ViLBlock",
    "VisionLSTM",
    "checkpoint_filter_fn",
    "convert_authors_state_dict",
    "load_checkpoint_file",
]
