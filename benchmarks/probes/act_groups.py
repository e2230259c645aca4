"""Probe-only activation variant the library does not have, patched into its dynamic fake quant.

    from act_groups import SETTINGS, install
    install()                       # once: diffquant's dynamic fake quant now reads SETTINGS
    SETTINGS["clip"] = 0.9          # per-token ranges shrunk to 90 % (values beyond clamp)

Used by ``a4_granularity.py``. (Per-group scales began here as a probe; they are the library's
``act_granularity="group"`` now.)
"""

from diffquant import primitives as P

SETTINGS = {"clip": 1.0}
_plain = P.dynamic_fake_quant


def patched_dynamic_fake_quant(x, qtype, granularity="token", symmetric=True, channel_dim=-1, group_size=0):
    """``dynamic_fake_quant`` with the variant in :data:`SETTINGS` (the plain one when it is off)."""
    if granularity != "token" or SETTINGS["clip"] == 1.0:
        return _plain(x, qtype, granularity, symmetric, channel_dim, group_size)
    lo, hi = P.dynamic_range(x, granularity, channel_dim)
    scale, zero_point = P.scale_from_range(lo * SETTINGS["clip"], hi * SETTINGS["clip"], qtype, symmetric)
    return P.fake_quant(x, qtype, scale.to(x.dtype), zero_point.to(x.dtype), symmetric)


def install() -> None:
    """Route diffquant's dynamic fake quant (the activation quantizers call it as ``P.dynamic_fake_quant``)
    through :func:`patched_dynamic_fake_quant`."""
    P.dynamic_fake_quant = patched_dynamic_fake_quant
