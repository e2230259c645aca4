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

import torch

sys.path.insert(0, "benchmarks")
from ptq_table import recipe_for

from diffquant import quantize
from diffquant.models import load_builtin
from diffquant.nn.quantizer import ActQuantizer
from diffquant.sampling import SamplerConfig, balanced_labels, sample_batch

STEPS = (0, 10, 25, 40, 49)
N = 32

name, bits, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
fp = load_builtin(name).eval()
labels = balanced_labels(N, fp.num_classes)
inputs = {}


def on_step(k, t, x, eps):
    if k in STEPS:
        inputs[k] = (t, x.clone(), eps.clone())


with torch.no_grad():
    sample_batch(
        fp, range(N), labels, SamplerConfig(seed=777), fp.config["scheduler"], fp.sample_shape, N, on_step=on_step
    )


@torch.no_grad()
def errors(model) -> dict[int, float]:
    out = {}
    for k, (t, x, eps) in inputs.items():
        d = (model(x, torch.full((N,), t), labels) - eps).double()
        out[k] = round(float(d.pow(2).sum() / eps.double().pow(2).sum()), 6)
    return out


def group_of(qname: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", qname)


for method in methods:
    t0 = time.perf_counter()
    q = quantize(load_builtin(name), recipe_for(bits, method, 128), progress=False).eval()
    quantizers = {n: m for n, m in q.named_modules() if isinstance(m, ActQuantizer)}
    groups = defaultdict(list)
    for n, m in quantizers.items():
        groups[group_of(n)].append(m)
    base = errors(q)
    print(
        json.dumps(
            {
                "model": name,
                "bits": bits,
                "method": method,
                "group": "all",
                "err": base,
                "calib_s": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )
    for g, ms in sorted(groups.items()):
        for m in quantizers.values():
            m.enabled = False
        for m in ms:
            m.enabled = True
        alone = errors(q)
        for m in quantizers.values():
            m.enabled = True
        for m in ms:
            m.enabled = False
        without = errors(q)
        for m in ms:
            m.enabled = True
        print(
            json.dumps({"model": name, "bits": bits, "method": method, "group": g, "alone": alone, "without": without}),
            flush=True,
        )
