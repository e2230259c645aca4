"""Shared fixtures: tiny models built from configs (no download, no shipped weights needed)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from hypothesis import settings

from diffquant.models.builtin import build_model, load_config

# property tests draw the same examples on every run and machine: a red CI is reproducible
settings.register_profile("diffquant", derandomize=True, deadline=None)
settings.load_profile("diffquant")

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}


def tiny_config(kind: str) -> dict:
    """A shrunken copy of a built-in config: same code path, a fraction of the compute."""
    name = {"unet": "fashion-unet", "dit": "fashion-dit", "features": "fashion-features"}[kind]
    cfg = load_config(name)
    if kind == "unet":
        cfg["model"]["unet"].update(block_out_channels=[16, 32], norm_num_groups=8, attention_head_dim=8)
    elif kind == "dit":
        cfg["model"]["dit"].update(num_attention_heads=2, attention_head_dim=8, num_layers=1)
    else:
        cfg["model"].update(channels=[4, 8, 8], feature_dim=8)
    return cfg


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(kind)
    model = build_model(cfg).eval()
    model.config = cfg
    return model


class GaussianDenoiser(torch.nn.Module):
    """The exact noise predictor for data ~ N(0, sigma_data^2 I) (no training needed).

    ``eps(x_t) = sqrt(1 - a) x_t / (a sigma^2 + 1 - a)``; samples are N(0, sigma^2), so images
    depend on the seed, unlike an untrained network whose samples all saturate at +-1.
    """

    def __init__(self, sigma_data: float = 0.4):
        super().__init__()
        self.config = {"scheduler": SCHEDULE}
        self.num_classes = 10
        self.sample_shape = (1, 28, 28)
        self.sigma_data = sigma_data
        from diffusers import DDPMScheduler

        self.register_buffer("alphas_cumprod", DDPMScheduler(**SCHEDULE).alphas_cumprod.float())

    def forward(self, x, t, class_labels=None):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * self.sigma_data**2 + 1 - a)


@pytest.fixture(params=["unet", "dit"])
def tiny_denoiser(request):
    return tiny_model(request.param)


def write_idx(path, array: np.ndarray) -> None:
    """Write an idx file (gzip when the name ends in .gz), big-endian as the format says."""
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


@pytest.fixture
def fake_fashion_dir(tmp_path):
    """A directory with small, valid Fashion-MNIST idx files (train 64, test 32 images)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return tmp_path
