"""Which layers' int4 rounding the late-step error comes from (fashion-unet, DDIM-50).

The shipped ``w4a16`` rounding (int4/g32 GPTQ) is applied to one layer at a time, the others kept
in float, and the output error ``||eps_q - eps||² / ||eps||²`` is measured at the last steps on the
FP model's own trajectory (32 images, seed 777, not the calibration seed). Activations stay float,
so the numbers isolate weight rounding.

    python benchmarks/error_by_layer.py
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from diffquant import quantize
from diffquant.models import load_builtin
from diffquant.nn.modules import QuantModule
from diffquant.sampling import SamplerConfig, balanced_labels, sample_batch

RESULTS = Path(__file__).parent / "results"
STEPS = (46, 49)


def trajectory_inputs(fp, n: int, steps, seed: int = 777):
    """``(labels, {step: (t, x_t, eps)})``: the FP model's own DDIM-50 inputs and outputs at ``steps``
    for ``n`` balanced-class trajectories (seed 777 by default, not the calibration seed)."""
    labels = balanced_labels(n, fp.num_classes)
    inputs = {}

    def on_step(k, t, x, eps):
        if k in steps:
            inputs[k] = (t, x.clone(), eps.clone())

    with torch.no_grad():
        cfg = SamplerConfig(seed=seed)
        sample_batch(fp, range(n), labels, cfg, fp.config["scheduler"], fp.sample_shape, n, on_step=on_step)
    return labels, inputs


@torch.no_grad()
def relative_errors(model, labels, inputs) -> dict[int, float]:
    """``||model(x_t, t) - eps||^2 / ||eps||^2`` at each recorded step."""
    out = {}
    for k, (t, x, eps) in inputs.items():
        d = (model(x, torch.full((x.shape[0],), t), labels) - eps).double()
        out[k] = float(d.pow(2).sum() / eps.double().pow(2).sum())
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="trajectories")
    parser.add_argument("--top", type=int, default=12, help="layers listed")
    args = parser.parse_args()
    q = quantize(load_builtin("fashion-unet"), "w4a16", progress=False)
    fp = load_builtin("fashion-unet").eval()
    labels, inputs = trajectory_inputs(fp, args.n, STEPS)

    def errors(model) -> dict[int, float]:
        return relative_errors(model, labels, inputs)

    float_modules = dict(fp.named_modules())
    rows = []
    for name, m in q.named_modules():
        if not isinstance(m, QuantModule) or m.weight_qtype is None or m.weight_qtype.kind != "int":
            continue
        if m.weight_qtype.bits != 4 or not hasattr(float_modules.get(name), "weight"):
            continue
        layer = float_modules[name]
        w = layer.weight.data.clone()
        layer.weight.data = m.quantized_weight().reshape(w.shape).to(w.dtype)
        rows.append((name, w.numel(), errors(fp)))
        layer.weight.data = w
    total = sum(n for _, n, _ in rows)
    whole = errors(q)
    rows.sort(key=lambda r: -r[2][STEPS[-1]])
    lines = [
        "# Last-step output error by layer, fashion-unet int4/g32 GPTQ weights (w4a16)",
        "",
        f"Command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}` — "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}, torch {torch.__version__}, {platform.machine()}. "
        f"One layer rounded at a time (the rest float), {args.n} FP trajectories (DDIM-50, seed 777); error = "
        "||eps_q - eps||² / ||eps||² at steps "
        f"{STEPS[0]} and {STEPS[1]} (the last). All int4 layers together: "
        f"{whole[STEPS[0]]:.2e} / {whole[STEPS[1]]:.2e}; sum of the single-layer errors at the last step: "
        f"{sum(r[2][STEPS[-1]] for r in rows):.2e}.",
        "",
        f"| layer | weights | share of int4 weights | error step {STEPS[0]} | error step {STEPS[1]} |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, n, e in rows[: args.top]:
        lines.append(f"| `{name}` | {n} | {100 * n / total:.1f} % | {e[STEPS[0]]:.2e} | {e[STEPS[1]]:.2e} |")
    rest = rows[args.top :]
    lines.append(
        f"| {len(rest)} other layers | {sum(r[1] for r in rest)} | {100 * sum(r[1] for r in rest) / total:.1f} % "
        f"| {sum(r[2][STEPS[0]] for r in rest):.2e} (sum) | {sum(r[2][STEPS[1]] for r in rest):.2e} (sum) |"
    )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "error_by_layer_fashion-unet.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
