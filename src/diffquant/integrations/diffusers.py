"""diffusers integration: attention matmul quantization and UNet skip-concat splits.

- Attention: every ``diffusers`` ``Attention`` whose processor is the standard scaled-dot-product
  one gets :class:`QuantAttnProcessor`, which computes the same attention with explicit matmuls
  through a :class:`~diffquant.nn.attention.QuantAttentionMatmuls` attached to the module as
  ``attn.quant_matmuls`` (so its scales are in ``state_dict``).
- Shortcut split (Q-Diffusion, Li et al. 2023): in the UNet decoder each resnet's input is
  ``cat([hidden, skip])``, two tensors with very different ranges; the input convolutions of that
  resnet (``conv1`` and ``conv_shortcut``) get one scale per part. The split point is computed from
  the UNet's structure, the way ``UNet2DModel.forward`` pops skip tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.nn.attention import QuantAttentionMatmuls


def _is_unet(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("down_blocks", "up_blocks", "conv_in")) and hasattr(m.conv_in, "out_channels")


def shortcut_splits(model: nn.Module) -> dict[str, int]:
    """``{qualified name of a decoder conv: channels of the first (non-skip) part}`` for every UNet in ``model``.

    The split applies to ``conv1`` (after GroupNorm and SiLU, which keep the channel order) and to
    ``conv_shortcut`` of each decoder resnet.
    """
    splits: dict[str, int] = {}
    for prefix, unet in model.named_modules():
        if not _is_unet(unet):
            continue
        skips = [unet.conv_in.out_channels]
        for block in unet.down_blocks:
            skips += [r.out_channels for r in block.resnets]
            if getattr(block, "downsamplers", None):
                skips += [d.out_channels for d in block.downsamplers]
        for b, block in enumerate(unet.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            for i, resnet in enumerate(block.resnets):
                skip_ch = res[-(i + 1)]
                first = resnet.in_channels - skip_ch
                if first <= 0:
                    raise ValueError(f"unexpected UNet layout at up_blocks.{b}.resnets.{i}")
                base = f"{prefix}.up_blocks.{b}.resnets.{i}".lstrip(".")
                splits[f"{base}.conv1"] = first
                if getattr(resnet, "conv_shortcut", None) is not None:
                    splits[f"{base}.conv_shortcut"] = first
    return splits


class QuantAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with the two matmuls done by ``attn.quant_matmuls``: quantized
    (:class:`~diffquant.nn.attention.QuantAttentionMatmuls`) or a backend's attention kernel
    (:func:`set_attention_matmuls`)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                ~attention_mask, -torch.inf
            )
        hidden_states = attn.quant_matmuls(query, key, value, attn.scale, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


_SUPPORTED_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "QuantAttnProcessor")


def quantize_attention(model: nn.Module, make, make_softmax, include=lambda name: True) -> list[str]:
    """Give every standard diffusers ``Attention`` in ``model`` quantized matmuls.

    Args:
        make: ``make(name, role) -> ActQuantizer`` for role ``q``, ``k``, ``v``.
        make_softmax: ``make_softmax(name) -> ActQuantizer | None``.
        include: ``include(name) -> bool`` filters modules (exclusions).

    Returns:
        Qualified names of the attention modules changed. Attention with another processor
        (joint attention of SD3/Flux, for example) is left in float and not listed.
    """

    def matmuls(name):
        return QuantAttentionMatmuls(lambda role: make(name, role), lambda: make_softmax(name))

    return set_attention_matmuls(model, matmuls, include)


def set_attention_matmuls(model: nn.Module, make, include=lambda name: True) -> list[str]:
    """Give every standard diffusers ``Attention`` of ``model`` that ``include(name)`` accepts the module
    ``make(name)`` for its two matmuls (called as ``m(q, k, v, scale, mask)``), through
    :class:`QuantAttnProcessor`: quantized matmuls (:func:`quantize_attention`) or a backend's kernel.

    Returns:
        Qualified names of the attention modules changed; attention with another processor is left alone.
    """
    from diffusers.models.attention_processor import Attention

    done = []
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or not include(name):
            continue
        if type(module.processor).__name__ not in _SUPPORTED_PROCESSORS:
            continue
        module.quant_matmuls = make(name)
        module.set_processor(QuantAttnProcessor())
        done.append(name)
    return done


def reference_attention(q, k, v, scale, mask=None):
    """The float reference for a quantized attention's matmuls (scaled dot-product attention)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
