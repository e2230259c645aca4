"""Probe: the alpha the SmoothQuant search picks for each Linear of fashion-dit at W8A8 (``None``:
left unsmoothed). ``python benchmarks/probes/smoothquant_alphas.py``; its output is quoted in
docs/quantization.md (fashion-dit, SmoothQuant at W8A8).
"""

import collections
import sys

sys.path.insert(0, "benchmarks")
from ptq_table import recipe_for

from diffquant.methods import smoothquant
from diffquant.models import load_builtin
from diffquant.prepare import prepare
from diffquant.trajectory import record_builtin

r = recipe_for("W8A8", "smoothquant", 128)
m = load_builtin("fashion-dit")
trajectory = record_builtin(m, r.calibration, progress=False)
a = smoothquant.run(prepare(m, r), r, trajectory)["alphas"]
print(collections.Counter(a.values()))
print(a)
