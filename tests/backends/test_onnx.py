"""ONNX export run by ONNX Runtime against the fake-quant reference it must reproduce."""

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from diffquant import get_recipe, quantize
from diffquant.backends import onnx as X
from diffquant.eval.metrics import sqnr
from diffquant.models import load_builtin
from diffquant.nn import QuantConv2d, QuantLinear, QuantModule
from diffquant.nn.modules import make_input_quantizer
from diffquant.sampling import sample
from diffquant.timestep import denoising_step
from tests.backends.helpers import CAL
from tests.conftest import SCHEDULE, tiny_model

RECIPES = {
    "w8a7": get_recipe("w8a7"),
    "bucketed-a6": get_recipe("w8a6").replace(act_mode="bucketed", buckets=3, name="w8a6-b3"),
    "dynamic-tensor": get_recipe("w8a7").replace(act_mode="dynamic", name="w8a7-dyn"),
    "w4a8": get_recipe("w4a8"),  # int4 in groups of 32: no per-channel integer op
    "w8a8-dynamic": get_recipe("w8a8-dynamic"),  # per-token scales
    "fp8": get_recipe("fp8"),
}
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearConv", "QLinearMatMul"}


def _quantized(kind, name):
    return quantize(tiny_model(kind), RECIPES[name], CAL, progress=False)


def _inputs(model, t, n=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *model.sample_shape, generator=g), torch.full((n,), t), torch.tensor([3, 10, 1][:n])


def _model_sqnr(q, runner, steps=(999, 400, 10)) -> list[float]:
    out = []
    for t in steps:
        x, tt, y = _inputs(q, t)
        with torch.no_grad():
            out.append(sqnr(q(x, tt, y), runner(x, tt, y)))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # ORT runs on one thread here; torch's second thread only spins against the other processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dit_bucketed(tmp_path_factory):
    q = _quantized("dit", "bucketed-a6")
    path = tmp_path_factory.mktemp("onnx") / "dit.onnx"
    X.export_onnx(q, path)
    return q, path


@pytest.fixture(scope="module")
def unet_w8a7(tmp_path_factory):
    q = _quantized("unet", "w8a7")
    path = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    return q, path, X.export_onnx(q, path)


# --------------------------------------------------------------------------- whole models


def test_exported_unet_matches_the_reference_and_runs_integer_ops(unet_w8a7):
    q, path, report = unet_w8a7
    kept = report.kept.values()
    assert report.integer and all("unquantized" in why or "embedding table" in why for why in kept), report.summary()
    # ORT's float ops (GroupNorm, softmax) differ from PyTorch's in the last bits, which moves a value at
    # a rounding boundary to the next code; that propagates: tens of dB below exact, above quantization noise
    assert min(_model_sqnr(q, X.OnnxDenoiser(path, threads=1))) > 25
    ops = X.ort_op_types(path)
    layers = [q.get_submodule(n) for n in report.integer]
    convs = sum(2 if m.input_split else 1 for m in layers if isinstance(m, QuantConv2d))
    linears = sum(isinstance(m, QuantLinear) for m in layers)
    assert ops["ConvInteger"] == convs, ops  # every integer conv part runs on ORT's integer convolution
    assert ops["MatMulInteger"] + ops["MatMulIntegerToFloat"] >= linears, ops
    assert ops["DequantizeLinear"] == 0, ops  # no weight is dequantized at run time


def test_per_step_model_matches_the_reference(dit_bucketed):
    q, path = dit_bucketed  # tdq tables: see the single-layer tests below
    assert min(_model_sqnr(q, X.OnnxDenoiser(path, threads=1))) > 25


def test_output_correction_table_is_indexed_by_the_graph_time_step(tmp_path):
    recipe = get_recipe("w8a7").replace(name="w8a7-oc", output_correction=True)
    q = quantize(tiny_model("unet"), recipe, CAL, progress=False)
    gain = q.diffquant_output_correction.gain
    gain.copy_(torch.linspace(0.5, 1.5, gain.numel()))  # far from 1, so a missing or constant gain fails
    X.export_onnx(q, tmp_path / "m.onnx")
    assert min(_model_sqnr(q, X.OnnxDenoiser(tmp_path / "m.onnx", threads=1))) > 25
    X.export_onnx(q, tmp_path / "s.onnx", step=400)  # one step's constants
    assert min(_model_sqnr(q, X.OnnxDenoiser(tmp_path / "s.onnx", threads=1), steps=(400,))) > 25


def test_dynamic_per_tensor_scales_are_computed_in_the_graph(tmp_path):
    q = _quantized("dit", "dynamic-tensor")
    report = X.export_onnx(q, tmp_path / "m.onnx")
    kept = report.kept.values()
    assert report.integer and all("unquantized" in why or "embedding table" in why for why in kept), report.summary()
    assert min(_model_sqnr(q, X.OnnxDenoiser(tmp_path / "m.onnx", threads=1))) > 25


def test_qdq_form_has_int8_weights_with_per_channel_dequantize(tmp_path):
    import onnx

    q = _quantized("dit", "w8a7")
    report = X.export_onnx(q, tmp_path / "q.onnx", form="qdq")
    proto = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: i for i in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == len(report.integer)
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weight_dq)
    assert min(_model_sqnr(q, X.OnnxDenoiser(tmp_path / "q.onnx", threads=1))) > 25
    assert set(X.ort_op_types(tmp_path / "q.onnx")) & INTEGER_OPS  # ORT fuses QDQ Linear layers


@pytest.mark.parametrize(("name", "reason"), [("w4a8", "per-group"), ("w8a8-dynamic", "per-token"), ("fp8", "fp8")])
def test_unsupported_layers_are_reported_not_broken(name, reason, tmp_path):
    q = _quantized("dit", name)
    report = X.export_onnx(q, tmp_path / "m.onnx")
    assert any(reason in why for why in report.kept.values()), report.summary()
    assert "float ops" in report.summary()
    assert min(_model_sqnr(q, X.OnnxDenoiser(tmp_path / "m.onnx", threads=1))) > 25


def test_sampled_images_match_the_reference(tmp_path):
    # a trained model: a random one amplifies every rounding difference into a different image
    q = quantize(load_builtin("fashion-unet"), "w8a7", CAL, progress=False)
    X.export_onnx(q, tmp_path / "fashion.onnx")
    onnx_model = X.OnnxDenoiser(tmp_path / "fashion.onnx", threads=1)
    assert onnx_model.num_classes == q.num_classes and onnx_model.sample_shape == q.sample_shape
    a, _ = sample(q, 8, steps=10, seed=3, progress=False)
    b, _ = sample(onnx_model, 8, steps=10, seed=3, progress=False)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(4.0 / mse)  # images in [-1, 1]: peak-to-peak 2
    # a code flipped at a rounding tie moves a trajectory a little (as on the cpu backend): measured 32.3-47.7 dB
    # per image, mean 40.9, on an AVX2 host (AMD EPYC Zen 3), >= 35 on VNNI hosts; a wrong scale gives < 25 dB
    assert bool((psnr >= 30).all()) and float(psnr.mean()) >= 38, psnr


# ------------------------------------------------------------------- single layers, exact


class OneLayer(nn.Module):
    """A quantized layer as a denoiser ``(x, t, class_labels) -> layer(x)``, so it exports alone."""

    def __init__(self, layer: QuantModule, sample_shape):
        super().__init__()
        self.layer = layer
        self.sample_shape = sample_shape
        self.num_classes = 10
        self.config = {"scheduler": SCHEDULE}

    def forward(self, x, t, class_labels=None):
        return self.layer(x)


def _set_scales(q, x: torch.Tensor, factors) -> None:
    """One scale per table entry: the range of ``x`` times ``factors[i]`` (so the entries differ)."""
    from diffquant import primitives as P

    for i, f in enumerate(factors):
        scale, zp = P.scale_from_range(x.min() * f, x.max() * f, q.qtype, q.symmetric)
        q.scale[i], q.zero_point[i] = scale, zp
    q.mark_calibrated()


def _layer_model(kind: str, mode: str, symmetric: bool) -> tuple[OneLayer, torch.Tensor]:
    torch.manual_seed(0)
    n = {"static": 1, "bucketed": 3, "tdq": 1000}[mode]
    kw = dict(qtype="int8", mode=mode, symmetric=symmetric, buckets=n)
    if kind == "conv":
        conv = nn.Conv2d(16, 8, 3, padding=1)
        x = torch.cat([torch.randn(4, 6, 7, 7) * 3 + 1, torch.randn(4, 10, 7, 7) * 0.5], dim=1)
        iq, iq2 = make_input_quantizer(conv, "c.input", **kw), make_input_quantizer(conv, "c.skip", **kw)
        layer = QuantConv2d.from_float(conv, "int8", None, iq, input_split=6, input_quantizer_2=iq2)
        _set_scales(iq, x[:, :6], _factors(n))
        _set_scales(iq2, x[:, 6:], _factors(n))
    else:
        lin = nn.Linear(32, 24)
        x = torch.randn(4, 5, 32) * 2 + 0.5
        iq = make_input_quantizer(lin, "l.input", **kw)
        layer = QuantLinear.from_float(lin, "int8", None, iq)
        _set_scales(iq, x, _factors(n))
    if mode == "bucketed":
        for q in (layer.input_quantizer, layer.input_quantizer_2):
            if q is not None:
                q.bucket_of_t.copy_(torch.arange(1000) * 3 // 1000)  # t in [0, 334) -> 0, ... -> 2
    layer.freeze()
    return OneLayer(layer, tuple(x.shape[1:])), x


def _factors(n: int) -> list[float]:
    """Entry ``k`` clips at ``1 / (1 + k % 5)`` of the range: neighbouring entries differ by up to 5x."""
    return [1.0 / (1 + k % 5) for k in range(n)]


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize(("mode", "symmetric"), [("static", False), ("bucketed", True), ("tdq", False)])
def test_layers_are_exact_and_step_k_uses_entry_k(kind, mode, symmetric, tmp_path):
    # 8-bit activations: the integer form multiplies uint8 x uint8, which cannot saturate
    model, x = _layer_model(kind, mode, symmetric)
    X.export_onnx(model, tmp_path / "layer.onnx", batch=x.shape[0] if mode == "static" else None)
    runner = X.OnnxDenoiser(tmp_path / "layer.onnx", threads=1)
    outs = {}
    for t in (0, 1, 2, 3, 4, 400, 999):
        with torch.no_grad(), denoising_step(0, t, 1):
            ref = model.layer(x)
        out = runner(x, torch.full((x.shape[0],), t))
        # the same integers up to a code flipped at a rounding tie; a wrong entry: < 30 dB
        assert sqnr(ref, out) > 45, (t, sqnr(ref, out))
        outs[t] = out
    if mode != "static":
        assert not torch.allclose(outs[0], outs[999])


# --------------------------------------------------------------------------------- errors


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(X.ExportError, match="quantize it first"):
        X.export_onnx(tiny_model("dit"), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_unwritable_paths_are_clear_errors(tmp_path):
    q, _ = _layer_model("linear", "static", False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="choose another path"):
        X.export_onnx(q, tmp_path / "file" / "m.onnx")  # a parent that is a file
    with pytest.raises(PermissionError, match="is a directory"):
        X.export_onnx(q, tmp_path)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    q, _ = _layer_model("linear", "static", False)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(X.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        X.export_onnx(q, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_export_leaves_the_model_unchanged(unet_w8a7):
    q, _, _ = unet_w8a7
    assert all(not isinstance(m, X._IntegerLayer) for m in q.modules())
    assert sum(isinstance(m, QuantModule) for m in q.modules()) > 0
    x, t, y = _inputs(q, 500)
    with torch.no_grad():
        q(x, t, y)  # the eager model still runs (its step hook and quantizers are intact)


def test_runner_refuses_what_the_graph_cannot_serve(dit_bucketed, tmp_path):
    q, path = dit_bucketed
    runner = X.OnnxDenoiser(path, threads=1)
    x, _, y = _inputs(q, 0)
    with pytest.raises(ValueError, match="one time step per call"):
        runner(x, torch.tensor([999, 10, 10]), y)
    with pytest.raises(ValueError, match=r"in \[0, 1000\)"):
        runner(x, torch.full((3,), 1000), y)
    X.export_onnx(q, tmp_path / "one.onnx", step=999)
    one = X.OnnxDenoiser(tmp_path / "one.onnx", threads=1)
    assert sqnr(runner(x, torch.full((3,), 999), y), one(x, torch.full((3,), 999), y)) > 90
    with pytest.raises(ValueError, match="time step 999 only"):
        one(x, torch.full((3,), 10), y)
