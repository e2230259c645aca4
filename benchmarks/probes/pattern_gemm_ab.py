"""Probe: compiled int8 layers as PT2E's quantize -> dequantize -> GEMM pattern (Inductor's x86 int8
passes: its own prepacked oneDNN GEMMs with fused post-ops) against one opaque GEMM op per layer.

    python benchmarks/probes/pattern_gemm_ab.py fashion-dit w8a8 1      # model, recipe, threads

The same lowered model twice (``layer.pattern`` off in one), FP32 compiled beside, interleaved in one
process, batch 64, a new time step every round; each compiled output against the eager lowered model
(SQNR, dB).
"""

import copy
import sys

import torch

from diffquant import get_recipe, quantize
from diffquant.backends import lower
from diffquant.backends.cpu import Int8Conv2d, Int8Linear
from diffquant.bench import BENCH_CALIBRATION, compile_forward, example_inputs, interleaved_ms, sqnr_db
from diffquant.models import load_builtin


def call(model, x, y):
    return lambda r: model(x, torch.full((x.shape[0],), 999 - 37 * r % 1000), y)


@torch.no_grad()
def main() -> None:
    name, recipe = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    fp = load_builtin(name).eval()
    q = quantize(copy.deepcopy(fp), get_recipe(recipe), BENCH_CALIBRATION, progress=False).eval()
    op = lower(copy.deepcopy(q), "cpu")[0]
    for m in op.modules():
        if isinstance(m, (Int8Conv2d, Int8Linear)):
            m.pattern = False
    pattern = lower(q, "cpu")[0]
    x, _, y = example_inputs(fp, 64)
    t = torch.full((64,), 500)
    eager = pattern(x, t, y)
    models = {
        "fp32": compile_forward(copy.deepcopy(fp)),
        "op": compile_forward(op),
        "pattern": compile_forward(pattern),
    }
    print({k: round(sqnr_db(eager, m(x, t, y)), 1) for k, m in models.items() if k != "fp32"})
    calls = {k: call(m, x, y) for k, m in models.items()}
    ms = interleaved_ms(calls, 11, warmup=2)
    print({k: round(v, 2) for k, v in ms.items()}, {k: round(ms["fp32"] / v, 3) for k, v in ms.items()})


if __name__ == "__main__":
    main()
