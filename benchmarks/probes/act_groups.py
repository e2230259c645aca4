"""Probe-only activation variants the library does not have, patched into its dynamic fake quant.

    from act_groups import SETTINGS, install
    install()                       # once: diffquant's dynamic fake quant now reads SETTINGS
    SETTINGS["group"] = 16          # per-token scales per group of 16 channels of each token
    SETTINGS["clip"] = 0.9          # per-token ranges shrunk to 90 % (values beyond clamp)

A layer whose channels the group size does not divide keeps one scale per token. Used by
``a4_granularity.py`` and ``finetune.py`` (``+act_group=16``).
"""

from diffquant import primitives as P

SETTINGS = {"group": 0, "clip": 1.0}
_plain = P.dynamic_fake_quant


def patched_dynamic_fake_quant(x, qtype, granularity="token", symmetric=True, channel_dim=-1):
    """``dynamic_fake_quant`` with the variant in :data:`SETTINGS` (the plain one when it is off)."""
    if granularity != "token":
        return _plain(x, qtype, granularity, symmetric, channel_dim)
    if SETTINGS["clip"] != 1.0:
        lo, hi = P.dynamic_range(x, granularity, channel_dim)
        scale, zero_point = P.scale_from_range(lo * SETTINGS["clip"], hi * SETTINGS["clip"], qtype, symmetric)
        return P.fake_quant(x, qtype, scale.to(x.dtype), zero_point.to(x.dtype), symmetric)
    g, c = SETTINGS["group"], x.shape[channel_dim]
    if not g or c % g:
        return _plain(x, qtype, granularity, symmetric, channel_dim)
    xt = x.movedim(channel_dim, -1)
    y = _plain(xt.reshape(*xt.shape[:-1], c // g, g), qtype, "token", symmetric, -1)
    return y.reshape(xt.shape).movedim(-1, channel_dim)


def install() -> None:
    """Route diffquant's dynamic fake quant (the activation quantizers call it as ``P.dynamic_fake_quant``)
    through :func:`patched_dynamic_fake_quant`."""
    P.dynamic_fake_quant = patched_dynamic_fake_quant
