"""Probe: one fine-tuning step with eager vs torch.compile'd fake-quant functions, interleaved (one thread).

    python benchmarks/probes/finetune_compile_ab.py      # prints the median seconds per step of each
Results: benchmarks/results/tdq_init_ab.md (second table).
"""

import copy
import statistics
import time

import torch
import torch.nn.functional as F

import diffquant
from diffquant import primitives as P
from diffquant.denoiser import noise_prediction
from diffquant.methods import finetune as FT
from diffquant.models import load_builtin
from diffquant.recipe import FinetuneConfig, get_recipe
from diffquant.trajectory.builtin import record_builtin

torch.set_num_threads(1)

fp = load_builtin("fashion-unet")
r = get_recipe("w4a4-ft").replace(weight_method="rtn", calibration={"n_samples": 8, "batch_size": 8})
q = diffquant.quantize(copy.deepcopy(fp), r.replace(finetune=None), progress=False)
c = FinetuneConfig(iterations=1, samples=8, eval_every=0, batch=16)
sel = FT.finetune_calibration(r.calibration, c)
traj = record_builtin(fp, sel, [sel], progress=False)
tr = FT.Trainables(q, c)
opt = torch.optim.AdamW(tr.groups())
calls = [traj[i] for i in range(0, len(traj), max(1, len(traj) // 8))][:8]


def step(call):
    out = noise_prediction(call.replay(q), 4)
    loss = F.mse_loss(out, call.output)
    opt.zero_grad()
    loss.backward()
    opt.step()


eager = (P.fake_quant_int, P._weight_codes)
comp = (torch.compile(P.fake_quant_int, dynamic=True), torch.compile(P._weight_codes, dynamic=True))
times = {"eager": [], "compiled": []}
for rnd in range(12):
    for name, (a, w) in (("eager", eager), ("compiled", comp)):
        P.fake_quant_int, P._weight_codes = a, w
        t = time.perf_counter()
        step(calls[rnd % len(calls)])
        dt = time.perf_counter() - t
        if rnd >= 2:
            times[name].append(dt)
print({k: round(statistics.median(v), 3) for k, v in times.items()}, flush=True)
