"""Fashion-MNIST from the idx ``.gz`` files that Debian's ``dataset-fashion-mnist`` installs.

The directory is chosen, first match wins, from: the ``data_dir`` argument, the environment
variable ``DIFFQUANT_DATA_DIR``, then Debian's location ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DIFFQUANT_DATA_DIR"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
# idx type codes (third byte of the magic number) -> numpy dtype, big-endian as the format says
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_HOW_TO_GET = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_DIR}), or point diffquant at a directory holding the four idx .gz files with "
    f"--data-dir DIR or the environment variable {ENV_VAR}=DIR."
)


class DataNotFoundError(RuntimeError):
    """The Fashion-MNIST files are missing or unreadable; the message says how to fix it."""


def default_data_dir() -> Path:
    """The directory used when none is given: ``$DIFFQUANT_DATA_DIR`` or Debian's location."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEBIAN_DIR


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into a numpy array.

    Format (LeCun's MNIST page): magic ``0x0000 TT DD`` (TT = element type, DD = number of
    dimensions), then DD big-endian uint32 sizes, then the data, row-major.

    Raises:
        DataNotFoundError: if the file is missing, truncated or not an idx file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"Fashion-MNIST file not found: {path}. {_HOW_TO_GET}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on truncated or non-gzip input
        raise DataNotFoundError(f"Cannot read {path} ({e}); the file looks corrupt. {_HOW_TO_GET}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataNotFoundError(f"{path} is not an idx file (bad magic number). {_HOW_TO_GET}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataNotFoundError(f"{path} is truncated (header incomplete). {_HOW_TO_GET}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataNotFoundError(
            f"{path} holds {len(raw) - header} data bytes, its header promises {expected}: "
            f"the file is truncated or corrupt. {_HOW_TO_GET}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None):
    """Load a Fashion-MNIST split as tensors.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        data_dir: directory with the idx ``.gz`` files; default :func:`default_data_dir`.

    Returns:
        ``(images, labels)``: ``uint8`` tensor ``(N, 1, 28, 28)`` and ``int64`` tensor ``(N,)``.

    Example:
        >>> images, labels = load_fashion_mnist("test")  # doctest: +SKIP
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if not root.is_dir():
        raise DataNotFoundError(f"Fashion-MNIST directory not found: {root}. {_HOW_TO_GET}")
    img_name, lbl_name, _ = _FILES[split]
    images = read_idx(root / img_name)
    labels = read_idx(root / lbl_name)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataNotFoundError(f"{root}: images {images.shape} and labels {labels.shape} do not match. {_HOW_TO_GET}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataNotFoundError(f"{root / lbl_name}: labels outside 0..9. {_HOW_TO_GET}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the diffusion models work in."""
    return images_u8.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
