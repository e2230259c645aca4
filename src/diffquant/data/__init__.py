"""Data sets used by diffquant's built-in models and evaluation."""

from diffquant.data.fashion_mnist import (
    CLASS_NAMES,
    DataNotFoundError,
    default_data_dir,
    load_fashion_mnist,
    read_idx,
)

__all__ = ["CLASS_NAMES", "DataNotFoundError", "default_data_dir", "load_fashion_mnist", "read_idx"]
