"""Probe-only activation variant the library does not have, patched into its dynamic fake quant.

    from act_groups import SETTINGS, install
    install()                       # once: diffquant's dynamic fake quant now reads SETTINGS
    SETTINGS["clip"] = 0.9          # per-token ranges shrunk to 90 % (values beyond clamp)
    SETTINGS["fp4"] = True          # 4-bit per-group activations as FP4 E2M1 (NVFP4-style) instead of INT4

Used by ``a4_granularity.py``. (Per-group scales began here as a probe; they are the library's
``act_granularity="group"`` now.)
"""

import torch

from diffquant import primitives as P

SETTINGS = {"clip": 1.0, "fp4": False}
_plain = P.dynamic_fake_quant


def e2m1(x):
    """Round to FP4 E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; nearest, beyond 6 clamped)."""
    a = x.abs().clamp(max=6.0)
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.sign(x) * q


def fp4_group_fake_quant(x, channel_dim, group_size):
    """NVFP4-style activations: one scale per token and per ``group_size`` channels, ``amax / 6``,
    values rounded to E2M1 (the scale kept in float here, NVFP4 stores it as FP8)."""
    xt = x.movedim(channel_dim, -1)
    c = xt.shape[-1]
    pad = -c % group_size
    if pad:
        xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], pad)], -1)
    g = xt.reshape(*xt.shape[:-1], -1, group_size)
    scale = (g.abs().amax(-1, keepdim=True) / 6).clamp_min(1e-12)
    y = (e2m1(g / scale) * scale).reshape(*xt.shape[:-1], c + pad)[..., :c]
    return y.movedim(-1, channel_dim)


def patched_dynamic_fake_quant(x, qtype, granularity="token", symmetric=True, channel_dim=-1, group_size=0):
    """``dynamic_fake_quant`` with the variant in :data:`SETTINGS` (the plain one when it is off)."""
    if SETTINGS["fp4"] and granularity == "group" and qtype.bits == 4:
        return x + (fp4_group_fake_quant(x, channel_dim, group_size) - x).detach()
    if granularity != "token" or SETTINGS["clip"] == 1.0:
        return _plain(x, qtype, granularity, symmetric, channel_dim, group_size)
    lo, hi = P.dynamic_range(x, granularity, channel_dim)
    scale, zero_point = P.scale_from_range(lo * SETTINGS["clip"], hi * SETTINGS["clip"], qtype, symmetric)
    return P.fake_quant(x, qtype, scale.to(x.dtype), zero_point.to(x.dtype), symmetric)


def install() -> None:
    """Route diffquant's dynamic fake quant (the activation quantizers call it as ``P.dynamic_fake_quant``)
    through :func:`patched_dynamic_fake_quant`."""
    P.dynamic_fake_quant = patched_dynamic_fake_quant
