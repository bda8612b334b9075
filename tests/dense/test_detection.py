"""ViL detection backbone and torchvision Faster/Mask R-CNN on tiny shapes (D 32, 4 sub-blocks, CPU)."""

import pytest
import timm
import torch

import vil  # noqa: F401  (registers the ViL models in timm)
from vil.dense.detection import ViLDetectionBackbone, vil_fasterrcnn, vil_maskrcnn

TINY_BACKBONE = {"embed_dim": 32, "depth": 4, "img_size": 64, "out_channels": 32}
# small images and few sampled anchors / RoIs keep a training step around 0.3 s on one CPU thread
SMALL_DETECTOR = {
    "num_classes": 3,
    "min_size": 128,
    "max_size": 160,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 64,
}


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads on a busy 2-core machine (see tests/models/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different sizes with boxes (x1, y1, x2, y2 in pixels), labels and instance masks."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 160, generator=generator), torch.rand(3, 112, 144, generator=generator)]
    boxes = [
        torch.tensor([[10.0, 20.0, 70.0, 90.0], [80.0, 30.0, 150.0, 120.0]]),
        torch.tensor([[5.0, 5.0, 60.0, 50.0]]),
    ]
    targets = []
    for image, image_boxes, labels in zip(images, boxes, ([1, 2], [2]), strict=True):
        masks = torch.zeros(len(image_boxes), *image.shape[1:], dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, image_boxes.long().tolist(), strict=True):
            mask[y1:y2, x1:x2] = 1
        targets.append({"boxes": image_boxes, "labels": torch.tensor(labels), "masks": masks})
    return images, targets


def make_fasterrcnn(**overrides):
    torch.manual_seed(0)
    return vil_fasterrcnn(backbone_kwargs=TINY_BACKBONE, **dict(SMALL_DETECTOR, **overrides))


def test_feature_keys_strides_and_channels_on_non_square_input():
    backbone = ViLDetectionBackbone(**TINY_BACKBONE).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 128, 192))
    assert list(features) == ["0", "1", "2", "3", "pool"] == backbone.feature_names
    assert backbone.strides == {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
    assert backbone.roi_feature_names == ["0", "1", "2", "3"]
    assert backbone.out_channels == 32
    for name, feature in features.items():
        stride = backbone.strides[name]
        assert tuple(feature.shape) == (2, 32, 128 // stride, 192 // stride), name


def test_varying_input_sizes_in_one_process():
    backbone = ViLDetectionBackbone(**TINY_BACKBONE).eval()
    with torch.no_grad():
        for height, width in ((128, 160), (96, 224), (64, 64)):
            features = backbone(torch.randn(1, 3, height, width))
            assert tuple(features["0"].shape[2:]) == (height // 4, width // 4)
            assert tuple(features["3"].shape[2:]) == (height // 32, width // 32)
            assert all(torch.isfinite(f).all() for f in features.values())


def test_size_not_a_multiple_of_the_patch_size_names_size_and_fix():
    backbone = ViLDetectionBackbone(**TINY_BACKBONE)
    with pytest.raises(ValueError, match=r"100x160 is not a multiple of the patch size 16.*pad .* to 112x160"):
        backbone(torch.randn(1, 3, 100, 160))


def test_defaults_and_options():
    spec_taps = ViLDetectionBackbone(embed_dim=8, depth=24)
    assert spec_taps.out_indices == (7, 11, 15, 23) and spec_taps.out_channels == 256
    assert ViLDetectionBackbone(embed_dim=8, depth=6).out_indices == (1, 2, 3, 5)
    no_pool = ViLDetectionBackbone(**TINY_BACKBONE, out_indices=(0, 1, 2, 3), extra_pool_level=False)
    assert list(no_pool(torch.randn(1, 3, 64, 64))) == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="depth=4"):
        ViLDetectionBackbone(**TINY_BACKBONE, out_indices=(0, 1, 2, 4))
    with pytest.raises(ValueError, match="4 distinct sub-blocks"):
        ViLDetectionBackbone(embed_dim=8, depth=3)
    with pytest.raises(ValueError, match="stride-16 model"):
        ViLDetectionBackbone("vil1_tinyplus_stride8", embed_dim=8, depth=4)


def test_pretrained_weights_load_through_timm(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("vil_tiny", embed_dim=32, depth=4, img_size=64, num_classes=10)
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    backbone = ViLDetectionBackbone(**TINY_BACKBONE, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    loaded = backbone.vil.model.state_dict()
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.3.layer.proj_down.weight"):
        torch.testing.assert_close(loaded[key], source.state_dict()[key])


def test_fasterrcnn_training_step_reaches_the_backbone():
    model = make_fasterrcnn().train()
    assert model.transform.min_size == (128,) and model.transform.max_size == 160
    images, targets = synthetic_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    vil_model = model.backbone.vil.model
    for parameter in (vil_model.patch_embed.proj.weight, vil_model.pos_embed, vil_model.blocks[0].layer.proj_up.weight):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0


def test_fasterrcnn_overfits_one_batch():
    model = make_fasterrcnn().train()
    images, targets = synthetic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(8):
        # the same anchor/RoI sampling every step, so the loss moves only through the weights
        torch.manual_seed(1)
        total = sum(model(images, targets).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert sum(totals[-3:]) / 3 < 0.75 * totals[0], totals


def test_fasterrcnn_eval_returns_torchvision_detections():
    model = make_fasterrcnn().eval()
    images, _ = synthetic_batch()
    with torch.no_grad():
        detections = model(images)
    assert isinstance(detections, list) and len(detections) == 2
    for detection, image in zip(detections, images, strict=True):
        assert set(detection) == {"boxes", "labels", "scores"}
        count = len(detection["scores"])
        assert detection["boxes"].shape == (count, 4) and detection["labels"].shape == (count,)
        # boxes come back in the coordinates of the original (unresized) image
        assert (detection["boxes"][:, 2] <= image.shape[2]).all() and (detection["boxes"][:, 3] <= image.shape[1]).all()


def test_builders_keep_torchvision_default_sizes():
    model = vil_fasterrcnn(num_classes=2, backbone_kwargs={"embed_dim": 8, "depth": 4})
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]


def test_maskrcnn_training_gives_a_mask_loss():
    torch.manual_seed(0)
    model = vil_maskrcnn(backbone_kwargs=TINY_BACKBONE, **SMALL_DETECTOR).train()
    assert model.roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2", "3"]
    images, targets = synthetic_batch()
    losses = model(images, targets)
    assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
