"""The CLI: each command runs, and bad input gives one clear line and exit code 2, no traceback."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffquant import get_recipe
from diffquant.cli import EXIT_USER_ERROR, app
from diffquant.models import load_builtin, weights_path

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def assert_user_error(result, *needles):
    """Exit code 2 and one line ``Error: ...`` (the last thing printed) holding every needle."""
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for cmd in ("sample", "eval", "train", "demo", "models"):
        assert cmd in result.output


@pytest.mark.parametrize(
    "cmd",
    ["sample", "eval", "train", "demo", "models", "quantize", "recipes", "export-weights", "report", "bench", "export"],
)
def test_every_command_has_help_with_example(cmd):
    result = run(cmd, "--help")
    assert result.exit_code == 0 and "Example: diffquant" in result.output


def test_models_lists_builtins():
    result = run("models")
    assert result.exit_code == 0
    assert "fashion-unet" in result.output and "fashion-dit" in result.output
    rows = json.loads(run("models", "--json").stdout.strip().splitlines()[-1])
    assert {r["name"] for r in rows} >= {"fashion-unet", "fashion-dit", "fashion-features", "fashion-sd"}
    assert all(r["weight_file_bytes"] > 0 for r in rows if r["name"] != "fashion-sd")
    sd = next(r for r in rows if r["name"] == "fashion-sd")  # listed whether or not its folder is trained yet
    assert sd["kind"] == "sd" and (sd["weight_file_bytes"] is None or sd["weight_file_bytes"] > 0)


def test_quantize_json_reports_sizes(tmp_path):
    out = tmp_path / "q"
    result = run("quantize", "--model", "fashion-dit", "--recipe", "w8a8-dynamic", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["out"] == str(out) and info["recipe"] == "w8a8-dynamic" and (out / "model.safetensors").is_file()
    assert 0.2 < info["q_weight_ratio"] < 0.35  # int8 weights with scales, biases and norms: about a quarter


def _short_ft_recipe(path):
    from diffquant.recipe import get_recipe

    recipe = get_recipe("w4a4-ft").replace(
        name="w4a4-ft-short",
        calibration={"n_samples": 2, "batch_size": 2, "steps": 10},
        finetune={"iterations": 6, "samples": 4},
    )
    path.write_text(recipe.to_json())
    return path


def test_quantize_with_a_fine_tuning_recipe_checkpoints_and_resumes(tmp_path):
    path = _short_ft_recipe(tmp_path / "ft.json")
    ckpt, args = tmp_path / "ckpt", ("--model", "fashion-dit", "--recipe", str(path), "--json")
    result = run("quantize", *args, "--out", str(tmp_path / "a"), "--checkpoint", str(ckpt))
    assert result.exit_code == 0, result.output
    saved = torch.load(ckpt / "finetune.pt", weights_only=False)
    assert saved["step"] == 6  # written when training ends, so the same command resumes instead of redoing it
    again = run("quantize", *args, "--out", str(tmp_path / "b"), "--checkpoint", str(ckpt))
    assert again.exit_code == 0, again.output
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first, second = (json.loads((tmp_path / d / "meta.json").read_text())["report"]["finetune"] for d in "ab")
    assert first["iterations"] == second["iterations"] == 6 and (first["resumed_at"], second["resumed_at"]) == (0, 6)


@pytest.mark.slow
def test_quantize_under_torchrun_fine_tunes_data_parallel_and_rank_0_writes(tmp_path):
    import socket

    path = _short_ft_recipe(tmp_path / "ft.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    args = ["quantize", "--model", "fashion-dit", "--recipe", str(path), "--out", str(tmp_path / "q"), "--json"]
    cmd = [*torchrun, "--master-port", str(port), "-m", "diffquant", "--", *args, "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len([line for line in proc.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 alone writes
    report = json.loads((tmp_path / "q" / "meta.json").read_text())["report"]["finetune"]
    single = run("quantize", *args[1:-3], "--out", str(tmp_path / "one"), "--json", "--threads", "1")
    assert single.exit_code == 0, single.output
    one = json.loads((tmp_path / "one" / "meta.json").read_text())["report"]["finetune"]
    assert report["iterations"] == one["iterations"] == 6
    assert report["held_after"] == pytest.approx(one["held_after"], rel=1e-4)  # the same model, trained on two ranks


def test_fine_tuning_options_need_a_fine_tuning_recipe(tmp_path):
    assert_user_error(run("quantize", "--recipe", "w8a8", "--max-minutes", "5"), "--max-minutes", "*-ft", "'w8a8'")
    assert_user_error(run("quantize", "--recipe", "w4a4-ft", "--max-minutes", "-1"), "max_minutes")


def test_sample_writes_png(tmp_path):
    out = tmp_path / "grid.png"
    result = run("sample", "--model", "fashion-dit", "--n", "4", "--steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_json_keys():
    result = run("eval", "--model", "fashion-dit", "--n", "20", "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("fd", "class_consistency", "n", "steps", "seconds"):
        assert key in data
    assert data["n"] == 20 and data["steps"] == 2 and data["fd"] >= 0 and 0 <= data["class_consistency"] <= 1


def test_unknown_model():
    assert_user_error(run("sample", "--model", "sd15", "--n", "2"), "Unknown model", "fashion-unet")


def test_classifier_is_not_a_denoiser():
    assert_user_error(run("eval", "--model", "fashion-features"), "not a denoiser")


def test_unknown_sampler():
    assert_user_error(run("sample", "--model", "fashion-dit", "--n", "2", "--sampler", "euler"), "Unknown sampler")


def test_corrupt_weight_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(weights_path("fashion-dit").read_bytes()[:1000])
    assert_user_error(run("eval", "--model", "fashion-dit", "--weights", str(bad)), "corrupt")


def test_missing_data_directory(tmp_path):
    result = run("train", "features", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "run"))
    assert_user_error(result, "dataset-fashion-mnist", "DIFFQUANT_DATA_DIR")


def test_export_weights_missing_checkpoint(tmp_path):
    assert_user_error(run("export-weights", "unet", "--checkpoint", str(tmp_path / "none.pt")), "not found")
    assert_user_error(run("export-weights", "sd", "--checkpoint", str(tmp_path)), "vae.pt and unet.pt")


def test_export_weights_writes_loadable_shipped_weights(fake_fashion_dir, tmp_path, monkeypatch):
    """The success path, with the shipped file redirected into the test's folder."""
    import diffquant.models.builtin as builtin
    from diffquant.train import train

    ckpt = train("dit", tmp_path / "run", steps=2, data_dir=fake_fashion_dir, log=lambda s: None)
    dest = tmp_path / "shipped" / "fashion-dit.safetensors"
    monkeypatch.setattr(builtin, "weights_path", lambda name: dest)
    result = run("export-weights", "dit", "--checkpoint", str(ckpt))
    assert result.exit_code == 0, result.output
    assert f"exported step 2: {dest}" in result.output
    state = torch.load(ckpt, weights_only=False)
    model = load_builtin("fashion-dit", weights=dest)
    name = "dit.proj_out_2.weight"
    assert torch.equal(model.state_dict()[name], state["ema"][name].half().float())


def test_unknown_train_kind(tmp_path):
    assert_user_error(run("train", "vae"), "unet, dit, features or sd")


def test_train_sd_without_data_or_with_a_warm_start(tmp_path):
    result = run("train", "sd", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "run"))
    assert_user_error(result, "dataset-fashion-mnist")
    assert not (tmp_path / "run").exists()
    result = run("train", "sd", "--warm-start", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "run"))
    assert_user_error(result, "resumes from the checkpoints")


def test_eval_needs_two_samples():
    assert_user_error(run("eval", "--model", "fashion-dit", "--n", "1"), "at least 2")


@pytest.mark.slow
def test_demo_quick(tmp_path):
    result = run("demo", "--quick", "--n", "10", "--out", str(tmp_path / "demo"))
    assert result.exit_code == 0, result.output
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "fashion-unet" in html and "fashion-dit" in html and "<img" in html
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {r["model"] for r in results["rows"]} == {"fashion-unet", "fashion-dit", "fashion-unet (w8a8-tdq)"}
    q_row = results["rows"][-1]
    assert q_row["psnr_vs_fp"] > 37 and q_row["n"] == 10  # measured 43.3 dB
    assert (tmp_path / "demo" / "fashion-unet.png").is_file()
    sub = tmp_path / "demo" / "fashion-unet-w8a8-tdq"
    assert 'href="fashion-unet-w8a8-tdq/report.html"' in html
    for name in ("report.html", "fp.png", "quantized.png", "step_sqnr.png", "ranges.png", "tdq_intervals.png"):
        assert (sub / name).is_file(), name
    # the sub-report reused the demo's FP samples: its FP row is the demo's
    fp = next(r for r in results["rows"] if r["model"] == "fashion-unet")
    assert json.loads((sub / "results.json").read_text())["rows"][0]["fd"] == fp["fd"]


def test_demo_without_quantization(tmp_path):
    result = run("demo", "--quick", "--n", "10", "--no-quantize", "--out", str(tmp_path / "demo"))
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {r["model"] for r in results["rows"]} == {"fashion-unet", "fashion-dit"}


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "diffquant", "sample", "--model", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == EXIT_USER_ERROR
    assert "Unknown model" in proc.stderr and "Traceback" not in proc.stderr


def test_recipes_json_prints_recipe_files_that_load(tmp_path):
    from diffquant.recipe import RECIPES, Recipe

    every = json.loads(run("recipes", "--json").stdout)
    assert set(every) == set(RECIPES) and all(Recipe.from_dict(d) == RECIPES[k] for k, d in every.items())
    one = run("recipes", "w4a4-ft", "--json")
    assert one.exit_code == 0 and Recipe.from_json(one.stdout) == RECIPES["w4a4-ft"]
    (tmp_path / "all.json").write_text(run("recipes", "--json").stdout)
    result = run(
        "quantize", "--model", "fashion-dit", "--recipe", str(tmp_path / "all.json"), "--out", str(tmp_path / "q")
    )
    assert_user_error(result, "all.json", "diffquant recipes NAME --json")
    assert not (tmp_path / "q").exists()
    assert_user_error(run("recipes", "w9a9"), "Unknown recipe 'w9a9'")
    assert "fine-tuned 400 steps" in run("recipes", "w4a4-ft").stdout


def test_recipes_lists_named_recipes():
    result = run("recipes")
    assert result.exit_code == 0
    for name in ("w8a8", "w8a8-dynamic", "w4a8", "w8a6", "w8a4", "w4a4", "fp8"):
        assert name in result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    # what a recipe does beyond its formats is listed with it
    assert "TDQ output fit" in lines["w8a4-tdq"] and "TDQ output fit" not in lines["w8a8-tdq"]
    assert "SmoothQuant searched" in lines["w8a8-smoothquant"] and "SmoothQuant" not in lines["w8a8"]
    assert "mixed precision, 4.5 bits" in lines["auto"]


def test_quantize_then_eval_and_sample_quantized(tmp_path):
    out = tmp_path / "q"
    result = run("quantize", "--model", "fashion-dit", "--recipe", "w8a8", "--n-calib", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "recipe.json", "meta.json"}
    result = run("eval", "--quantized", str(out), "--n", "10", "--steps", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("fd", "class_consistency", "n", "steps", "seconds", "psnr_vs_fp"):
        assert key in data
    assert data["model"] == "fashion-dit" and data["psnr_vs_fp"] > 25  # measured 31.5 dB (4 calibration samples)
    grid = tmp_path / "g.png"
    assert run("sample", "--quantized", str(out), "--n", "2", "--steps", "2", "--out", str(grid)).exit_code == 0
    assert grid.is_file()


def test_bench_json_on_a_quantized_directory(tmp_path):
    out = tmp_path / "q"
    assert (
        run("quantize", "--model", "fashion-dit", "--recipe", "w8a7", "--n-calib", "4", "--out", str(out)).exit_code
        == 0
    )
    result = run("bench", "--quantized", str(out), "--batch", "2", "--repeats", "1", "--no-compile", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("backend", "fp_ms", "q_ms", "speedup", "fp_weight_bytes", "q_weight_bytes", "threads"):
        assert key in data
    assert data["model"] == "fashion-dit" and data["recipe"] == "w8a7" and data["backend"] == "cpu"
    from diffquant.backends.cpu import host

    assert data["cpu"] == host()["text"] and "(" in data["cpu"]  # the model and its int8 ISA flags
    assert data["speedup"] == pytest.approx(data["fp_ms"] / data["q_ms"], rel=0.02)
    # the lowering report's own counts: layers on the int8 kernels, and the weight-only conditioning MLPs
    # (float activations: float matmuls on int8 storage) on the reference path, each with its reason
    lines = data["lowering"].splitlines()
    assert data["lowered_layers"] > 0 and data["reference_layers"] > 0
    assert lines[0].startswith(f"{data['lowered_layers']} layers on ")
    assert lines[0].endswith(f", {data['reference_layers']} on the float reference path")
    reasons = {line.split(" x ", 1)[1]: int(line.split(" x ")[0]) for line in lines[1:] if " x " in line}
    assert sum(reasons.values()) == data["reference_layers"] and any("float activations" in r for r in reasons)
    assert data["q_weight_bytes"] <= 0.26 * data["fp_weight_bytes"]
    assert data["sqnr_vs_reference_db"] > 25


@pytest.mark.slow
def test_bench_default_path_quantizes_compiles_and_samples(tmp_path):
    """No --quantized (the recipe is applied here), compiled (the default), a whole sampling run too."""
    # data-free (no calibration run) with 7-bit activations, which lower on every host (8-bit ones stay on
    # the reference path on CPUs without VNNI)
    recipe = tmp_path / "w8a7-dynamic.json"
    recipe.write_text(get_recipe("w8a8-dynamic").replace(name="w8a7-dynamic", activations="int7").to_json())
    result = run(
        "bench", "--model", "fashion-dit", "--recipe", str(recipe), "--batch", "2", "--repeats", "1",
        "--sampling-steps", "2", "--threads", "2", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["recipe"] == "w8a7-dynamic" and data["lowered_layers"] > 0
    compiled = [k for k in data if "compile" in k and k.endswith("_ms")]
    sampling = [k for k in data if "sampling" in k or "ddim" in k]
    assert compiled and all(data[k] > 0 for k in compiled), sorted(data)
    assert sampling, sorted(data)


def test_export_onnx_from_a_quantized_directory(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "q"
    assert (
        run("quantize", "--model", "fashion-dit", "--recipe", "w8a7", "--n-calib", "4", "--out", str(out)).exit_code
        == 0
    )
    result = run("export", "--quantized", str(out), "--out", str(tmp_path / "m.onnx"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").is_file() and "integer" in result.output
    assert_user_error(run("export", "--quantized", str(out), "--form", "fp4"), "form")
    assert_user_error(run("export", "--quantized", str(tmp_path / "missing")), "missing")


def test_bench_unknown_backend():
    assert_user_error(run("bench", "--backend", "tpu"), "Unknown backend", "cpu")
    assert_user_error(run("bench", "--sampling-steps", "-1"), "--sampling-steps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_bench_cuda_backend_without_a_gpu_is_a_clear_error():
    assert_user_error(run("bench", "--backend", "cuda"), "no CUDA device", "--backend cpu")


def test_unknown_recipe_lists_valid_names(tmp_path):
    result = run("quantize", "--model", "fashion-dit", "--recipe", "w3a3", "--out", str(tmp_path / "q"))
    assert_user_error(result, "Unknown recipe", "w8a8", "w4a4")
    assert not (tmp_path / "q").exists()


def test_eval_quantized_missing_directory(tmp_path):
    assert_user_error(run("eval", "--quantized", str(tmp_path / "none")), "not a directory")


def test_quantize_into_read_only_directory(tmp_path, monkeypatch):
    # root ignores permission bits, so the check that guards the write is what is exercised
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = __import__("os").access
    monkeypatch.setattr(
        "diffquant.serialization.os.access", lambda p, m: False if str(p) == str(ro) else real_access(p, m)
    )
    result = run("quantize", "--model", "fashion-dit", "--recipe", "w8a8-dynamic", "--out", str(ro / "q"))
    assert_user_error(result, "read-only")
    assert list(ro.iterdir()) == []


def test_quantized_directory_for_another_model(tmp_path):
    out = tmp_path / "q"
    assert run("quantize", "--model", "fashion-dit", "--recipe", "w8a8-dynamic", "--out", str(out)).exit_code == 0
    assert_user_error(
        run("eval", "--model", "fashion-unet", "--quantized", str(out), "--n", "4"), "holds a quantized fashion-dit"
    )


def test_bits_out_of_range_in_a_recipe_file(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "w9", "weights": "int9"}))
    assert_user_error(
        run("quantize", "--model", "fashion-dit", "--recipe", str(recipe), "--out", str(tmp_path / "q")), "int9"
    )
    assert not (tmp_path / "q").exists()


def test_recipe_file_with_unknown_field(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "x", "wieghts": "int8"}))
    assert_user_error(run("quantize", "--recipe", str(recipe), "--out", str(tmp_path / "q")), "unknown recipe fields")


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"calibration": {"n_samples": "64"}}', "calibration.n_samples must be an integer, got '64' (str)"),
        ("[1, 2]", "a recipe is a JSON object of recipe fields, got list"),
        ("weights = int8", "is not JSON"),
    ],
)
def test_a_bad_recipe_file_is_named_with_its_field(tmp_path, text, needle):
    recipe = tmp_path / "r.json"
    recipe.write_text(text)
    result = run("quantize", "--model", "fashion-dit", "--recipe", str(recipe), "--out", str(tmp_path / "q"))
    assert_user_error(result, str(recipe), needle)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("cmd", [["quantize", "--recipe", "w8a8-dynamic"], ["sample", "--n", "2"], ["train", "unet"]])
@pytest.mark.parametrize("threads", ["-1", "0"])
def test_threads_must_be_positive(tmp_path, cmd, threads):
    result = run(*cmd, "--threads", threads, "--out", str(tmp_path / "out"))
    assert_user_error(result, "--threads must be a positive number of threads", threads)
    assert not (tmp_path / "out").exists()


def test_truncated_quantized_directory(tmp_path):
    out = tmp_path / "q"
    assert run("quantize", "--model", "fashion-dit", "--recipe", "w8a8-dynamic", "--out", str(out)).exit_code == 0
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    assert_user_error(run("eval", "--quantized", str(out), "--n", "4"), "corrupt")


def test_nan_in_a_weight_file_is_named_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights_path("fashion-dit")))
    name = next(k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2)
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    result = run(
        "sample", "--model", "fashion-dit", "--weights", str(bad), "--n", "2", "--out", str(tmp_path / "g.png")
    )
    assert_user_error(result, "NaN or infinite values in 1 tensors", name)
    assert not (tmp_path / "g.png").exists()


def test_inf_in_a_quantized_directory_is_named_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    assert run("quantize", "--model", "fashion-dit", "--recipe", "w8a8-dynamic", "--out", str(out)).exit_code == 0
    state = load_file(str(out / "model.safetensors"))
    name = next(k for k in state if k.endswith(".weight_scale"))
    state[name] = torch.full_like(state[name], float("inf"))
    save_file(state, str(out / "model.safetensors"))
    assert_user_error(run("eval", "--quantized", str(out), "--n", "4"), "NaN or infinite weights in 1 tensors", name)


def test_report_writes_page_and_figures(tmp_path):
    q = tmp_path / "q"
    assert run("quantize", "--model", "fashion-dit", "--recipe", "w8a8-dynamic", "--out", str(q)).exit_code == 0
    result = run("report", "--quantized", str(q), "--out", str(tmp_path / "r"), "--n", "10", "--steps", "3")
    assert result.exit_code == 0, result.output
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"report.html", "fp.png", "quantized.png", "step_sqnr.png", "ranges.png", "results.json"} <= files
    html = (tmp_path / "r" / "report.html").read_text()
    for src in ("fp.png", "quantized.png", "step_sqnr.png", "ranges.png"):
        assert f'src="{src}"' in html
    # the two grids share a row (side by side); the heat map takes a whole row
    assert html.index('src="fp.png"') < html.index('src="quantized.png"') < html.index('class="wide"')
    assert '<figure class="wide"><img class="plot" src="ranges.png"' in html
    rows = json.loads((tmp_path / "r" / "results.json").read_text())["rows"]
    assert (
        rows[1]["psnr_vs_fp"] > 30  # measured 35.9 dB
        and len(json.loads((tmp_path / "r" / "results.json").read_text())["step_sqnr"]) == 3
    )


def test_train_runs_stops_and_resumes_from_the_cli(fake_fashion_dir, tmp_path):
    out = tmp_path / "run"
    common = ("train", "dit", "--data-dir", str(fake_fashion_dir), "--out", str(out), "--steps", "4", "--threads", "1")
    stopped = run(*common, "--max-minutes", "1e-9", "--no-export")
    assert stopped.exit_code == 0 and "run the same command to resume" in stopped.output, stopped.output
    done = run(*common, "--no-export")
    assert done.exit_code == 0 and "stopped at" not in done.output and (out / "checkpoint.pt").is_file()
    from diffquant.train import checkpoint_progress

    assert checkpoint_progress(out / "checkpoint.pt", 4) == (4, 4)


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    import diffquant.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
