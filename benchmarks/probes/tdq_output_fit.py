"""Probe: held-out output MSE of the TDQ output fit (``methods.tdq.fit_to_output``) per setting.

Quantizes once (range-fit TDQ), keeps a copy of the model before the output fit, then runs the fit
with each JSON setting on its own copy and prints its result line. Results:
``benchmarks/results/tdq_output_fit_probe.jsonl`` (fashion-unet W8A4; the first two lines from one
calibration, the last two from another, hence the two loss_before values), made with

    OMP_NUM_THREADS=2 python benchmarks/probes/tdq_output_fit.py fashion-unet W8A4 \
        '{"iters":16,"lr":0.01}' '{"iters":32,"lr":0.005,"batch":16}'
"""

import copy
import json
import sys
import time

sys.path.insert(0, "benchmarks")
from ptq_table import recipe_for

import diffquant.methods.tdq as T
from diffquant import quantize
from diffquant.models import load_builtin

name, bits = sys.argv[1], sys.argv[2]
configs = [json.loads(c) for c in sys.argv[3:]]
saved = {}
orig = T.fit_to_output


def grab(model, trajectory, progress=True, **kw):
    saved["state"] = copy.deepcopy(model)
    saved["trajectory"] = trajectory
    return {}


T.fit_to_output = grab
r = recipe_for(bits, "tdq-out", 128)
t0 = time.perf_counter()
quantize(load_builtin(name), r, progress=False)
print("calib", time.perf_counter() - t0, flush=True)
for c in configs:
    m = copy.deepcopy(saved["state"])
    t0 = time.perf_counter()
    res = orig(m, saved["trajectory"], progress=False, **c)
    print(json.dumps({**c, **res, "s": round(time.perf_counter() - t0)}), flush=True)
