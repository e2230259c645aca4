"""The built-in denoisers: diffusers modules behind one call signature ``model(x, t, class_labels)``.

Every denoiser here predicts the noise ``eps`` of ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``
(DDPM, Ho et al. 2020). Class label ``num_classes`` is the "no class" label used for
classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FashionUNet(nn.Module):
    """Class-conditional pixel-space UNet (a diffusers ``UNet2DModel``) for 28x28 images.

    The image is pixel-unshuffled (28x28x1 -> 14x14x4) so the UNet body runs at 14x14 and 7x7,
    about four times cheaper than at full resolution; attention sits in the 7x7 blocks.

    Args:
        unet: keyword arguments of ``diffusers.UNet2DModel``.
        pixel_unshuffle: space-to-depth factor applied before the UNet (1 disables it).
        num_classes: number of real classes; label ``num_classes`` means "unconditional".
        sample_shape: ``(C, H, W)`` of one image.
    """

    def __init__(self, unet: dict, pixel_unshuffle: int = 2, num_classes: int = 10, sample_shape=(1, 28, 28)):
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(**unet)
        self.pixel_unshuffle = pixel_unshuffle
        self.num_classes = num_classes
        self.sample_shape = tuple(sample_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        r = self.pixel_unshuffle
        h = F.pixel_unshuffle(x, r) if r > 1 else x
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        out = self.unet(h, t, class_labels=class_labels).sample
        return F.pixel_shuffle(out, r) if r > 1 else out


class FashionDiT(nn.Module):
    """Class-conditional diffusion transformer (a diffusers ``DiTTransformer2DModel``, adaLN-zero).

    Args:
        dit: keyword arguments of ``diffusers.DiTTransformer2DModel``; ``num_embeds_ada_norm`` is
            the number of classes (diffusers adds the "no class" row itself).
        num_classes: number of real classes; label ``num_classes`` means "unconditional".
        sample_shape: ``(C, H, W)`` of one image.
    """

    def __init__(self, dit: dict, num_classes: int = 10, sample_shape=(1, 28, 28)):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.dit = DiTTransformer2DModel(**dit)
        self.num_classes = num_classes
        self.sample_shape = tuple(sample_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.dit(x, timestep=t, class_labels=class_labels).sample
