"""Fashion-MNIST from the Debian package's IDX files, parsed with gzip + numpy (no torchvision).

The IDX format (LeCun et al.) is a big-endian header — two zero bytes, a dtype code (0x08 =
uint8) and the number of dimensions — followed by one uint32 per dimension and the raw data.
Images are 0x00000803 (N×28×28), labels 0x00000801 (N).

HP-FL (Itahara et al., 2020) keeps part of the training set on the server as *unlabeled* open
data (20,000 of 60,000 in the paper); :func:`split_open_data` makes that split from a seed.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedllm.config import RecipeError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
NUM_CLASSES = 10


@dataclass(frozen=True)
class VisionData:
    """Images as float32 [N, 1, 28, 28] in [0, 1], labels as int64 [N].

    The tensors are shared by every caller of :func:`load_fashion_mnist` (it caches); treat them
    as read-only and index or clone before modifying.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


REINSTALL = "reinstall it (apt-get install --reinstall dataset-fashion-mnist) or fix data.root"


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one gzipped IDX file, checking its magic number and that its size matches the header.

    A file that is not gzip, is cut short or disagrees with its header is a one-line RecipeError
    naming it (these files are the user's: fedllm cannot rebuild them).
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut stream an EOFError
        raise RecipeError(str(path), f"not a complete gzip file ({type(exc).__name__}: {exc}); "
                          f"{REINSTALL}") from None
    if len(raw) < 8:
        raise RecipeError(str(path), f"too short for an IDX header ({len(raw)} bytes); {REINSTALL}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise RecipeError(str(path), f"IDX magic number {found:#010x}, expected {magic:#010x}; {REINSTALL}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise RecipeError(str(path), f"header says {dims} ({expected} bytes), file has {len(raw) - offset}; "
                          f"{REINSTALL}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _file(root: Path, key: str) -> Path:
    path = root / FILES[key]
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} is missing; install the Debian package with "
            f"`apt-get install dataset-fashion-mnist` (or pass root= a folder holding {FILES[key]})")
    return path


@functools.lru_cache(maxsize=4)
def _load(root: Path) -> VisionData:
    arrays = {}
    for key in FILES:
        magic = IMAGES_MAGIC if key.endswith("_x") else LABELS_MAGIC
        arrays[key] = read_idx(_file(root, key), magic)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        where = f"{root / FILES[split + '_x']}, {FILES[split + '_y']}"
        if x.shape[0] != y.shape[0]:
            raise RecipeError(where, f"{x.shape[0]} images but {y.shape[0]} labels; {REINSTALL}")
        if x.shape[1:] != (28, 28):
            raise RecipeError(where, f"image shape {x.shape[1:]}, expected (28, 28); {REINSTALL}")
        if y.size and int(y.max()) >= NUM_CLASSES:
            raise RecipeError(where, f"label {int(y.max())} outside 0..{NUM_CLASSES - 1}; {REINSTALL}")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return VisionData(images(arrays["train_x"]), labels(arrays["train_y"]),
                      images(arrays["test_x"]), labels(arrays["test_y"]))


def load_fashion_mnist(root: str | Path = DEFAULT_ROOT) -> VisionData:
    """Fashion-MNIST train (60k) and test (10k) splits; parsed once per process and root."""
    return _load(Path(root).expanduser().resolve())


def split_open_data(data: VisionData, n_open: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the training indices into (labeled client data, unlabeled server open data).

    Returns two sorted int64 arrays that partition ``range(len(data.train_y))``; the second has
    ``n_open`` indices drawn uniformly without replacement from ``seed``.
    """
    n = len(data.train_y)
    if not 0 <= n_open <= n:
        raise ValueError(f"n_open must be in [0, {n}] (the training set size), got {n_open}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_open:]).astype(np.int64), np.sort(perm[:n_open]).astype(np.int64)
