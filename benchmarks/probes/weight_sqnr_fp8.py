"""Probe: SQNR of the built-in models' weights on a per-channel int8 grid vs per-channel FP8 E4M3.

Round to nearest, absmax scales (int8: amax / 127; E4M3: amax / 448, cast to ``float8_e4m3fn``), every
weight with two or more dims, SQNR over the whole model. Printed; quoted in docs/quantization.md:

    python benchmarks/probes/weight_sqnr_fp8.py
    fashion-dit   int8 44.2 dB   e4m3 31.7 dB
    fashion-unet  int8 42.6 dB   e4m3 31.6 dB
"""

import math

import torch

from diffquant.models import load_builtin

for name in ("fashion-dit", "fashion-unet"):
    err8 = err_fp8 = energy = 0.0
    for pname, p in load_builtin(name).named_parameters():
        if p.dim() < 2 or "weight" not in pname:
            continue
        w = p.detach().float().reshape(p.shape[0], -1)
        amax = w.abs().amax(1, keepdim=True).clamp_min(1e-12)
        int8 = (w / (amax / 127)).round().clamp(-127, 127) * (amax / 127)
        fp8 = (w / (amax / 448)).to(torch.float8_e4m3fn).float() * (amax / 448)
        energy += w.pow(2).sum().item()
        err8 += (w - int8).pow(2).sum().item()
        err_fp8 += (w - fp8).pow(2).sum().item()
    print(f"{name:13s} int8 {10 * math.log10(energy / err8):.1f} dB   e4m3 {10 * math.log10(energy / err_fp8):.1f} dB")
