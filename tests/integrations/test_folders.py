"""`diffquant quantize --model FOLDER`: diffusers pipeline folders, bare UNet folders, the local hub cache,
and the quantized pipeline directory that `diffquant sample` runs; real diffusers models built in the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

from diffquant import CalibrationConfig, Recipe, load_quantized, quantize
from diffquant.denoiser import UnsupportedModelError
from diffquant.integrations.folders import ModelSourceError, load_folder, random_latent_sampler, read_prompts, resolve
from diffquant.integrations.pipelines import sample_pipeline
from diffquant.nn import QuantModule
from diffquant.trajectory import recording
from tests.integrations.tiny_pipelines import PROMPTS, save_tiny, tiny_unet2d
from tests.test_cli import assert_user_error, run

# diffusers and transformers bind their log handler to sys.stderr when first used: bind it now, at collection,
# to the real stream, not to the CliRunner's of whichever test first imports them (closed after that run)
diffusers_logging.get_logger("diffusers")
transformers_logging.get_logger("transformers")

# a tiny calibration (2 trajectories of 3 steps), as a recipe file the CLI reads
RECIPE = {"name": "w8a8-tiny", "calibration": {"steps": 3, "n_samples": 2, "batch_size": 2, "every": 1}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    out = {kind: save_tiny(kind, root / kind) for kind in ("sd", "dit", "unet", "unet2d")}
    (root / "recipe.json").write_text(json.dumps(RECIPE))
    # 7-bit activations: lowered to the int8 kernels on every host (8-bit ones stay on the reference path
    # on CPUs without VNNI, where the kernels' int16 sums could saturate)
    (root / "recipe_a7.json").write_text(json.dumps({**RECIPE, "name": "w8a7-tiny", "activations": "int7"}))
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n")  # a blank line is skipped
    return out | {"recipe": root / "recipe.json", "recipe_a7": root / "recipe_a7.json", "prompts": root / "prompts.txt"}


def quantize_cli(folders, model: str, out: Path, *more: str):
    return run("quantize", "--model", model, "--recipe", str(folders["recipe"]), "--out", str(out), "--json", *more)


def test_a_pipeline_folder_with_prompts_quantizes_as_the_library_does_and_samples(folders, tmp_path):
    result = quantize_cli(folders, str(folders["sd"]), tmp_path / "q", "--prompts", str(folders["prompts"]))
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["model"] == str(folders["sd"]) and 0.2 < info["q_weight_ratio"] < 0.3  # int8 UNet
    meta = json.loads((tmp_path / "q" / "meta.json").read_text())
    assert meta["pipeline_class"] == "StableDiffusionPipeline" and meta["component"] == "unet"
    assert meta["source"] == str(folders["sd"]) and meta["model"] is None
    # the CLI calibrated on the file's prompts: the library call with those prompts gives the same integers
    pipe = quantize(load_folder(folders["sd"]), Recipe.from_dict(RECIPE), prompts=PROMPTS[:2], progress=False)
    saved = load_file(str(tmp_path / "q" / "model.safetensors"))
    expected = pipe.unet.state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)

    img = tmp_path / "img.png"
    result = run(
        "sample", "--quantized", str(tmp_path / "q"), "--prompt", "a red shoe", "--steps", "3", "--out", str(img)
    )
    assert result.exit_code == 0, result.output
    pixels = np.asarray(Image.open(img))
    # the directory loads by itself; its image is the in-process quantized pipeline's, bit for bit
    reference = sample_pipeline(pipe, 1, 3, 0, "a red shoe")[0]
    assert pixels.shape == reference.shape == (8, 8, 3)
    np.testing.assert_array_equal(pixels, (reference * 255).round().clip(0, 255).astype(np.uint8))
    grid = tmp_path / "grid.png"
    result = run(
        "sample", "--quantized", str(tmp_path / "q"), "--prompt", "a red shoe", "--steps", "2", "--n", "3",
        "--out", str(grid),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(grid).size == (3 * 8 + 4 * 2, 8 + 2 * 2)  # one row of three, 2-pixel gaps


def test_a_class_conditional_pipeline_folder_needs_no_prompts(folders, tmp_path):
    result = quantize_cli(folders, str(folders["dit"]), tmp_path / "q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "q" / "pipeline" / "model_index.json").is_file()
    result = run("sample", "--quantized", str(tmp_path / "q"), "--steps", "2", "--out", str(tmp_path / "dit.png"))
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "dit.png").size == (8, 8)
    assert_user_error(
        run("sample", "--quantized", str(tmp_path / "q"), "--prompt", "x", "--steps", "2"), "takes no prompt"
    )
    assert_user_error(quantize_cli(folders, str(folders["dit"]), tmp_path / "x", "--prompts", str(folders["prompts"])),
                      "--prompts applies to text-conditioned pipelines", "DiTPipeline")  # fmt: skip
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind, cls", [("unet", "UNet2DConditionModel"), ("unet2d", "UNet2DModel")])
def test_a_bare_unet_folder_calibrates_on_random_latents_and_loads_alone(folders, tmp_path, kind, cls):
    result = quantize_cli(folders, str(folders[kind]), tmp_path / "q")
    assert result.exit_code == 0, result.output
    assert "random latents" in result.stderr and "stand-in" in result.stderr
    meta = json.loads((tmp_path / "q" / "meta.json").read_text())
    assert meta["model_class"] == cls and meta["num_timesteps"] == 1000 and "pipeline_class" not in meta
    loaded = load_quantized(tmp_path / "q")  # rebuilt from denoiser/config.json, no model argument
    assert type(loaded).__name__ == cls and any(isinstance(m, QuantModule) for m in loaded.modules())
    # the same as the library call with the stand-in loop
    model = load_folder(folders[kind])
    recipe = Recipe.from_dict(RECIPE)
    quantize(model, recipe, random_latent_sampler(model, recipe.calibration), num_timesteps=1000, progress=False)
    saved = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert_user_error(
        run("sample", "--quantized", str(tmp_path / "q"), "--n", "1"), f"holds a quantized {cls}", "built-in models"
    )


def test_the_stand_in_loop_runs_n_samples_of_steps():
    model = tiny_unet2d().eval()
    config = CalibrationConfig(n_samples=3, steps=4, batch_size=2)
    with recording(model) as trajectory:
        random_latent_sampler(model, config)(model)
    assert trajectory.n_runs == 2 and len(trajectory) == 8  # batches of 2 and 1, four steps each
    assert sorted(trajectory.samples) == [0, 1, 2]
    assert [c.step.index for c in trajectory][:4] == [0, 1, 2, 3]
    with pytest.raises(UnsupportedModelError, match="pipeline folder"):
        from diffusers import AutoencoderKL

        random_latent_sampler(AutoencoderKL(block_out_channels=(32,), norm_num_groups=32), config)


def test_a_hub_id_is_read_from_the_local_cache_only(folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    result = run("quantize", "--model", "nobody/not-cached", "--out", str(tmp_path / "q"))
    assert_user_error(result, "nobody/not-cached", "not in the local Hugging Face cache", "hf download", str(cache))
    assert not (tmp_path / "q").exists()
    # the cache's layout: refs/main names the snapshot folder holding the files
    repo = cache / "models--org--tiny-dit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(folders["dit"], repo / "snapshots" / "0123abcd")
    result = run("quantize", "--model", "org/tiny-dit", "--recipe", "w8a8-dynamic", "--out", str(tmp_path / "q"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "q" / "meta.json").read_text())["source"] == "org/tiny-dit"


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda d: None, ["is not a diffusers model", "model_index.json", "_class_name", "neither file is there"]),
        (lambda d: (d / "config.json").write_text('{"architectures": ["CLIPTextModel"]}'), ["_class_name None"]),
        (lambda d: (d / "config.json").write_text('{"_class_name": "CLIPTextModel"}'), ["'CLIPTextModel'"]),
        (lambda d: (d / "config.json").write_text("[1, 2]"), ["not a JSON object"]),
        (lambda d: (d / "recipe.json").write_text("{}"), ["is not a diffusers model", "--quantized"]),
    ],
)
def test_a_folder_that_is_no_diffusers_model_is_one_error_line(tmp_path, make, needles):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    make(folder)
    result = run("quantize", "--model", str(folder), "--out", str(tmp_path / "q"))
    assert_user_error(result, str(folder), *needles)
    assert not (tmp_path / "q").exists()


def test_a_diffusers_folder_without_its_weights_is_one_error_line(folders, tmp_path):
    broken = tmp_path / "unet"
    broken.mkdir()
    shutil.copy(folders["unet"] / "config.json", broken / "config.json")
    assert_user_error(run("quantize", "--model", str(broken), "--out", str(tmp_path / "q")), "cannot load", str(broken))


def test_bad_prompts_and_options_are_one_error_line(folders, tmp_path):
    out = str(tmp_path / "q")
    sd, unet = str(folders["sd"]), str(folders["unet"])
    assert_user_error(run("quantize", "--model", sd, "--out", out), "text-conditioned", "--prompts FILE")
    assert_user_error(run("quantize", "--model", sd, "--prompts", str(tmp_path / "none.txt"), "--out", out),
                      "none.txt: no such file")  # fmt: skip
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert_user_error(run("quantize", "--model", sd, "--prompts", str(tmp_path / "empty.txt"), "--out", out),
                      "holds no prompt")  # fmt: skip
    assert_user_error(run("quantize", "--model", unet, "--prompts", str(folders["prompts"]), "--out", out),
                      "bare denoiser", "pipeline folder")  # fmt: skip
    assert_user_error(run("quantize", "--model", "fashion-dit", "--prompts", str(folders["prompts"]), "--out", out),
                      "class-conditional built-in")  # fmt: skip
    assert_user_error(run("quantize", "--model", unet, "--weights", str(tmp_path / "w.safetensors"), "--out", out),
                      "--weights applies to the built-in models")  # fmt: skip
    assert_user_error(run("quantize", "--model", "sd15", "--out", out), "'sd15'", "fashion-unet", "hub id")
    for into in (folders["unet"], folders["unet"].parent):  # the model's own folder is never replaced
        assert_user_error(run("quantize", "--model", unet, "--out", str(into)), "would replace the folder")
    assert (folders["unet"] / "config.json").is_file()
    assert not (tmp_path / "q").exists()
    assert read_prompts(folders["prompts"]) == PROMPTS[:2]
    with pytest.raises(ModelSourceError, match="not a folder"):
        resolve(str(tmp_path / "missing"))


def test_eval_bench_and_report_compare_a_quantized_pipeline_directory_with_the_folder_it_came_from(
    folders, tmp_path, monkeypatch
):
    q = tmp_path / "q"
    monkeypatch.chdir(folders["dit"].parent)  # a folder given relative to the working directory ...
    assert quantize_cli(folders, folders["dit"].name, q).exit_code == 0
    monkeypatch.chdir(tmp_path)  # ... is recorded absolute: eval finds it from anywhere
    result = run("eval", "--quantized", str(q), "--n", "4", "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["source"] == str(folders["dit"].resolve()) and info["n"] == 4
    assert 20 < info["psnr_vs_fp"] < 100  # int8 of a tiny random DiT: close to its FP images, not equal (cap 100)
    for args in (("--sampler", "ddpm"), ("--model", "fashion-unet")):
        assert_user_error(run("eval", "--quantized", str(q), *args), "leave out --model, --weights and --sampler")
    assert_user_error(
        run("sample", "--quantized", str(q), "--sampler", "ddpm"), "leave out --model, --weights and --sampler"
    )
    q_sd = tmp_path / "q-sd"
    args = ("--recipe", str(folders["recipe_a7"]), "--prompts", str(folders["prompts"]), "--out", str(q_sd))
    assert run("quantize", "--model", str(folders["sd"]), *args).exit_code == 0
    assert_user_error(run("eval", "--quantized", str(q_sd), "--n", "2", "--steps", "2"), "pass a prompt")
    result = run("eval", "--quantized", str(q_sd), "--n", "2", "--steps", "2", "--prompt", "a red shoe", "--json")
    assert result.exit_code == 0, result.output
    assert 20 < json.loads(result.stdout.strip().splitlines()[-1])["psnr_vs_fp"] < 100
    result = run("bench", "--quantized", str(q_sd), "--batch", "2", "--repeats", "1", "--no-compile", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert (
        info["model"] == str(folders["sd"].resolve()) and info["lowered_layers"] > 0 and info["q_weight_ratio"] < 0.35
    )
    # the int8 kernels against the fake-quant reference, same call: equal integers up to codes flipped at
    # rounding ties, which propagate (29.5 dB on an AVX2 host; a wrong scale or saturation is far below)
    assert info["sqnr_vs_reference_db"] > 25
    assert_user_error(run("bench", "--quantized", str(q_sd), "--sampling-steps", "2"), "leave out --model")
    report = tmp_path / "report"
    result = run(
        "report", "--quantized", str(q_sd), "--out", str(report), "--n", "10", "--steps", "2", "--prompt", "a red shoe"
    )
    assert result.exit_code == 0, result.output
    results = json.loads((report / "results.json").read_text())
    assert [r["index"] for r in results["step_sqnr"]] == [0, 1] and all(r["sqnr_db"] > 20 for r in results["step_sqnr"])
    assert 20 < results["metrics"]["psnr_vs_fp"] < 100 and (report / "quantized.png").is_file()
    assert "w8a7-tiny" in (report / "report.html").read_text()  # the quantized row, named by its recipe


def test_a_pipelines_unet_folder_calibrates_with_the_scheduler_beside_it(folders, tmp_path):
    from diffquant.integrations.folders import scheduler_for

    assert scheduler_for(folders["sd"] / "unet").config.beta_schedule == "scaled_linear"  # the tiny SD's own
    assert scheduler_for(folders["unet"]).config.beta_schedule == "linear"  # no scheduler/ beside it: defaults
    result = quantize_cli(folders, str(folders["sd"] / "unet"), tmp_path / "q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "q" / "meta.json").read_text())["model_class"] == "UNet2DConditionModel"
