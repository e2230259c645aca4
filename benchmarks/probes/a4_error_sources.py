"""Probe: which activation quantizers a W8A4 model's output error comes from, per activation mode.

Quantizes the model once per table method (``ptq_table`` recipes), records the FP model's own
DDIM-50 trajectories (seed 777, not the calibration seed), then measures the relative output error
``||eps_q - eps||^2 / ||eps||^2`` at a few steps with every activation quantizer on, with one group
on alone (the rest float), and with one group off (the rest on). Groups: quantizers of the same
role in every block (``transformer_blocks.*.attn1.to_q.input_quantizer`` ...). Weights stay as the
recipe rounds them in every line.

    OMP_NUM_THREADS=1 python benchmarks/probes/a4_error_sources.py fashion-dit W8A4 tdq dynamic bucketed

Prints one JSON line per (method, group). ``benchmarks/results/a4_error_sources.jsonl`` holds the
lines of two runs on fashion-dit W8A4 (``tdq dynamic``, then ``tdq-sq bucketed-sq bucketed``, the
last stopped after its "all" line). What they show: the MLP input (``ff.net.0.proj``, the adaLN-
modulated LayerNorm output) and the MLP hidden (``ff.net.2``) dominate; per-token dynamic scales
halve the last step's error, not the early steps'; SmoothQuant lowers buckets and TDQ alike, and
buckets and TDQ stay level with or without it (range variation over t is not what limits this model).
"""

import json
import re
import sys
import time
from collections import defaultdict

sys.path.insert(0, "benchmarks")
from error_by_layer import relative_errors, trajectory_inputs
from ptq_table import recipe_for

from diffquant import quantize
from diffquant.models import load_builtin
from diffquant.nn.quantizer import ActQuantizer

STEPS = (0, 10, 25, 40, 49)
N = 32

name, bits, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
labels, inputs = trajectory_inputs(load_builtin(name).eval(), N, STEPS)


def errors(model) -> dict[int, float]:
    return {k: round(v, 6) for k, v in relative_errors(model, labels, inputs).items()}


def with_enabled(model, quantizers, on) -> dict[int, float]:
    """The errors with only the quantizers in ``on`` enabled; afterwards all are enabled again."""
    for m in quantizers:
        m.enabled = m in on
    try:
        return errors(model)
    finally:
        for m in quantizers:
            m.enabled = True


for method in methods:
    t0 = time.perf_counter()
    q = quantize(load_builtin(name), recipe_for(bits, method, 128), progress=False).eval()
    quantizers = {n: m for n, m in q.named_modules() if isinstance(m, ActQuantizer)}
    groups = defaultdict(list)
    for n, m in quantizers.items():
        groups[re.sub(r"\.\d+\.", ".*.", n)].append(m)  # the same role in every block
    row = {"model": name, "bits": bits, "method": method}
    print(json.dumps({**row, "group": "all", "err": errors(q), "calib_s": round(time.perf_counter() - t0, 1)}))
    for g, ms in sorted(groups.items()):
        alone = with_enabled(q, quantizers.values(), set(ms))
        without = with_enabled(q, quantizers.values(), set(quantizers.values()) - set(ms))
        print(json.dumps({**row, "group": g, "alone": alone, "without": without}), flush=True)
