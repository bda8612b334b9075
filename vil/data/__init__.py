"""Data loading: webdataset shards (local or ``pipe:`` URLs), ImageFolder trees, the offline MNIST demo data."""

from .folder import FolderIndex, FolderStream, scan_image_folder
from .loader import build_loader, open_split, prepare_data
from .make_shards import convert_image_folder
from .mnist import load_mnist5k, prepare_mnist5k
from .shards import (
    AtomicShardWriter,
    DataError,
    ShardSet,
    ShardStream,
    assign_shards,
    iter_shard,
    read_info,
    resolve_shards,
    write_info,
)
from .transforms import DecodeSample, build_transform

__all__ = [
    "AtomicShardWriter",
    "DataError",
    "DecodeSample",
    "FolderIndex",
    "FolderStream",
    "ShardSet",
    "ShardStream",
    "assign_shards",
    "build_loader",
    "build_transform",
    "convert_image_folder",
    "iter_shard",
    "load_mnist5k",
    "open_split",
    "prepare_data",
    "prepare_mnist5k",
    "read_info",
    "resolve_shards",
    "scan_image_folder",
    "write_info",
]
