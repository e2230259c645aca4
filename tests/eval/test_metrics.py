import math

import pytest
import torch

from diffquant.eval.metrics import PSNR_CAP_DB, class_consistency, psnr, sqnr


def test_psnr_known_value():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.2)  # MSE 0.04 on a range of 2: 10 log10(4 / 0.04) = 20 dB
    assert psnr(a, b) == pytest.approx(20.0, rel=1e-6)  # 0.2 is not exact in float32


def test_psnr_identical_is_capped():
    a = torch.randn(3, 1, 4, 4)
    assert psnr(a, a.clone()) == PSNR_CAP_DB


def test_psnr_shape_mismatch():
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))


def test_sqnr_known_value():
    ref = torch.ones(1000, dtype=torch.float64)
    assert sqnr(ref, ref * 1.1) == pytest.approx(20.0, rel=1e-9)  # noise power 0.01
    assert sqnr(ref, ref) == math.inf


def test_class_consistency_counts_hits():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x.flatten(1)[:, 0].long(), 10).float()

    images = torch.tensor([0, 1, 2, 3], dtype=torch.float).view(4, 1, 1, 1)
    labels = torch.tensor([0, 1, 9, 3])
    assert class_consistency(Fixed(), images, labels, batch_size=3) == 0.75
