"""Probe: one fine-tuning setting on a built-in model, scored before and after with the PTQ table's protocol.

    OMP_NUM_THREADS=1 python benchmarks/probes/finetune.py fashion-unet w4a4-tdq 500
    OMP_NUM_THREADS=1 python benchmarks/probes/finetune.py fashion-unet "w4a4-tdq+iterations=4000+lr=1e-3" 500

The setting is a named recipe followed by ``+key=value`` changes to its :class:`FinetuneConfig`
(``train`` takes ``lora/scales``) or to the recipe's own string / number fields (``act_mode=dynamic``).
``;`` chains stages, each a fine-tuning run from where the last one ended with more changes to its
config (``"w2a8-ft+iterations=2000;rollout=5+iterations=200"``: one-step distillation, then trajectory
matching); the row's ``stages`` keeps each one's report. Prints and appends to ``benchmarks/results/finetune_probe.jsonl``
one JSON line: FD against the training set and PSNR against the FP images from identical noise
(DDIM-50, seed 0), before and after fine-tuning, the held-out distillation loss, seconds and peak RSS.
The FP images and the PTQ model (``.ptq_MODEL_RECIPE/``, with its scores) are cached beside this file,
the fine-tuned model is saved there (``.ft_MODEL_SETTING/``). A probe harness (no resume, no interval); the
fine-tuning table is the protocol of record.
"""

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch
from fp_cache import fp_images

sys.path.insert(0, str(Path(__file__).parents[1]))
from scale import cpu_model  # benchmarks/scale.py: the CPU model and its int8 ISA flags

import diffquant
from diffquant.eval import Evaluator, psnr
from diffquant.models import load_builtin
from diffquant.recipe import FinetuneConfig, get_recipe
from diffquant.sampling import sample

OUT = Path(__file__).parents[1] / "results" / "finetune_probe.jsonl"


def parse(setting: str, base: FinetuneConfig | None = None):
    name, *changes = setting.split("+")
    recipe = get_recipe(name)
    config = base or recipe.finetune or FinetuneConfig()
    fields = {f.name: f.type for f in dataclasses.fields(FinetuneConfig)}
    kw, recipe_kw = {}, {}
    recipe_fields = {f.name: f.type for f in dataclasses.fields(type(recipe))}
    for change in changes:
        key, value = change.split("=")
        if key == "act_group":  # per-token scales per group of this many channels (the settings' old spelling)
            recipe_kw["act_group"] = value
            continue
        if key not in fields and key in recipe_fields and key != "finetune":  # a recipe field (str / int / float)
            default = getattr(recipe, key)
            recipe_kw[key] = value if isinstance(default, str) else type(default)(value)
            continue
        if key not in fields:
            raise SystemExit(f"unknown change {key!r}: use one of {', '.join(fields)} or a recipe field")
        default = getattr(config, key)
        if key == "train":
            kw[key] = tuple(value.split("/"))
        elif isinstance(default, bool) or default is None:
            kw[key] = float(value)
        else:
            kw[key] = type(default)(value)
    if recipe_kw:
        label = recipe.name + "".join(f"+{k}={v}" for k, v in recipe_kw.items())
        if "act_group" in recipe_kw:
            recipe_kw.update(act_granularity="group", act_group_size=int(recipe_kw.pop("act_group")))
        recipe = recipe.replace(name=label, **recipe_kw)
    return recipe, dataclasses.replace(config, **kw)


def stage_configs(config: FinetuneConfig, stages: list[str]) -> list[FinetuneConfig]:
    """The configs of the chained stages after the first: each one the last with its changes."""
    out = [config]
    for stage in stages:
        recipe, config = parse("w8a8+" + stage, base=out[-1])  # a later stage fine-tunes the same PTQ model
        if recipe.name != "w8a8":
            raise SystemExit(f"stage {stage!r} changes the recipe; only the first stage can")
        out.append(config)
    return out


def main() -> None:
    model_name, setting, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    first, *more = setting.split(";")
    recipe, config = parse(first)
    configs = stage_configs(config, more)
    evaluator = Evaluator()
    kw = dict(n=n, steps=50, sampler="ddim", seed=0, progress=False)
    fp, _ = fp_images(model_name, n)

    def score(model, lowered: int = 0) -> dict:
        images, labels = sample(model, **kw)
        s = evaluator.score(images, labels)
        out = {"fd": round(s["fd"], 4), "cc": round(s["class_consistency"], 3), "psnr": round(psnr(images, fp), 2)}
        if lowered:  # the first images again on the CPU integer backend, against the reference path's
            import copy

            from diffquant.backends import lower

            low, report = lower(copy.deepcopy(model), "cpu")
            out["lowered_psnr"] = round(psnr(sample(low, **{**kw, "n": lowered})[0], images[:lowered]), 2)
            out["lowering"] = report.summary().splitlines()[0]
        return out

    ptq = Path(__file__).parent / f".ptq_{model_name}_{recipe.name}"  # the PTQ model and its scores, reused
    # a cache made by an older probe (per-group scales once were a monkeypatch) holds another recipe
    cached = ptq / "recipe.json"
    if cached.is_file() and json.loads(cached.read_text()) != json.loads(recipe.replace(finetune=None).to_json()):
        print(f"{ptq.name}: cached under another recipe, quantizing again", flush=True)
        (ptq / "before.json").unlink(missing_ok=True)
    if (ptq / "before.json").is_file():
        qmodel = diffquant.load_quantized(ptq, load_builtin(model_name))
        before, quantize_s = json.loads((ptq / "before.json").read_text())
    else:
        start = time.time()
        qmodel = diffquant.quantize(load_builtin(model_name), recipe.replace(finetune=None), progress=False)
        quantize_s = time.time() - start
        before = score(qmodel)
        diffquant.save_quantized(qmodel, ptq, model_name)
        (ptq / "before.json").write_text(json.dumps([before, quantize_s]))
    start, stages = time.time(), []
    for stage in configs:  # each stage thaws the model from its integer weights and freezes it again
        diffquant.finetune(qmodel, load_builtin(model_name), stage, progress=False)
        stages.append(dict(qmodel.diffquant_report["finetune"]))
    finetune_s = time.time() - start
    diffquant.freeze(qmodel)  # integers again, as quantize() leaves a fine-tuned model
    # the fine-tuned model, for later evaluations (lowering, N = 5000): not committed
    diffquant.save_quantized(qmodel, Path(__file__).parent / f".ft_{model_name}_{setting}", model_name)
    after = score(qmodel, lowered=64)
    report = {**stages[-1], "held_before": stages[0]["held_before"]}
    row = dict(
        model=model_name, setting=setting, n=n, before=before, after=after,
        held_before=report["held_before"], held_after=report["held_after"], iterations=report["iterations"],
        best_step=report.get("best_step"), held_curve=report.get("held_curve"),
        quantize_s=round(quantize_s), finetune_s=round(finetune_s),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        threads=torch.get_num_threads(), cpu=cpu_model(), date=time.strftime("%Y-%m-%d"),
    )  # fmt: skip
    if len(stages) > 1:
        keep = ("iterations", "seconds", "held_before", "held_after", "best_step", "rollout")
        row["stages"] = [{k: s.get(k) for k in keep} for s in stages]
    print(json.dumps(row), flush=True)
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
