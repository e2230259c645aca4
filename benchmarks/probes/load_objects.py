"""Probe: where a loaded pipeline's memory goes beyond its weights. Loads a quantized pipeline directory
twice (the second load is measured: code paths warm) under tracemalloc, and the FP pipeline folder it came
from with ``from_pretrained`` the same way; prints resident growth, tensor bytes, Python heap, module count.

    OMP_NUM_THREADS=1 python benchmarks/probes/load_objects.py sd-q src/diffquant/models/weights/fashion-sd

Appends one JSON line to ``benchmarks/results/load_objects.jsonl``.
"""

import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from scale import cpu_model, status_bytes  # benchmarks/scale.py

import diffquant
from diffquant.memory import trim

OUT = Path(__file__).parents[1] / "results" / "load_objects.jsonl"


def measured(load) -> dict:
    load()  # the first load pays one-time costs
    gc.collect()
    trim()
    before = status_bytes("VmRSS")
    tracemalloc.start()
    pipe = load()
    heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    tensors = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    return {"rss_growth_mb": round((status_bytes("VmRSS") - before) / 1e6, 1), "tensors_mb": round(tensors / 1e6, 1),
            "python_heap_mb": round(heap / 1e6, 1), "modules": sum(1 for m in modules for _ in m.modules())}  # fmt: skip


def main() -> None:
    from diffusers import DiffusionPipeline

    quantized, folder = sys.argv[1], sys.argv[2]
    files = sum(p.stat().st_size for p in Path(quantized).rglob("*.safetensors"))
    row = {
        "quantized": Path(quantized).name, "quantized_files_mb": round(files / 1e6, 1),
        "quantized_load": measured(lambda: diffquant.load_quantized(quantized)),
        "fp_from_pretrained": measured(lambda: DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)),
        "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
