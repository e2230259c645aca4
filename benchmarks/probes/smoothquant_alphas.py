"""Probe: the alpha the SmoothQuant search picks for each Linear of fashion-dit at W8A8 (``None``:
left unsmoothed). ``python benchmarks/probes/smoothquant_alphas.py``; its output is quoted in
docs/quantization.md (fashion-dit, SmoothQuant at W8A8).
"""

import collections
import sys

sys.path.insert(0, "benchmarks")
from ptq_table import recipe_for

from diffquant.calibrate import smooth
from diffquant.models import load_builtin
from diffquant.quantize import prepare

r = recipe_for("W8A8", "smoothquant", 128)
m = prepare(load_builtin("fashion-dit"), r)
a = smooth(m, r, r.calibration, progress=False)
print(collections.Counter(a.values()))
print(a)
