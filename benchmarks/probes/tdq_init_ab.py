"""Probe: the TDQ tables (and per-step targets) of fashion-unet W8A4-TDQ under one tree, to compare two trees.

    PYTHONPATH=OTHER_TREE/src python benchmarks/probes/tdq_init_ab.py /tmp/old.pt range   # the other tree
    python benchmarks/probes/tdq_init_ab.py /tmp/new.pt range                            # this one
Writes the scale tables to PATH and the per-step targets to PATH.targets; compare them with torch.load.
Results: benchmarks/results/tdq_init_ab.md.
"""

import json
import sys

import torch

import diffquant
from diffquant.models import load_builtin
from diffquant.nn.quantizer import ActQuantizer
from diffquant.recipe import get_recipe

torch.set_num_threads(1)

r = get_recipe("w8a4").replace(
    observer="mse",
    act_mode="tdq",
    tdq_fit=sys.argv[2],
    weight_method="rtn",
    calibration={"selection": "all", "n_samples": 16, "steps": 20, "batch_size": 16},
)
m = diffquant.quantize(load_builtin("fashion-unet"), r, progress=False)
rep = getattr(m, "diffquant_tdq_fit", None)
if rep is None and hasattr(m, "diffquant_report"):
    rep = m.diffquant_report.to_dict() if hasattr(m.diffquant_report, "to_dict") else m.diffquant_report
    rep = (
        {k: v for k, v in (rep.get("steps") or rep).items() if "tdq" in str(k)}
        if isinstance(rep, dict)
        else str(rep)[:2000]
    )
torch.save({n: b for n, b in m.state_dict().items() if n.endswith("quantizer.scale")}, sys.argv[1])
print(json.dumps(rep, default=str)[:1500])
ft = {
    n: mod.fit_targets
    for n, mod in m.named_modules()
    if isinstance(mod, ActQuantizer) and getattr(mod, "fit_targets", None) is not None
}
torch.save(ft, sys.argv[1] + ".targets")
