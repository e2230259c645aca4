"""The GPU check script's CPU dry run: the same code path as on an H100/H200, on a tiny SDXL-shaped UNet."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu" / "check.py"), "--dry-run", "--out", str(out)]
    proc = subprocess.run([*cmd, "--tdq-iters", "20"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["dry_run"] and not record["errors"]
    rows = record["rows"]
    assert {"bf16", "w8a8-tdq", "fp8", "w8a8-tdq-quantize", "fp8-quantize"} <= set(rows)
    assert rows["w8a8-tdq-quantize"]["lowered"] > 0 and rows["w8a8-tdq-quantize"]["step_quantizers"] > 0
    # the GEMM backends agree with FP32 on the same input (measured on this dry run: 37 dB, 32.5 dB)
    assert rows["w8a8-tdq"]["psnr_vs_fp32"] > 30 and rows["fp8"]["psnr_vs_fp32"] > 26
    assert set(record["speedup_vs_bf16"]) >= {"w8a8-tdq", "fp8"}
