"""Recipes and their configs: every validation branch, types named by field, JSON round trips."""

import json

import pytest

import diffquant
from diffquant.recipe import (
    RECIPES,
    CalibrationConfig,
    GPTQConfig,
    OutputFitConfig,
    Override,
    Recipe,
    RecipeFieldError,
    get_recipe,
)

# (constructor keywords, the message it must give): one per validation branch of recipe.py
CALIBRATION = [
    ({"selection": "random"}, "selection must be one of"),
    ({"sampler": "euler"}, "sampler"),
    ({"steps": 0}, "steps"),
    ({"uniform_from": "middle"}, "uniform_from must be 'first' or 'last'"),
    ({"n_samples": 0}, "n_samples, every and batch_size must be >= 1"),
    ({"every": 0}, "n_samples, every and batch_size must be >= 1"),
    ({"batch_size": 0}, "n_samples, every and batch_size must be >= 1"),
    ({"single_index": 50}, "single_index 50 is outside a 50-step schedule"),
    ({"single_index": -51}, "single_index -51 is outside"),
    ({"ndtc_std": 0.0}, "ndtc_std must be > 0"),
    ({"n_samples": "64"}, r"calibration\.n_samples must be an integer, got '64' \(str\)"),
    ({"n_samples": 64.0}, r"calibration\.n_samples must be an integer"),
    ({"ndtc_mean": "0.4"}, r"calibration\.ndtc_mean must be a number"),
    ({"selection": 1}, r"calibration\.selection must be a string"),
]
GPTQ = [
    ({"every": 0}, "every, max_samples and rows_per_call must be >= 1"),
    ({"max_samples": 0}, "every, max_samples and rows_per_call must be >= 1"),
    ({"rows_per_call": 0}, "every, max_samples and rows_per_call must be >= 1"),
    ({"uniform_from": "middle"}, "gptq uniform_from"),
    ({"damp": 0.0}, r"damp must be in \(0, 1\)"),
    ({"damp": 1.0}, r"damp must be in \(0, 1\)"),
    ({"hessian_bytes": 0}, "hessian_bytes must be >= 1 or None"),
    ({"hessian_bytes": "1GB"}, r"gptq\.hessian_bytes must be an integer or null"),
    ({"every": True}, r"gptq\.every must be an integer, got True"),
]
OUTPUT_FIT = [
    ({"correction_samples": 0}, "correction_samples and tdq_batch must be >= 1"),
    ({"tdq_batch": 0}, "correction_samples and tdq_batch must be >= 1"),
    ({"tdq_refit_iters": -1}, "tdq_refit_iters >= 0"),
    ({"tdq_lr": 0.0}, "tdq_lr must be > 0"),
    ({"seed": None}, r"output_fit\.seed must be an integer"),
]
OVERRIDE = [
    ({"pattern": "*", "weights": "int9"}, "int9"),
    ({"pattern": "*", "activations": "uint3x"}, "uint3x"),
    ({"pattern": "*", "weight_group_size": -1}, "weight_group_size must be 0 \\(per channel\\), 1..4096 or None"),
    ({"pattern": "*", "weight_group_size": 5000}, "weight_group_size must be 0"),
    ({"pattern": 3}, "override pattern must be a string, got 3"),
    ({"pattern": "*", "skip": "yes"}, "override skip must be true or false"),
]
RECIPE = [
    ({"version": 99}, "recipe version 99 is not supported"),
    ({"weights": "int9"}, "int9"),
    ({"activations": "ternary"}, "activations take int2..int8 or fp8_e4m3"),
    ({"softmax": "binary"}, "activations take int2..int8 or fp8_e4m3"),
    ({"weight_group_size": 0}, r"weight_group_size must be in 1..4096 or None, got 0"),
    ({"weight_method": "awq"}, "weight_method must be one of"),
    ({"act_mode": "learned"}, "act_mode must be static, bucketed, tdq or dynamic"),
    ({"tdq_hidden": 0}, "tdq_hidden and tdq_freqs must be >= 1, tdq_iters >= 0"),
    ({"tdq_freqs": 0}, "tdq_hidden and tdq_freqs must be >= 1"),
    ({"tdq_iters": -1}, "tdq_iters >= 0"),
    ({"tdq_fit": "loss"}, "tdq_fit must be 'range' or 'output'"),
    ({"tdq_fit_iters": -1}, "tdq_fit_iters >= 0"),
    ({"tdq_fit": "output"}, "tdq_fit='output' refits TDQ ranges: it needs act_mode='tdq'"),
    ({"act_granularity": "channel"}, "act_granularity must be tensor, token or group"),
    ({"act_granularity": "group", "act_mode": "dynamic", "act_group_size": 0}, "act_group_size must be >= 1"),
    ({"act_granularity": "group"}, "per-group activation scales need act_mode=.dynamic."),
    ({"act_granularity": "token"}, "per-token activation scales need act_mode='dynamic'"),
    ({"act_mode": "bucketed", "buckets": 1}, "bucketed mode needs buckets >= 2"),
    ({"observer": "kl"}, "observer must be one of"),
    ({"percentile": 0.0}, r"percentile must be in \(0, 100\]"),
    ({"percentile": 101.0}, r"percentile must be in \(0, 100\]"),
    ({"step_percentile": 0.0}, r"step_percentile must be in \(0, 1\]"),
    ({"step_reduction": "max"}, "step_reduction 'min' or 'mean'"),
    ({"smoothquant_alpha": 1.5}, r"smoothquant_alpha must be in \[0, 1\] or None"),
    ({"weight_bits_budget": 9.0}, "weight_bits_budget must lie above the bits of weights"),
    ({"weights": "int4", "weight_bits_budget": 4.0}, "weight_bits_budget must lie above"),
    ({"weights": "none", "weight_bits_budget": 6.0}, "weight_bits_budget must lie above"),
    ({"quant_level": 3.5}, "quant_level must be one of"),
    ({"lp_norm": 0.0}, "lp_norm must be > 0"),
    ({"attention": "true"}, "recipe field attention must be true or false, got 'true'"),
    ({"exclude": "time_embedding*"}, "recipe field exclude must be a list of strings"),
    ({"overrides": ({"pattern": "*"},)}, "recipe field overrides must be a list of Override objects"),
    ({"calibration": {"n_samples": 4}}, "recipe field calibration must be CalibrationConfig"),
]


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        *[(CalibrationConfig, k, m) for k, m in CALIBRATION],
        *[(GPTQConfig, k, m) for k, m in GPTQ],
        *[(OutputFitConfig, k, m) for k, m in OUTPUT_FIT],
        *[(Override, k, m) for k, m in OVERRIDE],
        *[(Recipe, k, m) for k, m in RECIPE],
    ],
)
def test_every_invalid_setting_is_refused_with_its_message(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_type_errors_are_value_errors_too():
    with pytest.raises(RecipeFieldError) as info:
        CalibrationConfig(n_samples="64")
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_lists_become_tuples_and_ints_are_numbers():
    r = Recipe(exclude=["a*"], weight_only=[], percentile=99, overrides=[Override("b*", skip=True)])
    assert r.exclude == ("a*",) and r.weight_only == () and isinstance(r.overrides, tuple)
    assert r.settings_for("a.x") is None and r.settings_for("b.y") is None and r.settings_for("c") is not None
    assert hash(r)  # frozen and hashable: no list left inside


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_named_recipe_round_trips_through_json(name):
    recipe = RECIPES[name]
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert get_recipe(name) is recipe and get_recipe(recipe) is recipe


@pytest.mark.parametrize(
    "text, match",
    [
        ("weights: int8", r"my\.json is not JSON \(Expecting value.*diffquant recipes NAME --json"),
        ('{"w8a8": {}, "w4a8": {}}', r"my\.json: this holds several named recipes .*diffquant recipes NAME --json"),
        ("[1, 2]", r"my\.json: a recipe is a JSON object of recipe fields, got list"),
        ('"w8a8"', r"my\.json: a recipe is a JSON object of recipe fields, got str"),
        ('{"wieghts": "int8"}', r"my\.json: unknown recipe fields \['wieghts'\]"),
        ('{"calibration": {"nsamples": 4}}', r"my\.json: unknown calibration fields \['nsamples'\]"),
        ('{"calibration": 4}', r"my\.json: recipe field calibration must be an object of CalibrationConfig fields"),
        ('{"calibration": {"n_samples": "64"}}', r"my\.json: calibration\.n_samples must be an integer, got '64'"),
        ('{"gptq": {"damp": "0.01"}}', r"my\.json: gptq\.damp must be a number"),
        ('{"overrides": {"pattern": "*"}}', r"my\.json: recipe field overrides must be a list of objects"),
        ('{"overrides": ["*"]}', r"my\.json: recipe field overrides\[\] must be an object of Override fields"),
        ('{"overrides": [{"pattern": "*", "bits": 4}]}', r"my\.json: unknown overrides\[\] fields \['bits'\]"),
        ('{"exclude": "x*"}', r"my\.json: recipe field exclude must be a list of strings, got 'x\*'"),
        ('{"weights": "int9"}', r"my\.json: .*int9"),
    ],
)
def test_recipe_json_errors_name_the_file_and_the_field(text, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_json(text, source="my.json")


def test_recipes_saved_before_a_field_existed_take_its_default():
    old = RECIPES["w4a8"].to_dict()
    del old["gptq"], old["output_fit"], old["weight_only"]
    r = Recipe.from_dict(json.loads(json.dumps(old)))
    assert r.gptq == GPTQConfig() and r.output_fit == OutputFitConfig() and r.weight_only == ()


def test_unknown_recipe_lists_names():
    with pytest.raises(ValueError, match="w8a8, w8a8-dynamic"):
        get_recipe("w3a3")


def test_method_settings_are_nested_validated_recipe_configs():
    r = get_recipe("w4a8").replace(gptq={"every": 2, "hessian_bytes": 1 << 20}, output_fit={"correction_samples": 8})
    assert r.gptq.every == 2 and r.gptq.uniform_from == "last" and r.output_fit.correction_samples == 8
    assert diffquant.Recipe.from_json(r.to_json()) == r
    old = r.to_dict()  # a recipe.json saved before the nested method configs existed
    del old["gptq"], old["output_fit"]
    assert diffquant.Recipe.from_dict(old).gptq == diffquant.Recipe().gptq
    for bad, match in (({"gptq": {"every": 0}}, "every"), ({"gptq": {"damp": 2}}, "damp"),
                       ({"gptq": {"uniform_from": "middle"}}, "uniform_from"),
                       ({"output_fit": {"tdq_lr": 0}}, "tdq_lr")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            get_recipe("w4a8").replace(**bad)
    from diffquant.methods.gptq import selections

    (cfg,) = selections(r)
    assert (cfg.selection, cfg.every, cfg.uniform_from, cfg.n_samples) == ("uniform", 2, "last", 64)


def test_the_fine_tuning_table_rows_are_the_named_recipes():
    """benchmarks/ptq_table.py's ft5-* rows measure the fine-tuned recipes as they ship."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "ptq_table.py"
    spec = importlib.util.spec_from_file_location("ptq_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rows = {
        ("W8A4", "ft5-group"): "w8a4-ft",
        ("W4A4", "ft5-group"): "w4a4-ft",
        ("W8A4", "ft5-table"): "w8a4-table-ft",
        ("W4A4", "ft5-table"): "w4a4-table-ft",
        ("W4A4", "ft5-tdq"): "w4a4-tdq-ft",
    }
    for (bits, method), name in rows.items():
        row = table.recipe_for(bits, method, 128).to_dict()
        shipped = get_recipe(name).replace(calibration={"n_samples": 128}).to_dict()
        assert {**row, "name": name} == shipped, (bits, method)
