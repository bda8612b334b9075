"""ViL + UperNet segmentation blocks on tiny shapes (D 32, 4 sub-blocks, 5 classes, CPU)."""

import pytest
import torch
import torch.nn.functional as F

import vil  # noqa: F401  (registers the ViL models in timm)
from vil.dense import FCNAuxHead, MultiScaleNeck, UperNetHead, ViLUperNet, reduce_ade20k_labels

NUM_CLASSES = 5
TINY = {
    "name": "vil_tiny",
    "num_classes": NUM_CLASSES,
    "img_size": 64,
    "out_indices": (0, 1, 2, 3),
    "embed_dim": 32,
    "depth": 4,
    "channels": 16,
    "aux_channels": 16,
}


def make_model(**overrides) -> ViLUperNet:
    torch.manual_seed(0)
    return ViLUperNet(**dict(TINY, **overrides))


@pytest.fixture(scope="module")
def eval_model() -> ViLUperNet:
    return make_model().eval()


def test_neck_strides_4_8_16_32():
    neck = MultiScaleNeck(32)
    maps = [torch.randn(2, 32, 4, 6) for _ in range(4)]  # stride 16 of a 64x96 image
    sizes = [tuple(x.shape) for x in neck(maps)]
    assert sizes == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]


def test_model_pyramid_and_heads(eval_model):
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = eval_model.backbone(images)
        pyramid = eval_model.neck(features)
        decode = eval_model.decode_head(pyramid)
        aux = eval_model.aux_head(pyramid)
    assert [tuple(f.shape) for f in features] == [(2, 32, 4, 6)] * 4
    assert [tuple(p.shape[2:]) for p in pyramid] == [(64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert decode.shape == (2, NUM_CLASSES, 16, 24)  # stride 4
    assert aux.shape == (2, NUM_CLASSES, 4, 6)  # level 2, stride 16
    assert eval_model.aux_head.loss_weight == 0.4
    assert eval_model.channels == 16 and make_model(channels=None).channels == 32  # default min(D, 384)


def test_logits_at_input_size():
    model = make_model()
    images = torch.randn(2, 3, 64, 96)
    logits, aux = model.train()(images)
    assert logits.shape == aux.shape == (2, NUM_CLASSES, 64, 96)
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, NUM_CLASSES, 64, 96)
        # not a multiple of the patch stride: padded for the backbone, cropped back
        odd = model(torch.randn(1, 3, 50, 70))
    assert odd.shape == (1, NUM_CLASSES, 50, 70) and torch.isfinite(odd).all()


def test_slide_inference_equals_forward_when_window_covers_image(eval_model):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(eval_model.slide_inference(images, window=64, stride=43), eval_model(images))


def test_slide_inference_pads_images_smaller_than_window(eval_model):
    images = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        slid = eval_model.slide_inference(images, window=64, stride=43)
        expected = eval_model(F.pad(images, (0, 14, 0, 24)))[:, :, :40, :50]
    assert slid.shape == (1, NUM_CLASSES, 40, 50)
    torch.testing.assert_close(slid, expected)


def test_slide_inference_averages_overlapping_windows(eval_model):
    # 64x96 with window 64, stride 32: two windows at columns [0, 64) and [32, 96). Each pixel's logit must be
    # the mean of the logits that the windows covering it predict on their own: the left third from window 0
    # only, the right third from window 1 only, the middle third the average of both. (A ViL window's output
    # depends on the whole window through the recurrence, so a wrong offset or a missing division shows.)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        slid = eval_model.slide_inference(images, window=64, stride=32)
        left = eval_model(images[:, :, :, 0:64])
        right = eval_model(images[:, :, :, 32:96])
    assert slid.shape == (1, NUM_CLASSES, 64, 96) and torch.isfinite(slid).all()
    torch.testing.assert_close(slid[..., :32], left[..., :32])
    torch.testing.assert_close(slid[..., 64:], right[..., 32:])
    torch.testing.assert_close(slid[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)
    # the two windows disagree in the overlap, so the test above is not vacuous
    assert not torch.allclose(left[..., 32:], right[..., :32])


def test_slide_inference_last_window_shifted_to_border(eval_model):
    # 64x80, window 64, stride 48: windows at columns 0 and 16 (shifted back from 48), every column covered
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        slid = eval_model.slide_inference(images, window=64, stride=48)
        first = eval_model(images[:, :, :, 0:64])
        last = eval_model(images[:, :, :, 16:80])
    torch.testing.assert_close(slid[..., :16], first[..., :16])
    torch.testing.assert_close(slid[..., 64:], last[..., 48:])
    torch.testing.assert_close(slid[..., 16:64], (first[..., 16:] + last[..., :48]) / 2)


def test_loss_ignores_255():
    model = make_model()
    torch.manual_seed(1)
    logits = torch.randn(2, NUM_CLASSES, 8, 8)
    aux = torch.randn(2, NUM_CLASSES, 8, 8)
    target = torch.randint(0, NUM_CLASSES, (2, 8, 8))
    target[:, :4] = 255
    loss = model.loss(logits, aux, target)
    labelled = target != 255
    main = F.cross_entropy(logits.permute(0, 2, 3, 1)[labelled], target[labelled])
    side = F.cross_entropy(aux.permute(0, 2, 3, 1)[labelled], target[labelled])
    torch.testing.assert_close(loss, main + 0.4 * side)
    # whatever the logits say at ignored pixels does not matter
    changed = logits.clone()
    changed[:, :, :4] = 100 * torch.randn_like(changed[:, :, :4])
    torch.testing.assert_close(model.loss(changed, None, target), main)
    # nothing labelled: zero, not NaN
    assert model.loss(logits, aux, torch.full_like(target, 255)).item() == 0.0


def test_reduce_ade20k_labels():
    raw = torch.tensor([[0, 1, 150], [2, 0, 75]], dtype=torch.uint8)
    assert reduce_ade20k_labels(raw).tolist() == [[255, 0, 149], [1, 255, 74]]


def test_one_step_reduces_loss():
    model = make_model(dropout=0.0).train()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, NUM_CLASSES, (2, 64, 64))
    target[:, :8] = 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.loss(*model(images), target)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = model.loss(*model(images), target)
    assert torch.isfinite(before) and after < before - 1e-3, (before.item(), after.item())


def test_bad_inputs_raise_value_error(eval_model):
    with pytest.raises(ValueError, match="out_indices must name 4"):
        make_model(out_indices=(1, 2, 3))
    with pytest.raises(ValueError, match="depth=4"):
        make_model(out_indices=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="increasing"):
        make_model(out_indices=(3, 2, 1, 0))
    with pytest.raises(ValueError, match="4 feature maps"):
        MultiScaleNeck(32)([torch.randn(1, 32, 4, 4)] * 3)
    with pytest.raises(ValueError, match=r"\[B, 32, H, W\]"):
        MultiScaleNeck(32)([torch.randn(1, 16, 4, 4)] * 4)
    with pytest.raises(ValueError, match="4 input levels"):
        UperNetHead([32] * 3, 16)
    with pytest.raises(ValueError, match="level 5"):
        FCNAuxHead(32, 16, in_index=5)([torch.randn(1, 32, 4, 4)] * 4)
    with pytest.raises(ValueError, match="unsqueeze"):
        eval_model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="larger than window"):
        eval_model.slide_inference(torch.randn(1, 3, 64, 64), window=32, stride=48)
    with pytest.raises(ValueError, match="target must be"):
        eval_model.loss(torch.randn(1, NUM_CLASSES, 8, 8), None, torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduce_ade20k_labels"):
        eval_model.loss(torch.randn(1, NUM_CLASSES, 2, 2), None, torch.tensor([[[0, 1], [2, NUM_CLASSES]]]))
