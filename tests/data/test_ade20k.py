"""ADE20K dataset and joint segmentation transforms on a tiny synthetic tree (40x60 JPEG/PNG pairs, CPU)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from vil.data.ade20k import ADE20KDataset
from vil.data.seg_transforms import (
    SegEvalTransform,
    SegTrainTransform,
    keep_ratio_size,
    random_crop,
)
from vil.data.shards import DataError

H, W = 40, 60


def raw_label(seed: int) -> np.ndarray:
    """Raw ADE20K-style annotation: 0 (unlabelled) and classes 1..150 in 10x10 blocks."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 151, size=(H // 10, W // 10), dtype=np.uint8)
    blocks[0, 0], blocks[0, 1] = 0, 150
    return np.kron(blocks, np.ones((10, 10), dtype=np.uint8))


def write_pair(root, split: str, stem: str, seed: int, label_size: tuple[int, int] = (H, W)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg", quality=95)
    label = raw_label(seed)[: label_size[0], : label_size[1]]
    if label.shape != label_size:
        label = np.zeros(label_size, dtype=np.uint8)
    Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{stem}.png")
    return label


@pytest.fixture
def ade_root(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    for i in range(3):
        write_pair(root, "training", f"ADE_train_{i:08d}", seed=i)
    write_pair(root, "validation", "ADE_val_00000000", seed=10)
    return root


def test_dataset_returns_reduced_labels(ade_root):
    ds = ADE20KDataset(ade_root, "training")
    assert len(ds) == 3
    image, label = ds[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (W, H)
    assert label.dtype == torch.int64 and label.shape == (H, W)
    raw = torch.from_numpy(raw_label(1)).long()
    assert torch.equal(label, torch.where(raw == 0, torch.full_like(raw, 255), raw - 1))
    assert label[0, 0] == 255 and label[0, 10] == 149
    assert len(ADE20KDataset(ade_root, "validation")) == 1


def test_dataset_with_train_transform_is_seeded(ade_root):
    ds = ADE20KDataset(ade_root, "training", transform=SegTrainTransform(), seed=3)
    image, label = ds[0]
    assert image.shape == (3, 512, 512) and image.dtype == torch.float32
    assert label.shape == (512, 512) and label.dtype == torch.int64
    again = ADE20KDataset(ade_root, "training", transform=SegTrainTransform(), seed=3)[0]
    assert torch.equal(image, again[0]) and torch.equal(label, again[1])
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], image)


def test_missing_root_and_split_dirs(tmp_path, ade_root):
    with pytest.raises(DataError, match="ADE20K root not found"):
        ADE20KDataset(tmp_path / "nope")
    (ade_root / "annotations" / "validation").rename(ade_root / "annotations" / "val")
    with pytest.raises(DataError, match=r"annotation directory missing: .*annotations/validation"):
        ADE20KDataset(ade_root, "validation")
    with pytest.raises(ValueError, match="split must be one of"):
        ADE20KDataset(ade_root, "val")


def test_image_without_annotation_names_both_paths(ade_root):
    os.remove(ade_root / "annotations" / "training" / "ADE_train_00000001.png")
    with pytest.raises(DataError) as info:
        ADE20KDataset(ade_root, "training")
    msg = str(info.value)
    assert "1 of 3" in msg
    assert str(ade_root / "images" / "training" / "ADE_train_00000001.jpg") in msg
    assert str(ade_root / "annotations" / "training" / "ADE_train_00000001.png") in msg
    assert "add the missing .png" in msg


def test_size_mismatch(ade_root):
    write_pair(ade_root, "training", "ADE_train_00000001", seed=1, label_size=(H, W + 1))
    ds = ADE20KDataset(ade_root, "training")
    with pytest.raises(DataError, match=r"Size mismatch: .*ADE_train_00000001.jpg is 60x40.*61x40"):
        ds[1]
    ds[0]


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_jpeg_raises_data_error_naming_file(ade_root, kind):
    path = ade_root / "images" / "training" / "ADE_train_00000002.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"not a jpeg at all" * 10)
    ds = ADE20KDataset(ade_root, "training")
    with pytest.raises(DataError, match=r"Cannot decode .*ADE_train_00000002\.jpg"):
        ds[2]


def test_label_out_of_range(ade_root):
    bad = np.full((H, W), 151, dtype=np.uint8)
    Image.fromarray(bad, mode="L").save(ade_root / "annotations" / "training" / "ADE_train_00000000.png")
    with pytest.raises(DataError, match="holds label 151"):
        ADE20KDataset(ade_root, "training")[0]


def block_sample(seed: int = 0, h: int = H, w: int = W) -> tuple[torch.Tensor, torch.Tensor]:
    """Image whose every channel is 20 * label (10x10 blocks of classes 0..5), so alignment is checkable."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 6, (h // 10, w // 10), generator=g)
    label = blocks.repeat_interleave(10, 0).repeat_interleave(10, 1)
    image = (label * 20).float()[None].expand(3, -1, -1).clone()
    return image, label


def identity_norm(**kwargs) -> SegTrainTransform:
    return SegTrainTransform(photometric=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kwargs)


def test_flip_and_crop_keep_alignment_exactly():
    image, label = block_sample()
    # No resize (ratio 1 of the image's own size), so image and label must agree pixel for pixel.
    transform = identity_norm(scale=(W, H), ratio_range=(1.0, 1.0), crop_size=(32, 32), flip_prob=0.5)
    flipped = 0
    for seed in range(8):
        out_img, out_lbl = transform(image, label, torch.Generator().manual_seed(seed))
        assert out_img.shape == (3, 32, 32) and out_lbl.shape == (32, 32)
        assert torch.equal(out_img[0], (out_lbl * 20).float())
        # The crop is a window of the original or of its mirror image.
        found = [
            (top, left, f)
            for f in (False, True)
            for top in range(H - 31)
            for left in range(W - 31)
            if torch.equal((label.flip(-1) if f else label)[top : top + 32, left : left + 32], out_lbl)
        ]
        assert found
        flipped += all(f for _, _, f in found)
    assert 0 < flipped < 8


def test_resize_keeps_alignment():
    image, label = block_sample(1)
    transform = identity_norm(scale=(120, 80), ratio_range=(0.5, 2.0), crop_size=(48, 48))
    for seed in range(6):
        out_img, out_lbl = transform(image, label, torch.Generator().manual_seed(seed))
        valid = out_lbl != 255
        decoded = (out_img[0] / 20).round().long()
        # Bilinear vs nearest differ only on block borders.
        agree = (decoded[valid] == out_lbl[valid]).float().mean().item()
        assert agree > 0.85, (seed, agree)
        mirrored = (decoded.flip(-1)[valid.flip(-1)] == out_lbl.flip(-1)[valid.flip(-1)]).float().mean().item()
        assert mirrored > 0.85


def test_keep_ratio_size_and_eval_transform():
    assert keep_ratio_size(40, 60, (2048, 512)) == (512, 768)
    assert keep_ratio_size(512, 4096, (2048, 512)) == (256, 2048)
    assert keep_ratio_size(683, 512, (2048, 512)) == (683, 512)
    image, label = block_sample()
    out_img, out_lbl = SegEvalTransform()(image, label)
    assert out_img.shape == (3, 512, 768)
    # The label stays at the original size: metrics are computed on the original annotation.
    assert torch.equal(out_lbl, label)
    expected = (0 - 123.675) / 58.395
    assert out_img[0][out_img[0].abs() < 10].min().item() == pytest.approx(expected, abs=1e-4)


def test_crop_shape_and_padding_values():
    image, label = block_sample()
    image += 10.0
    transform = SegTrainTransform(scale=(W, H), ratio_range=(1.0, 1.0), crop_size=(64, 64), photometric=False)
    out_img, out_lbl = transform(image, label, torch.Generator().manual_seed(0))
    assert out_img.shape == (3, 64, 64) and out_lbl.shape == (64, 64)
    assert (out_img[:, H:, :] == 0).all() and (out_img[:, :, W:] == 0).all()
    assert (out_lbl[H:, :] == 255).all() and (out_lbl[:, W:] == 255).all()
    assert (out_lbl[:H, :W] != 255).all()
    assert (out_img[:, :H, :W] != 0).all()


def test_default_recipe_shapes():
    image, label = block_sample()
    for seed in range(3):
        out_img, out_lbl = SegTrainTransform()(image, label, torch.Generator().manual_seed(seed))
        assert out_img.shape == (3, 512, 512) and out_lbl.shape == (512, 512)
        assert out_img.dtype == torch.float32 and out_lbl.dtype == torch.int64
        assert set(torch.unique(out_lbl).tolist()) <= set(range(6)) | {255}


def test_cat_max_ratio_retries():
    # Class 1 in columns 0..15 of a 64x64 map, class 0 elsewhere: a 32x32 crop is accepted only with left < 8.
    label = torch.zeros(64, 64, dtype=torch.int64)
    label[:, :16] = 1
    image = torch.zeros(3, 64, 64)

    def accepted(cat_max_ratio: float) -> int:
        hits = 0
        for seed in range(100):
            _, crop = random_crop(image, label, (32, 32), cat_max_ratio, generator=torch.Generator().manual_seed(seed))
            counts = torch.bincount(crop.flatten(), minlength=2)
            hits += counts.min().item() > 0 and counts.max().item() / counts.sum().item() < 0.75
        return hits

    assert accepted(1.0) < 45
    assert accepted(0.75) > 80
    # A single-class map can never qualify: the last of the 10 draws is returned, no endless loop.
    _, crop = random_crop(image, torch.zeros(64, 64, dtype=torch.int64), (32, 32), 0.75)
    assert crop.shape == (32, 32)


def test_cat_max_ratio_ignores_255():
    # Rows 0, 10, 20, ... class 0; rows 5, 15, ... class 1; everything else 255 (about 80 % of any crop).
    label = torch.full((64, 64), 255, dtype=torch.int64)
    label[0::10] = 0
    label[5::10] = 1
    image = torch.zeros(3, 64, 64)
    for seed in range(10):
        first = random_crop(image, label, (32, 32), 1.0, generator=torch.Generator().manual_seed(seed))[1]
        retried = random_crop(image, label, (32, 32), 0.75, generator=torch.Generator().manual_seed(seed))[1]
        # Ignoring 255, classes 0 and 1 are balanced, so the first draw is accepted.
        assert torch.equal(first, retried)


def test_reproducible_with_seeded_generator():
    image, label = block_sample(2)
    image = image + torch.linspace(0, 100, W)
    transform = SegTrainTransform(scale=(120, 80), crop_size=(48, 48))
    a = transform(image, label, torch.Generator().manual_seed(7))
    b = transform(image, label, torch.Generator().manual_seed(7))
    c = transform(image, label, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_photometric_changes_image_only():
    image, label = block_sample(3)
    image = image + 50.0
    kwargs = {"scale": (W, H), "ratio_range": (1.0, 1.0), "crop_size": (H, W), "flip_prob": 0.0}
    plain = SegTrainTransform(photometric=False, **kwargs)
    jitter = SegTrainTransform(photometric=True, **kwargs)
    changed = 0
    for seed in range(6):
        p_img, p_lbl = plain(image, label, torch.Generator().manual_seed(seed))
        j_img, j_lbl = jitter(image, label, torch.Generator().manual_seed(seed))
        assert torch.equal(p_lbl, j_lbl)
        changed += not torch.allclose(p_img, j_img)
    assert changed > 0


def test_pil_input_matches_tensor_input():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    label = torch.from_numpy(raw_label(0)).long()
    transform = SegTrainTransform(scale=(120, 80), crop_size=(48, 48))
    from_pil = transform(Image.fromarray(array), label, torch.Generator().manual_seed(1))
    from_tensor = transform(torch.from_numpy(array).permute(2, 0, 1), label, torch.Generator().manual_seed(1))
    assert torch.equal(from_pil[0], from_tensor[0]) and torch.equal(from_pil[1], from_tensor[1])
    with pytest.raises(ValueError, match="label must be"):
        transform(Image.fromarray(array), label[:, :-1])
