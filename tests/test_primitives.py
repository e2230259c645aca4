"""Quantization math: grids, SQNR floors per format, weight formats, packing; hypothesis properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant import primitives as P
from diffquant.eval.metrics import sqnr
from diffquant.qtypes import binary, fp8_e4m3, get_qtype, int4, int6, int8, qint, ternary

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), st.integers(2, 8), st.booleans())
def test_int_roundtrip_error_at_most_half_a_step_and_codes_in_range(values, bits, symmetric):
    x = torch.tensor(values)
    qtype = qint(bits)
    scale, zp = P.scale_from_range(x.min(), x.max(), qtype, symmetric)
    qmin, qmax = P.int_range(qtype, symmetric)
    q = P.quantize_int(x, scale, zp, qmin, qmax)
    assert q.min() >= qmin and q.max() <= qmax and torch.equal(q, q.round())
    x_hat = P.dequantize_int(q, scale, zp)
    # inside the calibrated range, the error is at most half a step (plus float slack)
    assert (x_hat - x).abs().max() <= scale * 0.5 + 1e-5 * x.abs().max() + 1e-6


@settings(max_examples=100, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), st.floats(1e-3, 10.0))
def test_clipped_values_land_on_the_grid_edge(values, amax):
    x = torch.tensor(values)
    scale, zp = P.scale_from_range(torch.tensor(-amax), torch.tensor(amax), int8, True)
    y = P.fake_quant(x, int8, scale, zp)
    assert y.abs().max() <= 127 * scale * (1 + 1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite, min_size=2, max_size=32))
def test_zero_is_exact_on_asymmetric_grids(values):
    x = torch.tensor([*values, 0.0])
    scale, zp = P.scale_from_range(x.min(), x.max(), int4, symmetric=False)
    assert P.fake_quant(x, int4, scale, zp, symmetric=False)[-1] == 0


@pytest.mark.parametrize(("qtype", "floor_db"), [(int8, 38.0), (fp8_e4m3, 30.0), (int6, 26.0), (int4, 13.0)])
def test_activation_sqnr_floor_on_gaussian_data(qtype, floor_db):
    # a 3-sigma clip keeps int formats near their textbook SQNR (~6 dB per bit)
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    scale, zp = P.scale_from_range(torch.tensor(-4.0), torch.tensor(4.0), qtype, True)
    assert sqnr(x, P.fake_quant(x, qtype, scale, zp)) > floor_db


@pytest.mark.parametrize(
    ("qtype", "group", "floor_db"),
    [
        (int8, None, 38.0),
        (int4, None, 14.0),
        (int4, 32, 17.0),
        (fp8_e4m3, None, 30.0),
        (ternary, None, 6.0),
        (binary, None, 4.0),
    ],
)
def test_weight_sqnr_floor(qtype, group, floor_db):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    assert sqnr(w, P.fake_quant_weight(w, qtype, group)) > floor_db


@pytest.mark.parametrize("qtype, group", [(int8, None), (int4, None), (int4, 32), (fp8_e4m3, None)])
def test_the_largest_weight_of_each_channel_or_group_is_kept_exactly(qtype, group):
    """Absmax scales put each row's (group's) largest |w| on the grid's last code: neither clipped nor
    short of it (up to the float16 rounding of the stored scale)."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    shape = (16, -1, group or 64)  # rows of 64: one group per row, or groups of 32
    amax = w.reshape(shape).abs().amax(-1)
    kept = P.fake_quant_weight(w, qtype, group).reshape(shape).abs().amax(-1)
    torch.testing.assert_close(kept, amax, rtol=2e-3, atol=0)


def test_dynamic_per_token_beats_per_tensor_on_outlier_tokens():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    x[3] *= 50  # one loud token
    per_token = sqnr(x, P.dynamic_fake_quant(x, int8, "token"))
    per_tensor = sqnr(x, P.dynamic_fake_quant(x, int8, "tensor"))
    assert per_token > per_tensor + 3


def test_static_equals_dynamic_given_the_same_scale():
    x = torch.randn(8, 32)
    lo, hi = P.dynamic_range(x, "token")
    scale, zp = P.scale_from_range(lo, hi, int8, False)
    static = P.fake_quant(x, int8, scale, zp, symmetric=False)
    assert torch.equal(static, P.dynamic_fake_quant(x, int8, "token", symmetric=False))


def test_fp8_matches_torch_dtype_rounding():
    x = torch.randn(10_000) * 100
    scale = torch.tensor(1.0)
    expected = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(P.fake_quant_fp8(x, scale), expected)


def test_ste_gradient_is_identity_inside_and_zero_outside():
    x = torch.tensor([-3.0, -0.4, 0.2, 0.9, 5.0], requires_grad=True)
    scale = torch.tensor(1.0 / 127)
    P.fake_quant(x, int8, scale).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_gradient_reaches_the_scale():
    x = torch.randn(100)
    scale = torch.tensor(0.01, requires_grad=True)
    P.fake_quant(x, int4, scale).pow(2).sum().backward()
    assert scale.grad is not None and scale.grad != 0


def _fake_quant_int_chain(x, scale, zero_point, qmin, qmax):
    """The plain autograd chain :func:`P.fake_quant_int`'s fused node stands for."""
    q = torch.clamp(P.round_ste(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


@pytest.mark.parametrize(
    ("case", "scale_shape", "symmetric", "learn"),
    [
        ("clipped", (), True, False),  # a static scale smaller than the range: the mask matters
        ("clipped", (), False, True),  # LSQ on a static scale and its zero point
        ("in range", (6, 1), False, False),  # dynamic per-token scales: nothing clipped, dx = g
        ("clipped", (6, 1), False, True),  # a learned per-token scale table
    ],
)
def test_fused_fake_quant_has_the_values_and_gradients_of_the_plain_chain(case, scale_shape, symmetric, learn):
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 40, generator=g) * 3
    qmin, qmax = (-7, 7) if symmetric else (0, 15)
    if case == "in range":
        lo, hi = x0.amin(-1, keepdim=True), x0.amax(-1, keepdim=True)
        s0, z0 = P.scale_from_range(lo, hi, int4, symmetric)
    else:
        s0 = torch.full(scale_shape, 0.2)
        z0 = torch.zeros(scale_shape) if symmetric else torch.full(scale_shape, 8.0)
    out_grad = torch.randn(6, 40, generator=g)
    results = []
    for fn in (_fake_quant_int_chain, P.fake_quant_int):
        x = x0.clone().requires_grad_(True)
        s, z = s0.clone().requires_grad_(learn), z0.clone().requires_grad_(learn and not symmetric)
        y = fn(x, s, z, qmin, qmax)
        (y * out_grad).sum().backward()
        results.append((y.detach(), x.grad, s.grad, z.grad))
    (y_ref, dx_ref, ds_ref, dz_ref), (y, dx, ds, dz) = results
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    if case == "clipped":
        assert (dx == 0).any() and (dx != 0).any()  # the clamp's mask is in the gradient
    if learn:
        torch.testing.assert_close(ds, ds_ref, rtol=1e-5, atol=1e-5)
        assert bool((ds != 0).all())
        if not symmetric:
            torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=1e-5)
    else:
        assert ds is None and ds_ref is None


@pytest.mark.parametrize("qtype", [int8, int4, fp8_e4m3, ternary, binary])
@pytest.mark.parametrize("group", [None, 32, 48])
def test_stored_weight_dequantizes_to_the_fake_quant_weight(qtype, group):
    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(3))  # k = 45: ragged groups
    qw = P.quantize_weight(w, qtype, group)
    assert torch.allclose(qw.dequantize(), P.fake_quant_weight(w, qtype, group), atol=1e-6, rtol=1e-6)
    if qtype.bits <= 4 and qtype.is_int:
        assert qw.packed and qw.qdata.dtype == torch.uint8


def test_int4_storage_is_half_a_byte_per_weight():
    w = torch.randn(128, 256)
    qw = P.quantize_weight(w, int4, 64)
    assert qw.qdata.numel() == w.numel() // 2


def test_ternary_and_binary_codes():
    w = torch.tensor([[0.05, -1.0, 2.0, -0.01]])
    qw = P.quantize_weight(w, ternary)
    assert qw.qdata.shape == (1, 1) and qw.pack_bits == 2  # four 2-bit codes in one byte
    codes = P.unpack_bits(qw.qdata, 2)[0, :4].tolist()
    assert codes == [0, -1, 1, 0]  # threshold 0.7 * mean|w| = 0.538
    assert qw.scale.item() == pytest.approx(1.5)  # mean of the kept |w|
    qb = P.quantize_weight(w, binary)
    assert qb.qdata.shape == (1, 1) and qb.pack_bits == 1  # eight 1-bit codes per byte
    assert P.unpack_bits(qb.qdata, 1)[0, :4].tolist() == [1, -1, 1, -1]
    assert qb.scale.item() == pytest.approx(0.765, rel=1e-3)  # stored in float16


@pytest.mark.parametrize("bits, lo, hi", [(1, -1, 1), (2, -2, 1), (4, -8, 7)])
@pytest.mark.parametrize("n", [1, 3, 8, 13, 64])
def test_bit_packing_round_trips_and_takes_bits_per_code(bits, lo, hi, n):
    g = torch.Generator().manual_seed(n)
    q = torch.randint(lo, hi + 1, (5, n), generator=g, dtype=torch.int8)
    if bits == 1:
        q = torch.where(q == 0, torch.ones_like(q), q)  # binary codes are +-1
    packed = P.pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-n * bits // 8))
    assert torch.equal(P.unpack_bits(packed, bits)[:, :n], q)
    with pytest.raises(ValueError, match="needs"):
        P.pack_bits(torch.full((1, 2), hi + 1, dtype=torch.int8), bits)


@pytest.mark.parametrize("fmt, per_byte", [("int2", 4), ("ternary", 4), ("binary", 8), ("int4", 2)])
def test_low_bit_layers_store_packed_codes_and_dequantize_exactly(fmt, per_byte):
    from diffquant.nn import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(40, 6), fmt, None, None)
    x = torch.randn(3, 40)
    before = layer(x)
    layer.freeze()
    assert layer.qweight.shape == (6, -(-40 // per_byte))
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    codes = layer.integer_weight()
    assert (
        codes.shape == (6, 40) and int(codes.min()) >= get_qtype(fmt).qmin and int(codes.max()) <= get_qtype(fmt).qmax
    )


def test_weight_scales_are_stored_in_float16_when_in_range():
    w = torch.randn(16, 128)
    qw = P.quantize_weight(w, int4, 64)
    assert qw.scale.dtype == torch.float16
    # the codes were computed with the rounded scale: dequantizing gives the fake-quant weight exactly
    assert torch.equal(qw.dequantize(), P.fake_quant_weight(w, int4, 64))
    tiny = P.quantize_weight(w * 1e-9, int4, 64)  # below float16's normal range: kept in float32
    assert tiny.scale.dtype == torch.float32
    assert torch.allclose(tiny.dequantize(), P.fake_quant_weight(w * 1e-9, int4, 64))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=1, max_size=65))
def test_int4_pack_roundtrip(values):
    q = torch.tensor(values, dtype=torch.int8)
    assert torch.equal(P.unpack_int4(P.pack_int4(q))[: len(values)], q)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        P.pack_int4(torch.tensor([9], dtype=torch.int8))


def test_qtype_lookup():
    assert get_qtype("int8") == int8 and get_qtype("fp8") == fp8_e4m3 and get_qtype("ternary") == ternary
    assert int8.qmin == -127 and int8.qmax == 127 and int4.qmax == 7
    with pytest.raises(ValueError, match="Unknown quantized format"):
        get_qtype("int16")


def test_ternary_weights_saved_two_codes_per_byte_still_load():
    """Before 2-bit packing, ternary and int2 codes were stored as nibbles: the length tells them apart."""
    from diffquant.nn import QuantLinear

    torch.manual_seed(1)
    layer = QuantLinear.from_float(torch.nn.Linear(40, 6), "ternary", None, None)
    layer.freeze()
    x = torch.randn(3, 40)
    new = layer(x)
    codes = layer.integer_weight()
    layer.qweight = P.pack_int4(codes.reshape(6, -1))  # the old layout: 20 bytes per row
    layer._w_cache = None
    assert torch.equal(layer.integer_weight(), codes)
    torch.testing.assert_close(layer(x), new, rtol=0, atol=0)


@pytest.mark.parametrize("channels", [48, 40])
def test_group_fake_quant_is_per_token_fake_quant_of_each_group(channels):
    """One scale per token and per 16 channels; 40 channels: the last group has 8 (its padding changes nothing)."""
    from diffquant import primitives as P

    torch.manual_seed(0)
    x = torch.randn(2, channels, 5, 3) * torch.logspace(-2, 1, channels).view(1, -1, 1, 1)
    got = P.dynamic_fake_quant(x, get_qtype("int4"), "group", False, 1, 16)
    ref = torch.cat([
        P.dynamic_fake_quant(x[:, g : g + 16], get_qtype("int4"), "token", False, 1) for g in range(0, channels, 16)
    ], 1)  # fmt: skip
    assert torch.equal(got, ref)
    assert not torch.equal(got, P.dynamic_fake_quant(x, get_qtype("int4"), "token", False, 1))
    lin = torch.randn(3, 7, channels)
    ref = torch.cat([
        P.dynamic_fake_quant(lin[..., g : g + 16], get_qtype("int4"), "token", True, -1) for g in range(0, channels, 16)
    ], -1)  # fmt: skip
    assert torch.equal(P.dynamic_fake_quant(lin, get_qtype("int4"), "group", True, -1, 16), ref)


@pytest.mark.parametrize("channels", [4, 6, 16, 64, 66, 7])  # short rows take a halving first; 66 and 7 do not
def test_per_token_range_is_the_plain_min_and_max(channels):
    from diffquant import primitives as P

    torch.manual_seed(0)
    x = torch.randn(3, 5, channels) * torch.logspace(-2, 1, channels)
    for t in (x, x.transpose(0, 1)):  # strided too
        lo, hi = P.dynamic_range(t, "token", -1)
        assert torch.equal(lo, t.amin(-1, keepdim=True)) and torch.equal(hi, t.amax(-1, keepdim=True))
    lo, hi = P.dynamic_range(x.transpose(1, 2), "token", 1)  # not the last dim: the plain reduction
    assert torch.equal(lo, x.transpose(1, 2).amin(1, keepdim=True))
