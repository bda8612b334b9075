"""SegmentationMeter against hand-computed confusion matrices; all_reduce over two gloo ranks."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vil.dense import SegmentationMeter

# Ground truth / prediction of 10 pixels, 3 classes.
TARGET = torch.tensor([[0, 0, 0, 1, 1], [1, 2, 2, 2, 2]])
PRED = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 0, 2]])
# Rows ground truth, columns prediction.
CONFUSION = torch.tensor([[2, 1, 0], [0, 2, 1], [1, 0, 3]])


def test_confusion_and_metrics_by_hand():
    meter = SegmentationMeter(3)
    meter.update(PRED, TARGET)
    assert torch.equal(meter.confusion, CONFUSION)
    out = meter.compute()
    # IoU = tp / (gt + pred - tp): class 0 2/(3+3-2), class 1 2/(3+3-2), class 2 3/(4+4-3).
    iou = torch.tensor([2 / 4, 2 / 4, 3 / 5], dtype=torch.float64)
    acc = torch.tensor([2 / 3, 2 / 3, 3 / 4], dtype=torch.float64)
    assert torch.allclose(out["IoU"], iou) and torch.allclose(out["Acc"], acc)
    assert out["mIoU"] == pytest.approx(iou.mean().item())
    assert out["mAcc"] == pytest.approx(acc.mean().item())
    assert out["aAcc"] == pytest.approx(7 / 10)


def test_updates_accumulate_and_logits_are_argmaxed():
    meter = SegmentationMeter(3)
    logits = torch.nn.functional.one_hot(PRED, 3).permute(2, 0, 1).float()[None] * 5.0
    meter.update(logits, TARGET[None])
    meter.update(PRED, TARGET)
    assert torch.equal(meter.confusion, 2 * CONFUSION)
    meter.reset()
    assert meter.confusion.sum() == 0


def test_ignore_index_excluded():
    meter = SegmentationMeter(3)
    target = TARGET.clone()
    target[0, 2] = 255
    # Predictions on ignored pixels may be anything, even out of range: they are never counted.
    pred = PRED.clone()
    pred[0, 2] = 99
    meter.update(pred, target)
    expected = CONFUSION.clone()
    expected[0, 1] -= 1
    assert torch.equal(meter.confusion, expected)
    assert meter.compute()["aAcc"] == pytest.approx(7 / 9)


def test_absent_classes_excluded_from_means():
    meter = SegmentationMeter(5)
    # Class 3 appears in neither; class 4 only in the prediction.
    target = torch.tensor([0, 0, 1, 2])
    pred = torch.tensor([0, 4, 1, 2])
    meter.update(pred, target)
    out = meter.compute()
    assert math.isnan(out["IoU"][3]) and math.isnan(out["Acc"][3])
    assert out["IoU"][4] == 0.0 and math.isnan(out["Acc"][4])
    assert out["mIoU"] == pytest.approx((1 / 2 + 1 + 1 + 0) / 4)
    assert out["mAcc"] == pytest.approx((1 / 2 + 1 + 1) / 3)


def test_empty_meter_and_bad_inputs():
    meter = SegmentationMeter(3)
    out = meter.compute()
    assert math.isnan(out["mIoU"]) and math.isnan(out["aAcc"])
    with pytest.raises(ValueError, match=r"target holds labels \[3\]"):
        meter.update(torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"pred holds labels \[-1\]"):
        meter.update(torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="differ"):
        meter.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMeter(300, ignore_index=255)


def _ddp_worker(rank: int, world_size: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world_size)
    try:
        meter = SegmentationMeter(3)
        # Each rank sees one row of the example.
        meter.update(PRED[rank], TARGET[rank])
        meter.all_reduce()
        torch.save(meter.confusion, f"{tmp}/rank{rank}.pt")
        with pytest.raises(RuntimeError, match="double-count"):
            meter.update(PRED[rank], TARGET[rank])
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path):
    meter = SegmentationMeter(3)
    meter.update(PRED, TARGET)
    # Not initialised: a no-op.
    meter.all_reduce()
    assert torch.equal(meter.confusion, CONFUSION)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), CONFUSION)
