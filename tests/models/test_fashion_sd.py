"""fashion-sd: captions, the offline tokenizer, two-phase training that resumes, and a pipeline folder
that diffusers loads by itself."""

import copy

import pytest
import torch

from diffquant.models import fashion_sd as sd
from diffquant.train import export_sd, train_sd


def tiny_sd_config() -> dict:
    cfg = copy.deepcopy(sd.config())
    cfg["vae"].update(block_out_channels=[32, 32, 32])
    cfg["text_encoder"].update(hidden_size=32, intermediate_size=64)
    cfg["unet"].update(block_out_channels=[32, 64], cross_attention_dim=32, attention_head_dim=2)
    cfg["train_vae"].update(steps=2, batch_size=4)
    cfg["train"].update(steps=3, batch_size=4, warmup_steps=1, decay_steps=1)
    return cfg


def test_prompts_read_as_english():
    assert sd.prompt(9) == "a photo of an ankle boot"
    assert sd.prompt(1, ("dark",)) == "a photo of a dark pair of trousers"
    assert sd.prompt(1, ("dark",), noun=1) == "a photo of dark trousers"
    assert sd.prompt(0, ("light",), template=0) == "a light t-shirt"
    g = torch.Generator().manual_seed(0)
    texts = [sd.caption(label, 0, 2, g) for label in range(10) for _ in range(20)]
    assert sd.caption(3, 1, 1, torch.Generator().manual_seed(5)) == sd.caption(
        3, 1, 1, torch.Generator().manual_seed(5)
    )
    assert any("patterned" in t for t in texts) and any("dark" in t for t in texts)
    assert not any("light" in t or "plain" in t for t in texts)  # tertiles 0 / 2 name only dark / patterned


def test_every_caption_word_is_one_token_and_other_words_spell_out(tmp_path):
    tok = sd.build_tokenizer(tmp_path, max_length=16)
    for word in sd.vocabulary():
        assert tok.tokenize(word) == [word + "</w>"], word
    assert tok.tokenize("t-shirt") == ["t</w>", "-</w>", "shirt</w>"]
    pieces = tok.tokenize("zebra")  # not a caption word: pieces of the vocabulary, no unknown token
    assert "".join(pieces).replace("</w>", "") == "zebra" and tok.unk_token not in pieces
    ids = sd.tokenize(tok, ["a photo of an ankle boot", ""])
    assert ids.shape == (2, 16) and ids[0, 0] == 0 and ids[1, 1] == 1  # start, then end-of-text padding


def test_attributes_are_tertiles_within_each_class():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 28, 28), generator=g, dtype=torch.uint8)
    images[:30] //= 3  # the darker half of each class
    labels = torch.arange(60) % 2
    tone, texture = sd.attributes(images, labels)
    for c in (0, 1):
        for attribute in (tone, texture):
            assert torch.bincount(attribute[labels == c], minlength=3).tolist() == [10, 10, 10]
    assert tone[:30].max() <= 1 and tone[30:].min() >= 1  # the dark tertile holds only darkened images


def test_training_resumes_where_it_stopped_and_exports_a_pipeline(fake_fashion_dir, tmp_path, monkeypatch):
    """Stopped after every step (``max_minutes=0``) through both phases and resumed each time: the same
    EMA weights, optimizer moments and latent scaling as one straight run; the export loads with
    ``StableDiffusionPipeline.from_pretrained``, generates from a prompt and by the evaluation protocol."""
    quiet = {"data_dir": fake_fashion_dir, "log": lambda s: None, "cfg": tiny_sd_config()}
    assert train_sd(tmp_path / "a", **quiet) == (5, 5)
    progress = [train_sd(tmp_path / "b", max_minutes=0, **quiet) for _ in range(6)]
    assert progress[0] == (1, 5) and progress[-1] == (5, 5)
    straight, resumed = (torch.load(tmp_path / d / "unet.pt", weights_only=False) for d in "ab")
    assert straight["scaling_factor"] == resumed["scaling_factor"] > 0
    for key in ("model", "ema"):
        assert straight[key].keys() == resumed[key].keys()
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(straight["opt"]["state"].values(),
                                                             resumed["opt"]["state"].values(), strict=True)]  # fmt: skip
    assert moments and all(torch.equal(a, b) for a, b in moments)

    folder = export_sd(tmp_path / "a", tmp_path / "pipe")
    from tests.test_cli import run  # the CLI's export writes the shipped folder: redirected here

    monkeypatch.setattr(sd, "pipeline_dir", lambda: tmp_path / "shipped")
    result = run("export-weights", "sd", "--checkpoint", str(tmp_path / "a"))
    assert result.exit_code == 0 and (tmp_path / "shipped" / "model_index.json").is_file(), result.output
    assert (folder / "model_index.json").is_file() and not list(tmp_path.glob(".pipe-*"))
    pipe = sd.load_fashion_sd(folder)
    assert pipe.vae.config.scaling_factor == pytest.approx(straight["scaling_factor"])
    assert pipe.unet.dtype == torch.float32
    name = "conv_in.weight"
    assert torch.equal(pipe.unet.state_dict()[name], straight["ema"]["unet." + name].half().float())
    image = pipe("a photo of an ankle boot", num_inference_steps=2, guidance_scale=3.0, output_type="np").images
    assert image.shape == (1, 32, 32, 1)

    images, labels = sd.generate(pipe, 12, steps=2, batch_size=5, start=3)  # the evaluation protocol
    assert images.shape == (12, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert labels.tolist() == [(3 + i) % 10 for i in range(12)]
    again, _ = sd.generate(pipe, 12, steps=2, batch_size=5, start=3)
    assert torch.equal(images, again)  # identical noise and prompts: identical images
    other, _ = sd.generate(pipe, 12, steps=2, batch_size=5, start=3, seed=1)
    assert not torch.allclose(images, other)


def test_a_missing_pipeline_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffquant train sd"):
        sd.load_fashion_sd(tmp_path)


def test_cli_quantizes_fashion_sd_on_its_class_prompts_and_samples(tmp_path, monkeypatch):
    """``--model fashion-sd`` is the shipped folder (here one with random weights), calibrated on its ten
    class prompts when no --prompts is given; a missing folder is one line that says how to get it."""
    import json

    from PIL import Image

    from tests.test_cli import assert_user_error, run

    monkeypatch.setattr(sd, "pipeline_dir", lambda: tmp_path / "missing")
    assert_user_error(run("quantize", "--model", "fashion-sd", "--out", str(tmp_path / "q")), "diffquant train sd")
    assert not (tmp_path / "q").exists()
    torch.manual_seed(0)
    folder = sd.save_pipeline(sd.build_components(tiny_sd_config(), tmp_path / "tok"), tmp_path / "fashion-sd")
    monkeypatch.setattr(sd, "pipeline_dir", lambda: folder)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"name": "w8a8-tiny", "calibration": {"steps": 2, "n_samples": 2, "batch_size": 2}}))
    result = run("quantize", "--model", "fashion-sd", "--recipe", str(recipe), "--out", str(tmp_path / "q"), "--json")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "q" / "meta.json").read_text())
    assert meta["source"] == "fashion-sd" and meta["pipeline_class"] == "StableDiffusionPipeline"
    # the shipped folder given by its path is fashion-sd too: its class prompts calibrate, eval scores FD
    result = run("quantize", "--model", str(folder), "--recipe", str(recipe), "--out", str(tmp_path / "q2"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "q2" / "meta.json").read_text())["source"] == "fashion-sd"
    image = tmp_path / "boot.png"
    args = ("--prompt", "a photo of an ankle boot", "--steps", "2", "--out", str(image))
    result = run("sample", "--quantized", str(tmp_path / "q"), *args)
    assert result.exit_code == 0, result.output
    assert Image.open(image).size == (32, 32)
    result = run("eval", "--quantized", str(tmp_path / "q"), "--n", "10", "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["source"] == "fashion-sd" and info["guidance_scale"] == sd.GUIDANCE and info["n"] == 10
    assert info["fd"] > 0 and info["fd_fp"] > 0 and info["fd_vs_fp"] >= 0 and 0 <= info["class_consistency"] <= 1
    assert 20 < info["psnr_vs_fp"] < 100
    report = tmp_path / "report"
    result = run("report", "--quantized", str(tmp_path / "q"), "--out", str(report), "--n", "10", "--steps", "2")
    assert result.exit_code == 0, result.output
    results = json.loads((report / "results.json").read_text())
    assert {"fd", "fd_fp", "class_consistency"} <= results["metrics"].keys() and len(results["step_sqnr"]) == 2
    assert Image.open(report / "fp.png").size == Image.open(report / "quantized.png").size
