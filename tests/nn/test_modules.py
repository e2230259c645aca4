"""Quantized modules against their float reference path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffquant import primitives as P
from diffquant.eval.metrics import sqnr
from diffquant.nn import ActQuantizer, QuantAttentionMatmuls, QuantConv2d, QuantLinear
from diffquant.nn.quantizer import nearest_bucket_table
from diffquant.qtypes import int4, int8
from diffquant.timestep import denoising_step


def _static(x, qtype=int8, channel_dim=-1, symmetric=False):
    q = ActQuantizer(qtype, "static", symmetric=symmetric, channel_dim=channel_dim)
    scale, zp = P.scale_from_range(x.min(), x.max(), qtype, symmetric)
    q.scale[0], q.zero_point[0] = scale, zp
    q.mark_calibrated()
    return q


def test_quant_linear_equals_reference_formula():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    q = QuantLinear.from_float(lin, int8, None, _static(x))
    scale, zp = P.scale_from_range(x.min(), x.max(), int8, False)
    expected = F.linear(P.fake_quant(x, int8, scale, zp, False), P.fake_quant_weight(lin.weight, int8), lin.bias)
    assert torch.allclose(q(x), expected, atol=1e-6)
    assert sqnr(lin(x), q(x)) > 30


def test_quant_conv_equals_reference_formula_and_keeps_geometry():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 8, 9, 9)
    q = QuantConv2d.from_float(conv, int4, 32, _static(x, channel_dim=1))
    scale, zp = P.scale_from_range(x.min(), x.max(), int8, False)
    w = P.fake_quant_weight(conv.weight, int4, 32)
    expected = F.conv2d(P.fake_quant(x, int8, scale, zp, False), w, conv.bias, 2, 1)
    assert torch.allclose(q(x), expected, atol=1e-5)


def test_weight_only_and_disabled_paths_are_float():
    lin = nn.Linear(8, 8)
    x = torch.randn(3, 8)
    q = QuantLinear.from_float(lin, None, None, None)
    assert torch.equal(q(x), lin(x))


def test_freeze_stores_integers_and_keeps_outputs():
    torch.manual_seed(2)
    for qtype, group, dtype in [(int8, None, torch.int8), (int4, 16, torch.uint8)]:
        conv = nn.Conv2d(16, 8, 3, padding=1)
        q = QuantConv2d.from_float(conv, qtype, group, None)
        x = torch.randn(1, 16, 5, 5)
        before = q(x)
        q.freeze()
        assert "weight" not in dict(q.named_parameters()) and q.qweight.dtype == dtype
        assert torch.allclose(q(x), before, atol=1e-6)
        # int8: 1 byte + fp32 scale per channel; int4 group 16: half a byte + 4/16 byte of scale
        assert q.weight_bytes() < conv.weight.numel() * 4 / (3 if qtype is int8 else 5)


def test_static_output_equals_dynamic_output_given_the_same_scales():
    x = torch.randn(4, 32) * 3
    static = _static(x, symmetric=True)
    dynamic = ActQuantizer(int8, "dynamic", "tensor", symmetric=True)
    assert torch.equal(static(x), dynamic(x))


def test_per_token_dynamic_on_conv_input_uses_channels():
    x = torch.randn(2, 8, 4, 4)
    x[:, :, 0, 0] *= 100
    q = ActQuantizer(int8, "dynamic", "token", channel_dim=1, symmetric=True)
    per_tensor = ActQuantizer(int8, "dynamic", "tensor", symmetric=True)
    assert sqnr(x[:, :, 1:, 1:], q(x)[:, :, 1:, 1:]) > sqnr(x[:, :, 1:, 1:], per_tensor(x)[:, :, 1:, 1:]) + 10


def test_input_split_quantizes_the_two_parts_separately():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 4, 1)
    x = torch.cat([torch.randn(1, 4, 3, 3) * 0.01, torch.randn(1, 4, 3, 3) * 10], 1)
    q_split = QuantConv2d.from_float(
        conv,
        None,
        None,
        _static(x[:, :4], channel_dim=1),
        input_split=4,
        input_quantizer_2=_static(x[:, 4:], channel_dim=1),
    )
    q_joint = QuantConv2d.from_float(conv, None, None, _static(x, channel_dim=1))
    small = slice(0, 4)  # the quiet part keeps its precision only with its own scale
    split_db = sqnr(x[:, small], q_split.quantize_input(x, 1)[:, small])
    joint_db = sqnr(x[:, small], q_joint.quantize_input(x, 1)[:, small])
    assert split_db > joint_db + 20
    assert torch.equal(q_split(x), F.conv2d(q_split.quantize_input(x, 1), conv.weight, conv.bias))


def test_bucketed_lookup_uses_the_current_step():
    q = ActQuantizer(int8, "bucketed", buckets=2, num_timesteps=1000)
    q.scale.copy_(torch.tensor([0.1, 0.001]))
    q.bucket_of_t.copy_(nearest_bucket_table([[999, 800], [200, 0]], 1000))
    q.mark_calibrated()
    x = torch.tensor([0.07])
    with denoising_step(0, 999, 2):
        noisy = q(x).item()
    with denoising_step(1, 0, 2):
        clean = q(x).item()
    assert noisy == pytest.approx(0.1) and clean == pytest.approx(0.07)
    for t in range(0, 1000, 25):  # every step takes its own bucket's scale, near the boundary (t = 500) too
        with denoising_step(0, t, 2):
            assert q(x).item() == pytest.approx(0.1 if t >= 500 else 0.07), t  # a tie goes to the noisier
    with pytest.raises(RuntimeError, match="no current time step"):
        q(x)


def test_nearest_bucket_table():
    table = nearest_bucket_table([[999, 900], [500], [100, 0]], 1000)
    assert table[999] == 0 and table[699] == 1 and table[299] == 2 and table[0] == 2 and table[701] == 0


def test_uncalibrated_static_quantizer_says_so():
    q = ActQuantizer(int8, "static", name="blocks.0.input")
    with pytest.raises(RuntimeError, match=r"blocks\.0\.input.*not calibrated"):
        q(torch.zeros(1))


def test_attention_matmuls_reference_is_sdpa():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))

    def off(role=None):
        a = ActQuantizer(int8, "dynamic")
        a.enabled = False
        return a

    mm = QuantAttentionMatmuls(off, off)
    assert torch.allclose(mm(q, k, v, 8**-0.5), F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    mm8 = QuantAttentionMatmuls(lambda r: ActQuantizer(int8, "dynamic", "token"), lambda: ActQuantizer(int8, "dynamic"))
    assert sqnr(F.scaled_dot_product_attention(q, k, v), mm8(q, k, v, 8**-0.5)) > 25


def test_bad_quantizer_settings():
    with pytest.raises(ValueError, match="weight-only"):
        ActQuantizer("ternary")
    with pytest.raises(ValueError, match="dynamic"):
        ActQuantizer(int8, "static", "token")


@pytest.mark.parametrize("masked", [False, True])
def test_attention_in_chunks_of_heads_equals_attention_at_once(monkeypatch, masked):
    """Large score matrices are computed a few (batch, head) pairs at a time; per-row and static
    quantization make the chunks give the same result, observers see every row."""
    import diffquant.nn.attention as A

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    mask = torch.randn(2, 1, 16, 16) if masked else None
    mm = QuantAttentionMatmuls(
        lambda r: ActQuantizer(int8, "dynamic", "token"), lambda: ActQuantizer(int8, "dynamic", "token")
    )
    whole = mm(q, k, v, 0.3, mask)
    monkeypatch.setattr(A, "SCORE_CHUNK_ELEMENTS", 2 * 16 * 16)  # two heads at a time: 4 chunks
    calls = []
    mm.p_quantizer.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    chunked = mm(q, k, v, 0.3, mask)
    assert calls == [(1, 2, 16, 16)] * 4
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    # and both are attention: in float (quantizers off) the same as PyTorch's with the additive mask
    for quantizer in (mm.q_quantizer, mm.k_quantizer, mm.v_quantizer, mm.p_quantizer):
        quantizer.enabled = False
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    for chunk in (2 * 16 * 16, 1 << 24):
        monkeypatch.setattr(A, "SCORE_CHUNK_ELEMENTS", chunk)
        torch.testing.assert_close(mm(q, k, v, 0.3, mask), reference, rtol=1e-5, atol=1e-6)


def test_register_qmodule_makes_prepare_quantize_a_new_layer_type():
    """A float layer type of the user's own is left alone until a quantized class is registered for it."""
    from diffquant import prepare
    from diffquant.nn import QMODULES, register_qmodule
    from diffquant.recipe import get_recipe

    class WideLinear(nn.Linear):  # a subclass: ``prepare`` matches exact types, so it is not a Linear to it
        pass

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(WideLinear(16, 16), nn.Linear(16, 16))
        model.forward = lambda x, t: model[1](model[0](x))  # the (x, t) denoiser contract
        return model

    recipe = get_recipe("w8a16").replace(exclude=(), name="all")
    assert type(prepare(build(), recipe)[0]) is WideLinear
    try:
        register_qmodule(WideLinear)(type("QuantWideLinear", (QuantLinear,), {}))
        model = prepare(build(), recipe)
        assert type(model[0]).__name__ == "QuantWideLinear" and str(model[0].weight_qtype) == "int8"
        x = torch.randn(4, 16)
        expected = F.linear(x, P.fake_quant_weight(build()[0].weight, int8), model[0].bias)
        assert torch.allclose(model[0](x), expected, atol=1e-6)
    finally:
        QMODULES.pop(WideLinear, None)
