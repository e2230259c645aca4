import math

import pytest
import torch

from diffquant.eval import Evaluator, evaluate, feature_stats, per_step_sqnr
from diffquant.eval.evaluate import extract_features
from tests.conftest import GaussianDenoiser, tiny_model


@pytest.fixture
def tiny_evaluator():
    net = tiny_model("features")
    reference = feature_stats(extract_features(net, torch.rand(64, 1, 28, 28) * 2 - 1))
    return Evaluator(net, reference)


def test_evaluate_keys_and_self_psnr(tiny_evaluator):
    model = GaussianDenoiser()
    result = evaluate(model, n=12, steps=3, evaluator=tiny_evaluator, reference_model=model, progress=False)
    for key in ("fd", "class_consistency", "n", "steps", "sampler", "seed", "seconds", "psnr_vs_ref"):
        assert key in result
    assert result["n"] == 12 and result["fd"] >= 0
    assert result["psnr_vs_ref"] == 100.0  # same model, same noise: identical images


def test_evaluate_psnr_drops_for_another_model(tiny_evaluator):
    result = evaluate(
        GaussianDenoiser(0.4),
        n=8,
        steps=5,
        evaluator=tiny_evaluator,
        reference_model=GaussianDenoiser(0.3),
        progress=False,
    )
    assert 5 < result["psnr_vs_ref"] < 60


def test_score_rejects_non_finite(tiny_evaluator):
    images = torch.zeros(4, 1, 28, 28)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        tiny_evaluator.score(images)


def test_per_step_sqnr_self_is_infinite_and_other_finite():
    ref = GaussianDenoiser(0.4)
    same = per_step_sqnr(ref, ref, n=4, steps=5)
    assert [r["index"] for r in same] == list(range(5)) and all(math.isinf(r["sqnr_db"]) for r in same)
    other = per_step_sqnr(ref, GaussianDenoiser(0.5), n=4, steps=5)
    assert all(math.isfinite(r["sqnr_db"]) for r in other)
    assert other[0]["t"] == 999 and other[-1]["t"] < other[0]["t"]


def test_per_step_sqnr_sees_a_perturbation_of_known_size():
    ref = GaussianDenoiser(0.4)

    class Scaled(torch.nn.Module):
        def forward(self, x, t, y):
            return ref(x, t, y) * 1.01  # relative error 1% -> 40 dB at every step

    db = [r["sqnr_db"] for r in per_step_sqnr(ref, Scaled(), n=3, steps=4)]
    assert db == pytest.approx([40.0] * 4, abs=1e-3)


@pytest.mark.slow
def test_distributed_eval_equals_single_process(tmp_path):
    """2 CPU processes (gloo, torchrun) give the FD of the single-process run with the same seeds."""
    import json
    import socket
    import subprocess
    import sys

    args = ["eval", "--model", "fashion-dit", "--n", "24", "--steps", "3", "--json", "--threads", "1"]
    out = subprocess.run([sys.executable, "-m", "diffquant", *args], capture_output=True, text=True, check=True).stdout
    single = json.loads(out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    # "--" ends torchrun's own options (its --nnodes would swallow our --n)
    cmd = [*torchrun, "--master-port", str(port), "-m", "diffquant", "--", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, [line for line in proc.stderr.splitlines() if "Error" in line or "rror:" in line]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    multi = json.loads(lines[0])
    assert multi["world_size"] == 2 and multi["n"] == single["n"] == 24
    # shards are sampled in other batch compositions: equal up to GEMM rounding
    assert multi["fd"] == pytest.approx(single["fd"], rel=1e-4)
    assert multi["class_consistency"] == single["class_consistency"]
