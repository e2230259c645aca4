"""The FP images the probes compare with: a built-in model sampled with the PTQ table's protocol
(DDIM-50, seed 0, balanced classes), cached beside this file (``.fp_MODEL_N.pt``, not committed)."""

from pathlib import Path

import torch

from diffquant.models import load_builtin
from diffquant.sampling import sample


def fp_images(model_name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of ``n`` FP samples of ``model_name``."""
    cache = Path(__file__).parent / f".fp_{model_name}_{n}.pt"
    if cache.exists():
        return torch.load(cache)
    images, labels = sample(load_builtin(model_name), n=n, steps=50, sampler="ddim", seed=0, progress=False)
    torch.save((images, labels), cache)
    return images, labels
