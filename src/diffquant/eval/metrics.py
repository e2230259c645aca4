"""Image and tensor fidelity metrics: PSNR, SQNR, class consistency."""

from __future__ import annotations

import math

import torch

PSNR_CAP_DB = 100.0  # identical images would give +inf; capping keeps JSON valid and means stable


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """``10 log10(range^2 / MSE)`` per image (float64), capped at :data:`PSNR_CAP_DB`."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    floor = data_range**2 / 10 ** (PSNR_CAP_DB / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over images of ``10 log10(range^2 / MSE)``; images in ``[-1, 1]`` (range 2).

    Each image's PSNR is capped at :data:`PSNR_CAP_DB` (reached when MSE is ~0).
    """
    return float(psnr_per_image(a, b, data_range).mean())


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - test)^2)``.

    Returns ``inf`` when the two are identical.
    """
    ref = reference.detach().double()
    noise = (ref - test.detach().double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


@torch.no_grad()
def class_consistency(classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Share of images that ``classifier`` assigns to their conditioning label."""
    hits = 0
    for lo in range(0, images.shape[0], batch_size):
        pred = classifier(images[lo : lo + batch_size]).argmax(1)
        hits += int((pred == labels[lo : lo + batch_size]).sum())
    return hits / max(1, images.shape[0])
