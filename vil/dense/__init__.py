"""Dense prediction with ViL backbones: semantic segmentation (ADE20K recipe of the spec) and detection.

What exists:
- `MultiScaleNeck`: BEiT/ViTDet-style pyramid from four stride-16 maps to strides 4/8/16/32.
- `UperNetHead` (pyramid pooling 1/2/3/6 + FPN + fuse) and `FCNAuxHead` (auxiliary head, `loss_weight` 0.4).
- `ViLUperNet`: timm ViL backbone (features of sub-blocks 7/11/15/23) + neck + heads; `forward`,
  `slide_inference` (window 512, stride 341) and `loss`; `reduce_ade20k_labels` (raw 0 -> ignore 255, k -> k - 1).
- `SegmentationMeter`: confusion-matrix mIoU / per-class IoU / aAcc / mAcc, summed over DDP ranks by `all_reduce`.
- `ViLDetectionBackbone`, `vil_fasterrcnn`, `vil_maskrcnn` (detection.py): ViL as the backbone of torchvision's
  detection models (levels "0".."3" + "pool" at strides 4..64, any input size that is a multiple of 16).

The ADE20K data pipeline is in `vil.data.ade20k` (dataset) and `vil.data.seg_transforms` (resize 0.5-2x of
(2048, 512), 512 crops, flip, colour jitter); the training loop's pieces (recipe schema, layer-decay optimiser,
multi-scale + flip testing) in `vil.training.segmentation`, the entry points in train/train_seg.py and
train/evaluate_seg.py.
"""

from .heads import ConvBNReLU, FCNAuxHead, PyramidPooling, UperNetHead
from .metrics import SegmentationMeter
from .neck import MultiScaleNeck
from .upernet import ViLUperNet, reduce_ade20k_labels, segmentation_cross_entropy
from .detection import ViLDetectionBackbone, vil_fasterrcnn, vil_maskrcnn

__all__ = [
    "ConvBNReLU",
    "FCNAuxHead",
    "MultiScaleNeck",
    "PyramidPooling",
    "SegmentationMeter",
    "UperNetHead",
    "ViLDetectionBackbone",
    "ViLUperNet",
    "reduce_ade20k_labels",
    "segmentation_cross_entropy",
    "vil_fasterrcnn",
    "vil_maskrcnn",
]
