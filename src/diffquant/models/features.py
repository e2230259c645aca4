"""``fashion-features``: the Fashion-MNIST classifier whose features define FD and class consistency."""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FeatureNet(nn.Module):
    """A small VGG-style CNN: 28x28 -> 14x14 -> 7x7 -> global pool -> ``feature_dim`` -> classes.

    Input is an image batch in ``[-1, 1]`` of shape ``(N, 1, 28, 28)``. :meth:`features` returns the
    penultimate activations (the space FD is measured in, like Inception's pool3 for FID);
    :meth:`forward` returns class logits.
    """

    def __init__(self, channels=(32, 64, 128), feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            _block(1, c1),
            nn.MaxPool2d(2),
            _block(c1, c2),
            nn.MaxPool2d(2),
            _block(c2, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(c3, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape ``(N, feature_dim)``."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
