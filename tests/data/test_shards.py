"""Webdataset shards: writing, locating, rank/worker splitting, fixed epoch length, resume position, bad data."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vil.data import AtomicShardWriter, DataError, ShardStream, assign_shards, iter_shard, resolve_shards, write_info


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value % 256, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_shards(root: str, num_shards: int, per_shard: int, corrupt: set[int] = frozenset()) -> list[str]:
    """Samples 0..N-1; sample i has label i % 10 and key s{i:05d}; indices in ``corrupt`` get broken image bytes."""
    with AtomicShardWriter(root, "toy", "train", per_shard) as writer:
        for i in range(num_shards * per_shard):
            image = b"not an image" if i in corrupt else _png(i)
            writer.write(f"s{i:05d}", {"png": image, "cls": str(i % 10).encode()})
    names, lengths = writer.close()
    write_info(root, "toy", {"train": (names, lengths)})
    return names


def decode_index(raw: dict, aug_seed: int | None) -> tuple[torch.Tensor, int]:
    """Test decode: checks the image really decodes, returns the sample index (and an aug-seed fingerprint)."""
    Image.open(io.BytesIO(raw["png"])).load()
    index = int(raw["__key__"][1:])
    return torch.tensor([index, (aug_seed or 0) % 1000]), index % 10


def collect(stream: ShardStream, epoch: int, start: int = 0, workers: int = 2) -> list[torch.Tensor]:
    stream.set_position(epoch, start)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [images for images, _, _, _ in loader]


def test_write_info_and_resolve(tmp_path):
    names = make_shards(str(tmp_path), 3, 5)
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 15
    assert info["splits"]["train"]["shard_lengths"] == [5, 5, 5]
    by_name = resolve_shards(str(tmp_path), "train")
    assert by_name.num_samples == 15 and [os.path.basename(u) for u in by_name.urls] == names
    by_pattern = resolve_shards(str(tmp_path), "toy-train-{0000..0001}.tar")
    assert by_pattern.num_samples == 10 and by_pattern.lengths == [5, 5]
    assert resolve_shards(str(tmp_path), "toy-train-{0000..0001}.tar|7").num_samples == 7
    # No temporary files are left behind.
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["_info.json"])


def test_pipe_urls(tmp_path):
    make_shards(str(tmp_path), 2, 4)
    shards = resolve_shards(f"pipe:cat {tmp_path}", "train")
    assert shards.urls[0].startswith("pipe:cat ")
    assert [s["__key__"] for s in iter_shard(shards.urls[1])] == [f"s{i:05d}" for i in range(4, 8)]


def test_missing_data_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="make_shards.py"):
        resolve_shards(str(tmp_path), "train")
    names = make_shards(str(tmp_path), 2, 2)
    os.remove(tmp_path / names[1])
    with pytest.raises(DataError, match=names[1]):
        resolve_shards(str(tmp_path), "train")
    with pytest.raises(DataError, match="not in"):
        resolve_shards(str(tmp_path), "validation")


@pytest.mark.parametrize("num_shards", [12, 3])
def test_assign_shards_disjoint_and_complete(num_shards):
    world, workers = 2, 2
    for epoch in range(3):
        seen = {}
        for rank in range(world):
            for worker in range(workers):
                ids, slot, slots = assign_shards(
                    num_shards,
                    epoch=epoch,
                    seed=1,
                    rank=rank,
                    world_size=world,
                    worker=worker,
                    num_workers=workers,
                    shuffle=True,
                )
                seen[(rank, worker)] = (ids, slot, slots)
        if num_shards >= world * workers:
            # Each shard read by exactly one (rank, worker).
            all_ids = sorted(i for ids, _, _ in seen.values() for i in ids)
            assert all_ids == list(range(num_shards))
        else:
            # Too few shards: everybody reads all of them and keeps a disjoint slot of the samples.
            assert sorted(slot for _, slot, _ in seen.values()) == list(range(world * workers))
    orders = [
        assign_shards(num_shards, epoch=e, seed=1, rank=0, world_size=1, worker=0, num_workers=1, shuffle=True)[0]
        for e in range(4)
    ]
    assert len({tuple(o) for o in orders}) > 1, "shard order must change between epochs"


@pytest.mark.parametrize("num_shards", [8, 3])
def test_train_stream_equal_steps_disjoint_ranks(tmp_path, num_shards):
    make_shards(str(tmp_path), num_shards, 16)
    shards = resolve_shards(str(tmp_path), "train")
    batch, world = 4, 2
    num_batches = shards.num_samples // (batch * world)
    per_rank = []
    for rank in range(world):
        stream = ShardStream(
            shards,
            decode_index,
            batch,
            train=True,
            num_batches=num_batches,
            seed=3,
            rank=rank,
            world_size=world,
            shuffle_buffer=8,
            shuffle_initial=4,
        )
        batches = collect(stream, epoch=0)
        assert len(batches) == num_batches and all(b.shape[0] == batch for b in batches)
        per_rank.append([int(i) for b in batches for i in b[:, 0]])
    # Within an epoch, no sample appears twice on a rank or on both ranks.
    assert len(set(per_rank[0]) | set(per_rank[1])) == len(per_rank[0]) + len(per_rank[1])
    # The next epoch is a different order.
    stream = ShardStream(
        shards,
        decode_index,
        batch,
        train=True,
        num_batches=num_batches,
        seed=3,
        rank=0,
        world_size=world,
        shuffle_buffer=8,
        shuffle_initial=4,
    )
    assert [int(i) for b in collect(stream, epoch=1) for i in b[:, 0]] != per_rank[0]


def test_resume_mid_epoch_gives_the_same_batches(tmp_path):
    make_shards(str(tmp_path), 6, 10)
    shards = resolve_shards(str(tmp_path), "train")
    stream = ShardStream(
        shards, decode_index, 4, train=True, num_batches=15, seed=5, shuffle_buffer=16, shuffle_initial=8
    )
    full = collect(stream, epoch=2, workers=2)
    for start in (1, 6, 7):
        resumed = collect(stream, epoch=2, start=start, workers=2)
        assert len(resumed) == 15 - start
        for a, b in zip(full[start:], resumed):
            # Same samples and the same augmentation seeds.
            assert torch.equal(a, b)


def test_corrupt_image_is_skipped_counted_and_batch_stays_full(tmp_path):
    make_shards(str(tmp_path), 2, 8, corrupt={3})
    shards = resolve_shards(str(tmp_path), "train")
    # A one-sample buffer reads in order, so the epoch holds exactly the 16 samples of the two shards.
    stream = ShardStream(
        shards, decode_index, 4, train=True, num_batches=4, shuffle_buffer=1, shuffle_initial=1, max_bad_fraction=0.2
    )
    stream.set_position(0)
    with pytest.warns(RuntimeWarning, match="s00003"):
        items = list(DataLoader(stream, batch_size=None, num_workers=0))
    assert all(images.shape[0] == 4 for images, _, _, _ in items)
    assert 3 not in {int(i) for images, _, _, _ in items for i in images[:, 0]}
    assert items[-1][3].tolist() == [0, 1, 0, 0]
    strict = ShardStream(shards, decode_index, 4, train=True, num_batches=4, max_bad_fraction=0.0)
    with pytest.raises(DataError, match=r"toy-train-0000\.tar.*s00003"), pytest.warns(RuntimeWarning):
        list(DataLoader(strict, batch_size=None, num_workers=0))


@pytest.mark.parametrize("cut", [0.5, 0.61])
def test_truncated_shard_is_skipped_then_stops_past_the_budget(tmp_path, cut):
    # 0.5 cuts at a tar member boundary (a short archive that tarfile reads without error), 0.61 mid-member.
    names = make_shards(str(tmp_path), 4, 10)
    path = tmp_path / names[1]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    shards = resolve_shards(str(tmp_path), "train")
    # 35 samples per epoch: more than the three intact shards hold, so the truncated one is read.
    stream = ShardStream(
        shards, decode_index, 5, train=True, num_batches=7, shuffle_buffer=4, shuffle_initial=2, max_bad_fraction=0.5
    )
    stream.set_position(0)
    with pytest.warns(RuntimeWarning, match=f"Shard .*{names[1]} is truncated"):
        items = list(DataLoader(stream, batch_size=None, num_workers=0))
    assert len(items) == 7
    _, truncated, lost = items[-1][3].tolist()[1:]
    assert truncated >= 1 and lost >= 1
    tight = ShardStream(shards, decode_index, 5, train=True, num_batches=7, max_bad_fraction=0.01)
    with pytest.raises(DataError, match=names[1]), pytest.warns(RuntimeWarning):
        list(DataLoader(tight, batch_size=None, num_workers=0))


def test_eval_stream_reads_every_sample_once(tmp_path):
    make_shards(str(tmp_path), 5, 7)
    shards = resolve_shards(str(tmp_path), "train")
    for workers in (0, 2):
        seen = []
        for rank in range(2):
            stream = ShardStream(shards, decode_index, 4, train=False, rank=rank, world_size=2)
            loader = DataLoader(stream, batch_size=None, num_workers=workers)
            seen += [int(i) for images, _, _, _ in loader for i in images[:, 0]]
        assert sorted(seen) == list(range(35))
