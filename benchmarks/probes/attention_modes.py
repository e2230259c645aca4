"""Probe: what the attention of a built-in model costs on the CPU backend, three ways, compiled, interleaved.

    python benchmarks/probes/attention_modes.py --model fashion-dit --threads 2

``w8a8`` as shipped (attention matmuls quantized: fake-quant operands and float matmuls on the
reference path), ``w8a8`` with ``attention=False`` (float32 SDPA) and the same lowered with
``attention="bfloat16"``; FP32 compiled beside. Batch 64, t = 500, median of ``--rounds``.

Measured 2026-12-04, Intel Xeon with AMX (family 6 model 167), 2 threads, torch 2.13 (ms; x FP32 compiled):

    model          FP32 compiled   w8a8 (attn quantized)   float32 attention   bf16 attention
    fashion-dit    51.14           27.10 (1.89x)           21.71 (2.36x)       23.59 (2.17x)
    fashion-unet   98.63           47.59 (2.07x)           44.85 (2.20x)       46.86 (2.10x)

The quantized attention's reference path (fake-quant operands, explicit float matmuls) costs the DiT a
quarter of its forward; bf16 SDPA does not pay at these short sequences (the DiT's tokens, the UNet's 7x7 pixels).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from diffquant import get_recipe
from diffquant.backends import lower
from diffquant.backends.cpu import host
from diffquant.bench import compile_forward, example_inputs, interleaved_ms, quantized_for_bench


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fashion-dit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fp, q = quantized_for_bench(args.model, "w8a8")
    _, q_noattn = quantized_for_bench(args.model, get_recipe("w8a8").replace(attention=False, name="w8a8-noattn"))
    x, t, y = example_inputs(fp, 64)
    models = {
        "FP32 compiled": compile_forward(copy.deepcopy(fp)),
        "w8a8 (attention quantized)": compile_forward(lower(q, "cpu")[0]),
        "w8a8, float32 attention": compile_forward(lower(copy.deepcopy(q_noattn), "cpu")[0]),
        "w8a8, bf16 attention": compile_forward(lower(q_noattn, "cpu", attention="bfloat16")[0]),
    }
    ms = interleaved_ms({k: (lambda r, m=m: m(x, t, y)) for k, m in models.items()}, args.rounds, warmup=2)
    base = ms["FP32 compiled"]
    for k, v in ms.items():
        print(json.dumps({"variant": k, "ms": round(v, 2), "vs_fp32_compiled": round(base / v, 3)}))
    print(json.dumps({"model": args.model, "cpu": host()["text"], "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
