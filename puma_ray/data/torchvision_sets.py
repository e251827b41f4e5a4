"""CIFAR-10, CIFAR-100 and SVHN through torchvision, as uint8 NHWC arrays.

These sets are small (<= 73k rows, ~230 MB), and torchvision loads them whole anyway, so they are
held in memory while ingesting. Nothing is downloaded unless the source says `download: true`;
without the files, one DataError says where to put them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from puma_ray.config import TorchvisionSource
from puma_ray.errors import DataError

# Where torchvision looks under `root`, and where the files come from.
EXPECTED_FILES = {
    "cifar10": (
        "cifar-10-batches-py/ (unpacked from cifar-10-python.tar.gz, "
        "https://www.cs.toronto.edu/~kriz/cifar.html)"
    ),
    "cifar100": (
        "cifar-100-python/ (unpacked from cifar-100-python.tar.gz, "
        "https://www.cs.toronto.edu/~kriz/cifar.html)"
    ),
    "svhn": ("train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/)"),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
IMAGE_SHAPE = (32, 32, 3)


@dataclass
class TorchvisionArrays:
    name: str
    split: str
    images: np.ndarray  # uint8 [n, 32, 32, 3]
    labels: np.ndarray  # int64 [n]
    class_names: list[str]

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.num_rows, chunk_rows):
            sl = slice(start, start + chunk_rows)
            yield self.images[sl], self.labels[sl]


def root_dir(src: TorchvisionSource) -> str:
    return os.path.abspath(os.path.expanduser(src.root))


def load(src: TorchvisionSource, split: Literal["train", "test"]) -> TorchvisionArrays:
    """Load one split (first `limit_train` / `limit_test` rows) as uint8 HWC arrays."""
    root = root_dir(src)
    try:
        ds = _dataset(src.name, root, split, src.download)
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise DataError(f"{root}: torchvision {src.name} {split}: {e}") from None
        hint = (
            "the download did not produce them"
            if src.download
            else "set `download: true` on this source to fetch them"
        )
        raise DataError(
            f"{root}: {src.name} {split} files not found; put {EXPECTED_FILES[src.name]} "
            f"in that directory, or {hint}"
        ) from None
    except OSError as e:  # network errors during a download
        raise DataError(f"{root}: downloading {src.name} failed ({e})") from None
    except ImportError as e:  # SVHN reads .mat files with scipy
        raise DataError(f"{src.name} needs an extra package: {e}") from None

    if src.name == "svhn":
        images = np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1))  # stored NCHW
        labels = np.asarray(ds.labels, np.int64)  # torchvision already maps '10' to 0
        class_names = [str(i) for i in range(10)]
    else:
        images = np.asarray(ds.data, np.uint8)
        labels = np.asarray(ds.targets, np.int64)
        class_names = list(ds.classes)
    limit = src.limit_train if split == "train" else src.limit_test
    if limit:
        images, labels = images[:limit], labels[:limit]
    return TorchvisionArrays(src.name, split, images, labels, class_names)


def _dataset(name: str, root: str, split: str, download: bool):
    from torchvision import datasets

    if name == "cifar10":
        return datasets.CIFAR10(root, train=split == "train", download=download)
    if name == "cifar100":
        return datasets.CIFAR100(root, train=split == "train", download=download)
    if name == "svhn":
        return datasets.SVHN(root, split=split, download=download)
    raise ValueError(f"unknown torchvision dataset {name!r}")
