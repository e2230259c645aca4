"""Probe: a first look at the shipped fashion-sd (not the reference: ``benchmarks/fashion_sd_table.py --n 5000``).

    python benchmarks/probes/fashion_sd_first_look.py 100      # N images at guidance 1 and 3, DDIM-50

FD (biased upward at small N) and prompt-class consistency of the evaluation protocol's images
(``fashion_sd.generate``, seed 0); appends a line to ``benchmarks/results/fashion_sd_first_look.jsonl``.
"""

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from scale import cpu_model  # benchmarks/scale.py: the CPU model and its int8 ISA flags

from diffquant.eval import Evaluator
from diffquant.models import fashion_sd as sd

torch.set_num_threads(2)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
pipe, evaluator = sd.load_fashion_sd(), Evaluator()
for guidance in (1.0, sd.GUIDANCE):
    start = time.perf_counter()
    images, labels = sd.generate(pipe, n, 50, guidance, batch_size=100)
    score = evaluator.score(images, labels)
    row = {"n": n, "steps": 50, "guidance": guidance, "fd": round(score["fd"], 4),
           "class_consistency": score["class_consistency"], "seconds": round(time.perf_counter() - start, 1),
           "cpu": cpu_model(), "threads": 2, "date": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    print(json.dumps(row), flush=True)
    with open(Path(__file__).parents[1] / "results" / "fashion_sd_first_look.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
