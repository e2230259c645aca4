"""Probe: what a per-step table costs compiled, against the same TDQ model with its scales frozen static.

    python benchmarks/probes/tdq_lookup_ab.py fashion-unet 1     # model, threads

Three lowered, compiled models in one process, interleaved, a new time step every round: static
``w8a8``, ``w8a8-tdq``, and the TDQ model with every per-step table replaced by its step-500 row as
static scales (the same graph without any lookup). TDQ over frozen is what the lookups cost.
Measured on AMD EPYC Zen 4, one thread, batch 64, fashion-unet: with an opaque lookup op per
quantizer (63 of them) TDQ 1.061x / frozen 1.010x of static; with the tables indexed by the step
tensor 1.016x / 1.003x (a second run: 1.025x / 1.009x; beside another one-thread job both times).
"""

import copy
import sys

import torch

from diffquant import get_recipe, quantize
from diffquant import primitives as P
from diffquant.backends import lower
from diffquant.backends.common import ActParams, StepQuantizer
from diffquant.bench import BENCH_CALIBRATION, compile_forward, example_inputs, interleaved_ms
from diffquant.models import load_builtin


class Frozen(torch.nn.Module):
    """A :class:`StepQuantizer` fixed at one step's row: its fake quant with constant scales."""

    def __init__(self, sq: StepQuantizer, t: int):
        super().__init__()
        self.qtype, self.symmetric = sq.qtype, sq.symmetric
        self.scale, self.zp = (torch.tensor(v) for v in sq.param_list[sq.bucket_list[t]])

    def forward(self, x):
        return P.fake_quant(x, self.qtype, self.scale, self.zp, self.symmetric)


def freeze_tables(model: torch.nn.Module, t: int = 500) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, ActParams) and m.lookup is not None:
            s, z = m.lookup.param_list[m.lookup.bucket_list[t]]
            m.static_scale, m.static_zp = torch.tensor(s), torch.tensor(z)
            m.static_numbers, m.lookup = (s, z), None
    for name, m in list(model.named_modules()):
        if isinstance(m, StepQuantizer):
            model.set_submodule(name, Frozen(m, t))
    return model


def call(model, x, y):
    return lambda r: model(x, torch.full((x.shape[0],), 999 - 37 * r % 1000), y)


@torch.no_grad()
def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "fashion-unet"
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    fp = load_builtin(name).eval()
    static = quantize(copy.deepcopy(fp), get_recipe("w8a8"), BENCH_CALIBRATION, progress=False).eval()
    tdq = quantize(copy.deepcopy(fp), get_recipe("w8a8-tdq"), BENCH_CALIBRATION, progress=False).eval()
    models = {
        "static": lower(static, "cpu")[0],
        "tdq-frozen": freeze_tables(lower(copy.deepcopy(tdq), "cpu")[0]),
        "tdq": lower(tdq, "cpu")[0],
    }
    x, _, y = example_inputs(fp, 64)
    calls = {k: call(compile_forward(m), x, y) for k, m in models.items()}
    ms = interleaved_ms(calls, 15, warmup=2)
    print({k: round(v, 2) for k, v in ms.items()}, {k: round(v / ms["static"], 4) for k, v in ms.items()})


if __name__ == "__main__":
    main()
