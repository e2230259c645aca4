"""Transformer denoisers beyond DiT (PixArt, SD3, Flux), tiny random configs: quantized modules run close to FP."""

import copy

import pytest
import torch

import diffquant
from diffquant.eval.metrics import sqnr
from diffquant.nn import QuantModule


def _pixart():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=16, norm_num_groups=1,
    )  # fmt: skip
    return model, lambda b: dict(
        hidden_states=torch.randn(b, 4, 8, 8), encoder_hidden_states=torch.randn(b, 5, 16),
        timestep=torch.full((b,), 500), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )  # fmt: skip


def _sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16,
    )  # fmt: skip
    return model, lambda b: dict(
        hidden_states=torch.randn(b, 4, 8, 8), encoder_hidden_states=torch.randn(b, 5, 16),
        pooled_projections=torch.randn(b, 8), timestep=torch.full((b,), 500.0),
    )  # fmt: skip


def _flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    return model, lambda b: dict(
        hidden_states=torch.randn(b, 16, 4), encoder_hidden_states=torch.randn(b, 5, 16),
        pooled_projections=torch.randn(b, 8), timestep=torch.full((b,), 0.5), img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(5, 3),
    )  # fmt: skip


# (builder, standard attention modules quantized: PixArt's self and cross attention; SD3 and Flux use
# joint attention processors, which stay in float)
CASES = {"pixart": (_pixart, 4), "sd3": (_sd3, 0), "flux": (_flux, 0)}


@pytest.mark.parametrize("name", list(CASES))
def test_transformer_denoiser_quantizes_and_stays_close(name):
    build, attention = CASES[name]
    torch.manual_seed(0)
    model, inputs = build()
    fp = copy.deepcopy(model).eval()
    kwargs = inputs(2)
    q = diffquant.quantize(model, "w8a8-dynamic", progress=False)
    with torch.no_grad():
        ref, out = fp(**kwargs).sample, q(**kwargs).sample
    layers = [m for m in q.modules() if isinstance(m, QuantModule)]
    assert len(layers) >= 20
    assert sum(hasattr(m, "quant_matmuls") for m in q.modules()) == attention
    # 8-bit dynamic activations, 8-bit weights on random tiny nets: measured 43-46 dB
    assert sqnr(ref, out) > 35
    assert not torch.equal(ref, out)
