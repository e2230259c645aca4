"""ONNX export latency: integer-op and QDQ graphs (per-step tables or constant scales) vs float, side by side.

    python benchmarks/onnx_export.py --threads 1

Model part: quantizes ``fashion-unet`` with 7-bit activations and per-step (bucketed) scales, exports
it in every variant :func:`diffquant.backends.onnx.export_onnx` offers, and times one forward at
batch 64 for each, interleaved with the float ONNX export of the same model and PyTorch eager FP32
(median of ``--repeats`` rounds after a warm-up round). Records which conv/matmul ops ONNX Runtime
runs (its optimized graph) and the SQNR of each output against its PyTorch reference.

Kernel part: one convolution layer (batch 64, 64 -> 64 channels, 14x14, 3x3) as single-op graphs:
ONNX Runtime's ``ConvInteger`` for each activation x weight type pair, ``QLinearConv`` (what ORT fuses
QDQ into when the output is quantized too), QDQ with a float output, and float ``Conv``; plus whether
``ConvInteger``/``MatMulInteger`` results equal the exact integer sums at full 8-bit range.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from diffquant import CalibrationConfig, get_recipe, quantize
from diffquant.backends.onnx import export_onnx, ort_op_types, session_options
from diffquant.bench import interleaved_ms
from diffquant.eval.metrics import sqnr
from diffquant.models import load_builtin

RESULTS = Path(__file__).parent / "results" / "onnx_export"
SHOWN_OPS = ("Conv", "ConvInteger", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "MatMulInteger")
SHOWN_OPS += ("MatMulIntegerToFloat", "QLinearConv", "QLinearMatMul", "QGemm")
VARIANTS = {
    "integer, per-step tables (Gather on t)": dict(form="integer"),
    "integer, constant scales of one step": dict(form="integer", step=999),
    "qdq, per-step tables (Gather on t)": dict(form="qdq"),
    "qdq, constant scales of one step": dict(form="qdq", step=999),
}


def export_float(model: torch.nn.Module, path: Path) -> None:
    """The float model through the same (TorchScript) exporter, for the baseline."""

    class Graph(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, t, y):
            return self.m(x, t, y)

    args = (torch.randn(2, *model.sample_shape), torch.full((2,), 999), torch.zeros(2, dtype=torch.long))
    names = ["x", "t", "class_labels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Graph(model), args, str(path), dynamo=False, opset_version=19, input_names=names, output_names=["eps"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "eps"]},
        )  # fmt: skip


def model_rows(args) -> dict:
    import onnxruntime as ort

    float_model = load_builtin("fashion-unet").eval()
    recipe = get_recipe("w8a7").replace(act_mode="bucketed", buckets=args.buckets, name=f"w8a7-b{args.buckets}")
    qmodel = quantize(
        load_builtin("fashion-unet"), recipe, CalibrationConfig(n_samples=8, steps=10, batch_size=8), progress=False
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *float_model.sample_shape, generator=g)
    t, y = torch.full((args.batch,), 999), torch.arange(args.batch) % 10
    feeds = {"x": x.numpy(), "t": t.numpy(), "class_labels": y.numpy()}
    with torch.no_grad():
        ref_q, ref_f = qmodel(x, t, y), float_model(x, t, y)
    rows, calls = {}, {}
    with tempfile.TemporaryDirectory() as d:
        paths = {"ONNX float": Path(d) / "float.onnx"}
        export_float(float_model, paths["ONNX float"])
        for i, (name, kw) in enumerate(VARIANTS.items()):
            paths[name] = Path(d) / f"{i}.onnx"
            report = export_onnx(qmodel, paths[name], **kw)
            rows[name] = {"integer_layers": len(report.integer), "float_layers": len(report.kept)}
        for name, path in paths.items():
            session = ort.InferenceSession(str(path), session_options(args.threads))
            out = torch.from_numpy(session.run(["eps"], feeds)[0])
            ops = ort_op_types(path)
            rows.setdefault(name, {}).update(
                ops={k: v for k, v in sorted(ops.items()) if k in SHOWN_OPS},
                sqnr_db=round(sqnr(ref_f if name == "ONNX float" else ref_q, out), 1),
            )
            calls[name] = lambda _, s=session: s.run(["eps"], feeds)

        def eager(_):
            with torch.no_grad():
                float_model(x, t, y)

        calls["PyTorch eager FP32"] = eager
        rows["PyTorch eager FP32"] = {"ops": {}, "sqnr_db": None}
        ms = interleaved_ms(calls, args.repeats)
    for name, row in rows.items():
        row.update(
            ms=round(ms[name], 1),
            vs_onnx_float=round(ms[name] / ms["ONNX float"], 2),
            vs_eager=round(ms[name] / ms["PyTorch eager FP32"], 2),
        )
        print(json.dumps({"variant": name, **row}), flush=True)
    return {"recipe": recipe.name, "rows": rows}


def _graph(nodes, inits, x_shape, y_shape, x_type=1, y_type=1):
    """A single-input ``x``, single-output ``y`` model (element types: 1 float, 2 uint8, 6 int32)."""
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", x_type, x_shape)],
        [helper.make_tensor_value_info("y", y_type, y_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString()


def conv_graphs(w: np.ndarray, shape) -> dict[str, bytes]:
    """One conv layer as the graphs ONNX Runtime could run it with (float input, float output)."""
    from onnx import TensorProto, helper

    n, o = shape[0], w.shape[0]
    pads = dict(pads=[1, 1, 1, 1])
    y_shape = [n, o, *shape[2:]]
    quant = helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"])
    scales = {"xs": np.array(0.02, np.float32), "os": np.full((1, o, 1, 1), 2e-4, np.float32)}
    out = {}
    for xt, wt in (("u8", "u8"), ("u8", "s8"), ("s8", "s8")):
        xz = np.array(64, np.uint8) if xt == "u8" else np.array(0, np.int8)
        wq = (w + 128).astype(np.uint8) if wt == "u8" else w.astype(np.int8)
        wz = np.array(128, np.uint8) if wt == "u8" else np.array(0, np.int8)
        nodes = [
            quant, helper.make_node("ConvInteger", ["xq", "w", "xz", "wz"], ["acc"], **pads),
            helper.make_node("Cast", ["acc"], ["af"], to=TensorProto.FLOAT), helper.make_node("Mul", ["af", "os"], ["y"]),
        ]  # fmt: skip
        out[f"ConvInteger {xt} x {wt}"] = _graph(nodes, {**scales, "xz": xz, "w": wq, "wz": wz}, list(shape), y_shape)
    qdq = {**scales, "xz": np.array(64, np.uint8), "w": w.astype(np.int8), "wz": np.zeros(o, np.int8)}
    qdq["ws"] = np.full(o, 0.01, np.float32)
    dq = [
        quant, helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
    ]  # fmt: skip
    out["QDQ, float output (ORT: float Conv)"] = _graph(
        [*dq, helper.make_node("Conv", ["xd", "wd"], ["y"], **pads)], qdq, list(shape), y_shape
    )
    requant = [
        helper.make_node("Conv", ["xd", "wd"], ["c"], **pads), helper.make_node("QuantizeLinear", ["c", "xs", "xz"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "xs", "xz"], ["y"]),
    ]  # fmt: skip
    out["QDQ, quantized output (ORT: QLinearConv)"] = _graph([*dq, *requant], qdq, list(shape), y_shape)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], **pads)
    out["float Conv"] = _graph([conv], {"w": w.astype(np.float32) * 0.01}, list(shape), y_shape)
    return out


def exactness() -> dict[str, int]:
    """Max |error| of ORT's integer ops against the exact integer sums, activations in the full 8-bit range."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    xq = rng.integers(200, 256, (8, 64, 7, 7)).astype(np.uint8)
    w = np.where(rng.random((32, 64, 3, 3)) < 0.5, 127, 120).astype(np.int64)
    xm = rng.integers(200, 256, (8, 5, 256)).astype(np.uint8)
    wm = np.where(rng.random((256, 32)) < 0.5, 127, 120).astype(np.int64)
    ref_c = torch.nn.functional.conv2d(
        torch.tensor(xq, dtype=torch.float64), torch.tensor(w, dtype=torch.float64), padding=1
    )
    ref_m = xm.astype(np.int64) @ wm
    out = {}
    for wt in ("u8", "s8"):
        enc = (lambda a: (a + 128).astype(np.uint8)) if wt == "u8" else (lambda a: a.astype(np.int8))
        wz = np.array(128, np.uint8) if wt == "u8" else np.array(0, np.int8)
        for op, x, wv, ref in (("ConvInteger", xq, w, ref_c.numpy()), ("MatMulInteger", xm, wm, ref_m)):
            attrs = {"pads": [1, 1, 1, 1]} if op == "ConvInteger" else {}
            node = helper.make_node(op, ["x", "w", "xz", "wz"], ["y"], **attrs)
            inits = {"w": enc(wv), "xz": np.array(0, np.uint8), "wz": wz}
            model = _graph([node], inits, list(x.shape), None, TensorProto.UINT8, TensorProto.INT32)
            y = ort.InferenceSession(model, session_options(1)).run(None, {"x": x})[0]
            out[f"{op} u8 x {wt}"] = int(np.abs(y.astype(np.int64) - ref).max())
    return out


def kernel_rows(args) -> dict:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    shape = (args.batch, 64, 14, 14)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.integers(-127, 128, (64, 64, 3, 3))
    sessions = {k: ort.InferenceSession(g, session_options(args.threads)) for k, g in conv_graphs(w, shape).items()}
    ms = interleaved_ms({k: (lambda _, s=s: s.run(None, {"x": x})) for k, s in sessions.items()}, args.repeats)
    rows = {k: {"ms": round(v, 2), "vs_float_conv": round(v / ms["float Conv"], 2)} for k, v in ms.items()}
    for k, row in rows.items():
        print(json.dumps({"kernel": k, **row}), flush=True)
    errors = exactness()
    print(json.dumps({"max_abs_error_full_8bit": errors}), flush=True)
    return {"conv_shape": list(shape), "kernels": rows, "max_abs_error_full_8bit": errors}


def markdown(record: dict) -> str:
    """The tables of a run (the narrative around them is in results/onnx_export.md)."""
    lines = [
        f"Command: `{record['command']}`, torch {record['torch']}, onnxruntime {record['onnxruntime']}, "
        f"{record['threads']} thread(s), batch {record['batch']}, recipe {record['recipe']}, median of "
        f"{record['repeats']} interleaved rounds.",
        "",
        "| fashion-unet | ms | vs ONNX float | vs eager FP32 | SQNR vs PyTorch (dB) | conv/matmul ops ORT runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in record["rows"].items():
        ops = ", ".join(f"{k} {v}" for k, v in r["ops"].items()) or "-"
        sq = "-" if r["sqnr_db"] is None else r["sqnr_db"]
        lines.append(f"| {name} | {r['ms']} | {r['vs_onnx_float']}x | {r['vs_eager']}x | {sq} | {ops} |")
    lines += [
        "",
        f"| conv {'x'.join(map(str, record['conv_shape']))}, 3x3, 64 out | ms | vs float Conv |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {r['ms']} | {r['vs_float_conv']}x |" for k, r in record["kernels"].items()]
    lines += [
        "",
        "| integer op, activations in [200, 255], weights in {120, 127} | max abs error vs exact |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in record["max_abs_error_full_8bit"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--buckets", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "repeats": args.repeats,
    }
    record |= model_rows(args)
    record |= kernel_rows(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))


if __name__ == "__main__":
    main()
