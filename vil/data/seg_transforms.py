"""Joint image/label transforms for semantic segmentation (the ADE20K recipe of the spec, mmseg-style).

Training: random keep-ratio resize to 0.5-2x of (2048, 512) -> random 512x512 crop (``cat_max_ratio`` 0.75) ->
horizontal flip (p 0.5) -> photometric distortion (image only) -> ImageNet normalisation -> pad to the crop size
(image 0, label 255). Evaluation: keep-ratio resize to (2048, 512) -> normalisation; the label is left at its
original size, since mIoU is computed on the original annotation (resize the logits to the label's size).

Every random choice is drawn from the ``generator`` argument (``None`` = torch's global RNG), so a seeded
``torch.Generator`` reproduces the same sample. Images travel as float32 [3, H, W] in 0..255 until normalised;
labels as int64 [H, W]. Images are resized bilinearly, labels with nearest neighbour.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SegEvalTransform",
    "SegTrainTransform",
    "hflip",
    "keep_ratio_size",
    "normalize",
    "pad_to",
    "photometric_distortion",
    "random_crop",
    "random_hflip",
    "random_resize",
    "resize",
    "to_tensors",
]

# ImageNet mean/std on the 0..255 scale.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high_exclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(high_exclusive, (), generator=generator).item())


def _coin(prob: float, generator: torch.Generator | None) -> bool:
    return torch.rand((), generator=generator).item() < prob


def to_tensors(image: Image.Image | torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL RGB image (or uint8/float tensor [3, H, W]) + label [H, W] -> (float32 [3, H, W] 0..255, int64 [H, W])."""
    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, copy=True)).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be RGB [3, H, W], got shape {tuple(image.shape)}")
    if label.ndim != 2 or tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(f"label must be [H, W] matching the image {tuple(image.shape[1:])}, got {tuple(label.shape)}")
    if label.is_floating_point():
        raise ValueError(f"label must hold integer class indices, got dtype {label.dtype}")
    return image.float(), label.long()


def keep_ratio_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long edge <= max(scale) and short edge <= min(scale)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    """Bilinear image [3, H, W] and nearest label [H, W] to ``size`` (h, w); label may be None."""
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if label is not None:
        # Labels <= 255 are exact in float32.
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def random_resize(
    image: torch.Tensor,
    label: torch.Tensor,
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-ratio resize to ``scale`` times a ratio drawn uniformly from ``ratio_range``."""
    ratio = _uniform(ratio_range[0], ratio_range[1], generator)
    target = (scale[0] * ratio, scale[1] * ratio)
    return resize(image, label, keep_ratio_size(image.shape[-2], image.shape[-1], target))


def random_crop(
    image: torch.Tensor,
    label: torch.Tensor,
    crop_size: tuple[int, int] = (512, 512),
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
    max_tries: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop of at most ``crop_size`` (h, w); smaller inputs keep their size along that axis (pad later).

    With ``cat_max_ratio < 1``, a crop is accepted if it has at least two labelled classes and no class covering
    ``cat_max_ratio`` or more of its labelled (non-``ignore_index``) pixels; after ``max_tries`` rejections, the
    crop drawn next is used unchecked (mmseg's rule).
    """
    height, width = label.shape
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)

    def draw() -> tuple[int, int]:
        return _randint(height - crop_h + 1, generator), _randint(width - crop_w + 1, generator)

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(max_tries):
            window = label[top : top + crop_h, left : left + crop_w]
            counts = torch.bincount(window[window != ignore_index].flatten())
            counts = counts[counts > 0]
            if counts.numel() > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
                break
            top, left = draw()
    return (
        image[:, top : top + crop_h, left : left + crop_w],
        label[top : top + crop_h, left : left + crop_w],
    )


def hflip(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return image.flip(-1), label.flip(-1)


def random_hflip(
    image: torch.Tensor, label: torch.Tensor, prob: float = 0.5, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return hflip(image, label) if _coin(prob, generator) else (image, label)


def photometric_distortion(
    image: torch.Tensor,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: float = 18.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a float image in 0..255; each step applies with probability 0.5.

    Brightness (add a delta in +-``brightness_delta``), contrast (multiply), before or after saturation and hue.
    ``hue_delta`` is in OpenCV units (hue 0..180), i.e. a shift of ``hue_delta / 180`` of the colour circle.
    Saturation blends with the greyscale image (torchvision's definition) rather than scaling HSV's S channel.
    """
    image = image.clamp(0, 255)
    if _coin(0.5, generator):
        image = (image + _uniform(-brightness_delta, brightness_delta, generator)).clamp(0, 255)
    contrast_first = _coin(0.5, generator)

    def contrast(img: torch.Tensor) -> torch.Tensor:
        if _coin(0.5, generator):
            img = (img * _uniform(contrast_range[0], contrast_range[1], generator)).clamp(0, 255)
        return img

    if contrast_first:
        image = contrast(image)
    if _coin(0.5, generator):
        factor = _uniform(saturation_range[0], saturation_range[1], generator)
        image = TF.adjust_saturation(image / 255.0, factor).clamp(0, 1) * 255.0
    if _coin(0.5, generator):
        shift = _uniform(-hue_delta, hue_delta, generator) / 180.0
        image = TF.adjust_hue(image / 255.0, shift).clamp(0, 1) * 255.0
    if not contrast_first:
        image = contrast(image)
    return image


def normalize(
    image: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """(image - mean) / std per channel, with mean and std on the 0..255 scale."""
    mean_t = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image - mean_t) / std_t


def pad_to(
    image: torch.Tensor, label: torch.Tensor, size: tuple[int, int], image_value: float = 0.0, label_value: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right up to ``size`` (h, w): image with ``image_value``, label with ``label_value``."""
    pad_h, pad_w = max(size[0] - label.shape[0], 0), max(size[1] - label.shape[1], 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=image_value)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=label_value)
    return image, label


class SegTrainTransform:
    """ADE20K training augmentation; ``transform(image, label, generator=None) -> (image [3, h, w], label [h, w])``.

    ``image`` is a PIL RGB image or a tensor [3, H, W] (0..255), ``label`` int [H, W] already reduced (0..149, 255).
    Output: float32 normalised image and int64 label of exactly ``crop_size``.
    """

    def __init__(
        self,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        crop_size: tuple[int, int] = (512, 512),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        ignore_index: int = 255,
    ) -> None:
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.scale, self.ratio_range, self.crop_size = tuple(scale), tuple(ratio_range), tuple(crop_size)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.mean, self.std, self.ignore_index = tuple(mean), tuple(std), ignore_index

    def __call__(
        self, image: Image.Image | torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = to_tensors(image, label)
        image, label = random_resize(image, label, self.scale, self.ratio_range, generator)
        image, label = random_crop(
            image, label, self.crop_size, self.cat_max_ratio, self.ignore_index, generator=generator
        )
        image, label = random_hflip(image, label, self.flip_prob, generator)
        if self.photometric:
            image = photometric_distortion(image, generator=generator)
        image = normalize(image, self.mean, self.std)
        return pad_to(image, label, self.crop_size, 0.0, self.ignore_index)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scale={self.scale}, ratio_range={self.ratio_range}, crop_size={self.crop_size}, "
            f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, photometric={self.photometric})"
        )


class SegEvalTransform:
    """Evaluation: keep-ratio resize to ``scale`` (short side 512 for most ADE20K images), normalise.

    Returns (image [3, h, w] float32, label [H, W] int64 at the original size, unchanged). ``generator`` is
    accepted for the same call signature as :class:`SegTrainTransform` and unused.
    """

    def __init__(
        self,
        scale: tuple[int, int] = (2048, 512),
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.scale, self.mean, self.std = tuple(scale), tuple(mean), tuple(std)

    def __call__(
        self, image: Image.Image | torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = to_tensors(image, label)
        size = keep_ratio_size(image.shape[-2], image.shape[-1], self.scale)
        image, _ = resize(image, None, size)
        return normalize(image, self.mean, self.std), label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"
