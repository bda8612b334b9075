"""Semantic segmentation metrics from an accumulated confusion matrix (mIoU, per-class IoU, aAcc, mAcc)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["SegmentationMeter"]


class SegmentationMeter:
    """Confusion matrix over ``num_classes`` (rows: ground truth, columns: prediction), pixels of ``ignore_index``
    skipped.

    ``update(pred, target)`` takes class indices [..., H, W] with the target's shape, or logits [B, K, H, W] for a
    target [B, H, W] (arg-max over K). ``compute()`` returns fractions in 0..1 (mmseg prints percentages):

    - ``IoU`` / ``Acc``: per-class tensors; NaN for a class with no pixel in prediction or ground truth (IoU) or no
      ground-truth pixel (Acc), and such classes are left out of ``mIoU`` / ``mAcc``;
    - ``aAcc``: correct / labelled pixels.

    Under DDP, call :meth:`all_reduce` once on every rank after the last update (it sums the matrices in place).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a valid class of 0..{num_classes - 1}; pick e.g. 255")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self._reduced = False

    def reset(self) -> None:
        self.confusion.zero_()
        self._reduced = False

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if self._reduced:
            raise RuntimeError("update() after all_reduce() would double-count other ranks' pixels; call reset() first")
        if pred.is_floating_point():
            if pred.ndim != target.ndim + 1 or pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"floating-point pred must be logits [B, {self.num_classes}, H, W] for target [B, H, W], got "
                    f"{tuple(pred.shape)} and {tuple(target.shape)}; pass class indices otherwise"
                )
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ; resize the logits to the "
                f"label size before the arg-max"
            )
        if target.is_floating_point():
            raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
        pred, target = pred.long().flatten(), target.long().flatten()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        for name, values in (("target", target), ("pred", pred)):
            bad = (values < 0) | (values >= k)
            if bad.any():
                raise ValueError(
                    f"{name} holds labels {torch.unique(values[bad])[:8].tolist()} outside [0, {k}) that are not "
                    f"ignore_index={self.ignore_index}; for raw ADE20K annotations apply reduce_ade20k_labels first"
                )
        counts = torch.bincount(target * k + pred, minlength=k * k).view(k, k)
        if counts.device != self.confusion.device:
            self.confusion = self.confusion.to(counts.device)
        self.confusion += counts

    def all_reduce(self) -> None:
        """Sum the confusion matrices of all ranks (no-op when torch.distributed is not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._reduced:
            raise RuntimeError("all_reduce() was already called; a second call would double-count")
        matrix = self.confusion
        if dist.get_backend() == "nccl" and matrix.device.type != "cuda":
            # NCCL only reduces CUDA tensors.
            matrix = matrix.cuda()
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
        self.confusion = matrix.to(self.confusion.device)
        self._reduced = True

    def compute(self) -> dict[str, float | torch.Tensor]:
        """``{"mIoU", "mAcc", "aAcc"}`` floats (NaN when nothing was counted) and ``{"IoU", "Acc"}`` [K] tensors."""
        matrix = self.confusion.double().cpu()
        tp = matrix.diagonal()
        gt, predicted = matrix.sum(1), matrix.sum(0)
        union = gt + predicted - tp
        nan = torch.tensor(math.nan, dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = matrix.sum().item()

        def nanmean(x: torch.Tensor) -> float:
            return x.nanmean().item() if not torch.isnan(x).all() else math.nan

        return {
            "mIoU": nanmean(iou),
            "mAcc": nanmean(acc),
            "aAcc": tp.sum().item() / total if total > 0 else math.nan,
            "IoU": iou,
            "Acc": acc,
        }
