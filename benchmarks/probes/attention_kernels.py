"""Probe: the attention kernels a CPU has for SD-1.5's self-attention shapes, timed side by side.

    python benchmarks/probes/attention_kernels.py --threads 2

fp32 ``F.scaled_dot_product_attention`` (what the CPU backend runs today), the same in bf16 (AMX tiles
where the CPU has them), and torchao's int8 flash attention ``torchao::qscaled_dot_product`` (u8
Q, K, V, softmax output and output codes), with the output's SQNR against fp32 attention of the same
dequantized operands. Shapes: batch 1 (2 with guidance), 8 heads, SD-1.5's four resolutions.

Measured 2026-12-04, Intel Xeon with AMX (family 6 model 167), 2 threads, torch 2.13: 4096 tokens x 40
fp32 106.2 ms, bf16 46.4 ms (48.2 dB); 1024 x 80 10.1 / 3.6; 256 x 160 1.32 / 0.36; 64 x 160 0.19 / 0.06.
torchao 0.18's ``qscaled_dot_product`` has no CPU kernel in its PyPI wheel (NotImplementedError).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[2] / "src"))

from diffquant.backends.cpu import host
from diffquant.bench import sqnr_db, time_ms

SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (tokens, head dim) at 64x64 latents


def codes(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    lo, hi = float(x.min()), float(x.max())
    s = (hi - lo) / 255
    z = round(-lo / s)
    return torch.clamp(torch.round(x / s) + z, 0, 255).to(torch.uint8), s, z


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import torchao.ops  # noqa: F401  registers torchao::qscaled_dot_product

        have_int8 = hasattr(torch.ops.torchao, "qscaled_dot_product")
    except ImportError:
        have_int8 = False
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, d in SHAPES:
        q, k, v = (torch.randn(args.batch, 8, n, d, generator=g) for _ in range(3))
        (qc, qs, qz), (kc, ks, kz), (vc, vs, vz) = codes(q), codes(k), codes(v)
        qd, kd, vd = ((c.float() - z) * s for c, s, z in ((qc, qs, qz), (kc, ks, kz), (vc, vs, vz)))
        ref = F.scaled_dot_product_attention(qd, kd, vd)
        row = {"tokens": n, "head_dim": d}
        row["fp32_ms"] = time_ms(functools.partial(F.scaled_dot_product_attention, qd, kd, vd), 5, 2)
        qb, kb, vb = qd.bfloat16(), kd.bfloat16(), vd.bfloat16()
        row["bf16_ms"] = time_ms(functools.partial(F.scaled_dot_product_attention, qb, kb, vb), 5, 2)
        row["bf16_sqnr_db"] = round(sqnr_db(ref, F.scaled_dot_product_attention(qb, kb, vb).float()), 1)
        if have_int8:
            _, os_, oz = codes(ref)

            int8 = functools.partial(
                torch.ops.torchao.qscaled_dot_product, qc, kc, vc, None, 0.0, False, None, qs, qz, ks, kz, vs, vz,
                1 / 255, 0, os_, oz,
            )  # fmt: skip

            try:
                out = int8()
                row["int8_ms"] = time_ms(int8, 5, 2)
                row["int8_out_dtype"] = str(out.dtype)
                row["int8_sqnr_db"] = round(sqnr_db(ref, (out.float() - oz) * os_), 1)
            except Exception as e:
                row["int8_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"cpu": host()["text"], "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
