"""Is `ONEDNN_MAX_CPU_ISA=AVX2` a float-noise perturbation? The same conv and linear, default kernels vs AVX2's.

    OMP_NUM_THREADS=1 python benchmarks/probes/avx2_kernel_order.py

Runs itself twice in subprocesses (the variable is read when oneDNN starts) and prints the largest difference
of each output. On the AMD EPYC Zen 4 host (avx512_vnni), 2026-12-02: conv 2.4e-6 of 2.5 (another summation
order), linear 0 (MKL's kernel is the same).
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def outputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    conv, lin = torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Linear(256, 256)
    x, y = torch.randn(8, 64, 16, 16), torch.randn(64, 256)
    with torch.no_grad():
        return conv(x), lin(y)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        torch.save(outputs(), sys.argv[1])
        sys.exit()
    tmp = Path(tempfile.mkdtemp())
    for name, extra in (("default", {}), ("avx2", {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"})):
        subprocess.run([sys.executable, __file__, str(tmp / f"{name}.pt")], env={**os.environ, **extra}, check=True)
    a, b = torch.load(tmp / "default.pt"), torch.load(tmp / "avx2.pt")
    for label, u, v in zip(("conv", "linear"), a, b, strict=True):
        print(f"{label}: max |default - avx2| {(u - v).abs().max().item():.2e} of max |out| {u.abs().max().item():.2f}")
