"""Is ViL-T training bound by the data loader or by the model? Loader images/s next to model-only train images/s.

Usage:
    # GPU node (the real question): ViL-T pre-training recipe at 192 px, bf16, per-GPU batch 256
    python bench/bench_train_loader.py --device cuda --workers 4 8 16 --batch 256 --compile
    # CPU check of the script itself (tiny settings, about a minute)
    python bench/bench_train_loader.py --tiny

It writes synthetic JPEG shards (ImageNet-like sizes and file sizes, in a temporary directory unless --shards-dir
is given), then measures
  1. the training loader of configs/vil_tiny_in1k_pt192.yaml (webdataset shards -> decode -> RandomResizedCrop,
     flip, 3-Augment, colour jitter -> batches) with N workers: total and per-worker images/s;
  2. a model-only training step (forward, backward, AdamW; bf16 autocast on CUDA; Mixup/CutMix) on a batch already
     on the device: images/s;
  3. both together (the loader feeding the model) with the largest worker count,
and prints a table that says which of the two bounds the run and how many loader workers per GPU keep up.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from vil.data import AtomicShardWriter, build_loader, resolve_shards, write_info
from vil.training import autocast, build_mixup, build_model, build_optimizer, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "vil_tiny_in1k_pt192.yaml")


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A smooth random colour image with some texture, so JPEG sizes resemble photos (~100 kB at 500x375)."""
    low = rng.random((height // 16 + 1, width // 16 + 1, 3)) * 255
    img = Image.fromarray(low.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-40, 40, (height, width, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: str, num_images: int, num_shards: int, distinct: int, size: tuple[int, int]) -> float:
    """``num_images`` samples in ``num_shards`` shards; returns the mean JPEG size in kB."""
    rng = np.random.default_rng(0)
    # Encoding is slow: a pool of distinct images is reused under different keys (decoding cost is the same).
    pool = []
    for _ in range(distinct):
        w = int(size[0] * rng.uniform(0.8, 1.2))
        h = int(size[1] * rng.uniform(0.8, 1.2))
        pool.append(synthetic_jpeg(rng, w, h))
    per_shard = math.ceil(num_images / num_shards)
    with AtomicShardWriter(root, "synthetic", "train", per_shard) as writer:
        for i in range(num_images):
            writer.write(f"img{i:08d}", {"jpg": pool[i % distinct], "cls": str(i % 1000).encode()})
    names, lengths = writer.close()
    write_info(root, "synthetic", {"train": (names, lengths)})
    return sum(len(p) for p in pool) / len(pool) / 1024


def loader_rate(cfg: dict, workers: int, batch: int, batches: int, warmup: int) -> float:
    source = resolve_shards(cfg["data"]["root"], "train")
    probe = build_loader(cfg, source, train=True, batch_size=batch, num_batches=1, num_workers=workers)
    # The first batches include worker start-up and the shuffle buffer's initial fill, and every worker queues
    # prefetch_factor batches ahead: those come out at once, so they are drained before the clock starts (timing
    # them made 10 batches with 14 workers look 10x faster than the steady state).
    skip = warmup + workers * (probe.prefetch_factor or 0)
    loader = build_loader(cfg, source, train=True, batch_size=batch, num_batches=skip + batches, num_workers=workers)
    loader.dataset.set_position(0, 0)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - start)
    del it  # shut the workers down now: left running they would take CPU from the next measurement
    return rate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_rate(cfg: dict, device: torch.device, batch: int, steps: int, warmup: int, loader=None) -> float:
    """Training images/s: synthetic batch already on the device, or batches from ``loader`` when given."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(cfg, model, 1e-3)
    mixup, criterion = build_mixup(cfg, batch)
    train_model = torch.compile(model) if cfg["train"]["compile"] else model
    size = cfg["data"]["img_size"]
    fixed = torch.randn(batch, cfg["data"]["in_chans"], size, size, device=device)
    fixed_targets = torch.randint(0, cfg["data"]["num_classes"], (batch,), device=device)
    batches = iter(loader) if loader is not None else None

    def step() -> None:
        if batches is not None:
            images, targets, _, _ = next(batches)
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        else:
            images, targets = fixed, fixed_targets
        if mixup is not None:
            images, targets = mixup(images, targets)
        with autocast(device, cfg["train"]["amp"]):
            loss = criterion(train_model(images), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step()
        print(f"  warm-up step {i + 1}/{warmup}", flush=True)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16], help="loader worker counts to try")
    parser.add_argument("--batch", type=int, default=256, help="per-GPU batch (the recipe: 2048 over 8 GPUs)")
    parser.add_argument("--img-size", type=int, default=192)
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--num-shards", type=int, default=64)
    parser.add_argument("--source-size", type=int, nargs=2, default=[500, 375], help="mean JPEG width height")
    parser.add_argument("--loader-batches", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (the recipe does)")
    parser.add_argument("--shards-dir", default=None, help="keep the synthetic shards here (reused when present)")
    parser.add_argument("--tiny", action="store_true", help="CPU check: small images, a small ViL, few batches")
    args = parser.parse_args()
    if args.tiny:
        args.workers, args.batch, args.img_size = [1, 2], 16, 64
        args.num_images, args.num_shards, args.source_size = 640, 4, [160, 120]
        args.loader_batches, args.steps, args.warmup = 12, 4, 2
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )

    tmp = None
    root = args.shards_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="vil_bench_shards_")
        root = tmp.name
    overrides = [
        f"data.root={root}",
        f"data.img_size={args.img_size}",
        f"train.compile={args.compile}",
        f"train.amp={'bf16' if device.type == 'cuda' else 'none'}",
        f"data.shuffle_initial={4 * args.batch}",
    ]
    if args.tiny:
        overrides += ["model.kwargs={embed_dim: 48, depth: 2}"]
    cfg = load_config(RECIPE, overrides)
    if not os.path.isfile(os.path.join(root, "_info.json")):
        print(f"writing {args.num_images} synthetic JPEGs into {args.num_shards} shards under {root} ...", flush=True)
        kb = write_shards(
            root, args.num_images, args.num_shards, distinct=min(256, args.num_images), size=tuple(args.source_size)
        )
        print(f"  mean JPEG {kb:.0f} kB", flush=True)

    rows = []
    for workers in args.workers:
        needed = (args.warmup + 4 * workers + args.loader_batches) * args.batch
        if needed > args.num_images:
            print(
                f"note: {needed} images needed per loader run, the shards hold {args.num_images}; workers re-read them"
            )
        print(f"loader with {workers} workers ...", flush=True)
        rate = loader_rate(cfg, workers, args.batch, args.loader_batches, args.warmup)
        rows.append((f"data loader, {workers} workers", rate, rate / workers))
    print(f"model-only training steps on {device} ...", flush=True)
    train = model_rate(cfg, device, args.batch, args.steps, args.warmup)
    rows.append((f"{cfg['model']['name']} train step ({device.type}, batch {args.batch})", train, None))
    best_workers = max(args.workers)
    source = resolve_shards(root, "train")
    feed = build_loader(
        cfg,
        source,
        train=True,
        batch_size=args.batch,
        num_batches=args.warmup + args.steps,
        num_workers=best_workers,
        pin_memory=device.type == "cuda",
    )
    feed.dataset.set_position(0, 0)
    print(f"loader ({best_workers} workers) feeding the model ...", flush=True)
    both = model_rate(cfg, device, args.batch, args.steps, args.warmup, loader=feed)
    rows.append((f"end to end, {best_workers} workers", both, None))

    title = f"ViL-T recipe at {args.img_size} px, {device}" + (
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    )
    print(f"\n{title}\n| what | images/s | per worker |\n|---|---:|---:|")
    for name, rate, per in rows:
        print(f"| {name} | {rate:,.0f} | {'' if per is None else f'{per:,.0f}'} |")
    per_worker = min(r[2] for r in rows if r[2] is not None)
    loader_best = max(r[1] for r in rows if r[2] is not None)
    needed = math.ceil(train / per_worker)
    if loader_best < train:
        print(
            f"\nThe data loader bounds this run: {loader_best:,.0f} images/s against {train:,.0f} for the model. "
            f"About {needed} loader workers per rank (at {per_worker:,.0f} images/s each) would keep up."
        )
    else:
        print(
            f"\nThe model bounds this run: it trains {train:,.0f} images/s, the loader delivers {loader_best:,.0f}. "
            f"{needed} loader workers per rank suffice."
        )
    # The loader-only rate leaves out the CPU the training process itself needs; end to end shows what is left.
    share = both / train
    print(
        f"End to end with {best_workers} workers: {both:,.0f} images/s, {share:.0%} of the model-only rate"
        + (": the input pipeline holds the model back in this run." if share < 0.9 else ".")
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
