"""The ``diffquant`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from diffquant.data.fashion_mnist import DataNotFoundError
from diffquant.models.builtin import BUILTIN_MODELS, DENOISERS, UnknownModelError, WeightsError
from diffquant.nn.quantizer import CalibrationError
from diffquant.quantize import UnsupportedModelError

app = typer.Typer(
    help="diffquant: quantize diffusion models, measured.\n\nRun `diffquant COMMAND --help` for examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Errors a user can fix: printed as one line, exit code 2. Anything else is a bug and shows a traceback.
USER_ERRORS = (
    DataNotFoundError,
    UnknownModelError,
    WeightsError,
    CalibrationError,
    UnsupportedModelError,
    ValueError,
    FileNotFoundError,
    PermissionError,
)
EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        _fail(str(e))


def _denoiser(name: str, weights: Path | None = None):
    from diffquant.models import load_builtin

    if name not in DENOISERS:
        kind = "a classifier, not a denoiser" if name in BUILTIN_MODELS else "not a built-in model"
        _fail(f"Unknown model {name!r} ({kind}). Denoisers: {', '.join(DENOISERS)}.")
    return _run(load_builtin, name, weights)


def _model_or_quantized(name: str | None, weights: Path | None, quantized: Path | None):
    """The denoiser to run, its full-precision counterpart (None unless quantized) and its name.

    With ``--quantized`` the model comes from the directory's ``meta.json``; an explicit
    ``--model`` that disagrees is an error rather than a silent mismatch.
    """
    if quantized is None:
        name = name or DEFAULT_MODEL
        return _denoiser(name, weights), None, name
    from diffquant.serialization import load_quantized, read_meta

    meta, _ = _run(read_meta, quantized)
    saved = meta.get("model")
    if saved is None and meta.get("model_class"):  # a diffusers folder's model, not a built-in one
        what = meta.get("pipeline_class") or meta["model_class"]
        run_it = ' (`diffquant sample --quantized DIR --prompt "..."` runs it)' if meta.get("pipeline_class") else ""
        _fail(f"{quantized} holds a quantized {what}{run_it}; this command runs the built-in models only.")
    if name is not None and saved is not None and name != saved:
        _fail(f"{quantized} holds a quantized {saved}, not {name}; drop --model or pass the matching directory.")
    name = saved or name or DEFAULT_MODEL
    fp = _denoiser(name, weights)
    q = _run(load_quantized, quantized, _denoiser(name, weights))
    return q, fp, name


def _threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        _fail(f"--threads must be a positive number of threads, got {threads}; leave it out for torch's default")
    if threads:
        import torch

        torch.set_num_threads(threads)


DEFAULT_MODEL = "fashion-unet"
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help=f"Built-in denoiser ({', '.join(DENOISERS)}), the built-in text-to-image pipeline fashion-sd, a "
        "diffusers pipeline folder (model_index.json), a UNet / transformer folder (config.json with a diffusers _class_name), or a hub id org/name found in "
        "the local Hugging Face cache (nothing is downloaded).",
    ),
]
ModelOrSavedOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help=f"Built-in denoiser: {', '.join(DENOISERS)} (default {DEFAULT_MODEL}, or the --quantized one).",
    ),
]
StepsOpt = Annotated[int, typer.Option(help="Sampler steps.")]
SamplerOpt = Annotated[str, typer.Option(help="ddim (eta 0), ddpm or dpmsolver++.")]
SeedOpt = Annotated[int, typer.Option(help="Base seed; sample i uses generator (seed, i).")]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (1 = off).")]
BatchOpt = Annotated[int, typer.Option(help="Images per model call (does not change results).")]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(help="A safetensors file to use instead of the shipped weights (e.g. a checkpoint export)."),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch threads (default: torch's choice).")]
QuantizedOpt = Annotated[
    Path | None, typer.Option(help="A quantized model directory (from `diffquant quantize`) to run instead.")
]


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Print the models as JSON.")] = False):
    """List the built-in models.

    Example: diffquant models --json
    """
    from diffquant.models import load_config, weights_path

    rows = []
    for name in BUILTIN_MODELS:
        cfg = load_config(name)
        path = weights_path(name)
        rows.append(
            {"name": name, "kind": cfg["kind"], "weight_file_bytes": path.stat().st_size if path.is_file() else None}
        )
    from diffquant.models.fashion_sd import NAME, pipeline_dir

    folder = pipeline_dir()  # the text-to-image pipeline: a diffusers folder (`--model fashion-sd`)
    shipped = (folder / "model_index.json").is_file()
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) if shipped else None
    rows.append({"name": NAME, "kind": "sd", "weight_file_bytes": size})
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        missing = "not trained yet (diffquant train sd)" if r["kind"] == "sd" else "weights missing"
        size = f"{r['weight_file_bytes'] / 1e6:.1f} MB" if r["weight_file_bytes"] else missing
        typer.echo(f"{r['name']:18s} {r['kind']:9s} {size}")


@app.command()
def sample(
    model: ModelOrSavedOpt = None,
    n: Annotated[int | None, typer.Option(help="Number of images (default 64; 1 for a pipeline).")] = None,
    steps: StepsOpt = 50,
    sampler: Annotated[
        str | None, typer.Option(help="ddim (eta 0, the default), ddpm or dpmsolver++; a pipeline uses its scheduler.")
    ] = None,
    seed: SeedOpt = 0,
    guidance: Annotated[
        float | None,
        typer.Option("--guidance", help="Classifier-free guidance scale (1 = off; default 1, a pipeline's own)."),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="The prompt of a quantized text-to-image pipeline (--quantized DIR).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output PNG: a grid, or the image itself for one pipeline image.")] = Path(
        "grid.png"
    ),
    ncol: Annotated[int, typer.Option(help="Images per grid row.")] = 10,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Images per model call (default 250, results unchanged by it; a pipeline: 8, last bits may change)."
        ),
    ] = None,
    quantized: QuantizedOpt = None,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = None,
):
    """Sample a grid of images from a built-in model (classes balanced: image i has class i % 10), or
    images from a quantized diffusers pipeline (from `diffquant quantize --model FOLDER`).

    Example: diffquant sample --model fashion-unet --n 64 --steps 50 --out grid.png

    A quantized pipeline directory loads by itself (its other components are saved with it); image i
    starts from the seed seed * 1000003 + i, so the same command gives the same images:

    Example: diffquant sample --quantized sd-w8a8 --prompt "a red shoe" --steps 30 --out img.png
    """
    from diffquant.report import save_grid
    from diffquant.sampling import sample as sample_images

    _threads(threads)
    if batch_size is not None and batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {batch_size}.")
    if quantized is not None and _meta(quantized).get("pipeline_class"):
        from diffquant.integrations.pipelines import sample_pipeline, save_images
        from diffquant.serialization import load_quantized

        if model is not None or weights is not None or sampler is not None:
            _fail(
                f"{quantized} is a whole pipeline: leave out --model, --weights and --sampler (it has its scheduler)."
            )
        n = 1 if n is None else n
        pipe = _run(load_quantized, quantized)
        pipe.set_progress_bar_config(disable=True)
        images = _run(sample_pipeline, pipe, n, steps, seed, prompt, guidance, batch_size or 8)
        _run(save_images, images, out, ncol=ncol)
        typer.echo(f"wrote {out} ({n} images, {type(pipe).__name__}, {steps} steps, seed {seed})")
        return
    if prompt is not None:
        _fail("--prompt applies to a quantized text-to-image pipeline (--quantized DIR); built-in models take classes.")
    n, sampler = 64 if n is None else n, sampler or "ddim"
    m, _, _ = _model_or_quantized(model, weights, quantized)
    images, _ = _run(
        sample_images, m, n, steps, sampler, seed, guidance_scale=1.0 if guidance is None else guidance,
        batch_size=batch_size or 250,
    )  # fmt: skip
    _run(save_grid, images, out, ncol=ncol)
    typer.echo(f"wrote {out} ({n} images, {sampler}-{steps}, seed {seed})")


def _meta(quantized: Path) -> dict:
    """The ``meta.json`` of a quantized directory (one error line when it is not one)."""
    from diffquant.serialization import read_meta

    return _run(read_meta, quantized)[0]


@app.command("eval")
def eval_(
    model: ModelOrSavedOpt = None,
    n: Annotated[int, typer.Option(help="Number of samples (FD needs >= 2; tables use 5000).")] = 1000,
    steps: StepsOpt = 50,
    sampler: SamplerOpt = "ddim",
    seed: SeedOpt = 0,
    guidance: Annotated[
        float | None,
        typer.Option("--guidance", help="Classifier-free guidance scale (1 = off; default 1, fashion-sd's 3)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per model call (default 250; a pipeline: 8; does not change results).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quantized: QuantizedOpt = None,
    prompt: Annotated[
        str | None, typer.Option(help="A quantized text-to-image pipeline other than fashion-sd: the prompt.")
    ] = None,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = None,
):
    """Evaluate a model: FD against the shipped training-set statistics and class consistency.

    With --quantized DIR, the quantized model is evaluated and `psnr_vs_fp` compares its images
    with the full-precision model's from identical noise. Under torchrun the samples are split
    over the processes (gloo) and rank 0 prints the result of the whole run.

    Example: diffquant eval --model fashion-unet --n 1000 --steps 50 --json

    A quantized pipeline directory is compared with the FP pipeline it was quantized from (read from
    its meta.json: fashion-sd, or the folder given to `diffquant quantize --model`) from identical
    noise: PSNR, and for fashion-sd (its class prompts, guidance 3) FD against the data set, FD
    against the FP images in feature space and prompt-class consistency.

    Example: diffquant eval --quantized sd-q --n 500 --steps 50
    """
    from diffquant.eval import evaluate
    from diffquant.eval.distributed import init_from_env, rank_and_world

    if n < 2:
        _fail(f"--n must be at least 2 for a covariance, got {n}.")
    init_from_env()
    _threads(threads)
    if quantized is not None and _meta(quantized).get("pipeline_class"):
        if model is not None or weights is not None or sampler != "ddim":
            _fail(
                f"{quantized} is a whole pipeline: leave out --model, --weights and --sampler (it has its scheduler)."
            )
        result = _eval_pipeline(quantized, n, steps, seed, prompt, guidance, batch_size or 8)
    else:
        if prompt is not None:
            _fail(
                "--prompt applies to a quantized text-to-image pipeline (--quantized DIR); built-in models take classes."
            )
        m, fp, model = _model_or_quantized(model, weights, quantized)
        kw = dict(reference_model=fp, progress=not as_json)
        guidance = 1.0 if guidance is None else guidance
        result = _run(evaluate, m, n, steps, sampler, seed, guidance, batch_size or 250, **kw)
        if "psnr_vs_ref" in result:
            result["psnr_vs_fp"] = result.pop("psnr_vs_ref")
        result = {"model": model, **({"quantized": str(quantized)} if quantized else {}), **result}
    if rank_and_world()[0] != 0:
        return
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for k, v in result.items():
            typer.echo(f"{k:18s} {v}")


def _pipeline_pair(quantized: Path):
    """``(quantized pipeline, FP pipeline, source)`` of a pipeline directory: the FP one is the folder,
    hub id or built-in name its meta.json records as the source it was quantized from."""
    from diffquant.integrations.folders import load_model
    from diffquant.serialization import load_quantized

    source = _meta(quantized).get("source")
    if not source:
        _fail(
            f"{quantized} does not say which pipeline it was quantized from (no source in meta.json); quantize again."
        )
    return _run(load_quantized, quantized), _run(load_model, source), source


def _pipeline_denoisers(quantized: Path, batch: int):
    """``(fp denoiser, quantized denoiser, (args, kwargs) of one call, source)`` of a pipeline directory."""
    from diffquant.integrations.folders import example_call
    from diffquant.integrations.pipelines import denoiser_name

    pipe, reference, source = _pipeline_pair(quantized)
    name = denoiser_name(pipe)
    tokens = getattr(getattr(pipe, "tokenizer", None), "model_max_length", None)
    tokens = tokens if isinstance(tokens, int) and 0 < tokens <= 4096 else 77
    fp, q = getattr(reference, name).eval(), getattr(pipe, name).eval()
    return fp, q, _run(example_call, fp, batch, 500, tokens), source


def _eval_pipeline(quantized: Path, n: int, steps: int, seed: int, prompt, guidance, batch_size: int) -> dict:
    """``eval --quantized DIR`` of a pipeline directory: against the FP pipeline named in its meta.json."""
    from diffquant.integrations.pipelines import pipeline_images, score_pipeline_images

    pipe, reference, source = _pipeline_pair(quantized)
    fashion = source == "fashion-sd"
    images, ref, labels, guidance = _run(
        pipeline_images, pipe, reference, n, steps, seed, prompt, guidance, batch_size, fashion
    )
    result = {"n": n, "steps": steps, "seed": seed, "guidance_scale": guidance}
    return {"quantized": str(quantized), "source": source, **result, **score_pipeline_images(images, ref, labels)}


@app.command()
def recipes(
    name: Annotated[
        str | None, typer.Argument(help="One named recipe: with --json, printed as a recipe file to edit.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the recipes as JSON.")] = False,
):
    """List the named quantization recipes, or print one as a recipe file.

    Example: diffquant recipes w4a4-ft --json > my-recipe.json
    """
    from diffquant.recipe import RECIPES, get_recipe

    if name is not None:
        r = _run(get_recipe, name)
        typer.echo(r.to_json() if as_json else _recipe_line(name, r))
        return
    if as_json:
        typer.echo(json.dumps({k: r.to_dict() for k, r in RECIPES.items()}, indent=2))
        return
    for key, r in RECIPES.items():
        typer.echo(_recipe_line(key, r))


def _recipe_line(name: str, r) -> str:
    """One line of ``diffquant recipes``: the formats, the methods beyond them."""
    weights = r.weights + (f"/g{r.weight_group_size}" if r.weight_group_size else "")
    weights += "" if r.weight_method == "rtn" else f" {r.weight_method}"
    per = f"group of {r.act_group_size}" if r.act_granularity == "group" else r.act_granularity
    acts = "float" if r.activations == "none" else f"{r.activations} {r.act_mode} per-{per}"
    extras = [
        *(
            ["SmoothQuant " + (f"alpha {r.smoothquant_alpha}" if r.smoothquant_alpha else "searched")]
            if r.smoothquant
            else []
        ),
        *(["TDQ output fit"] if r.act_mode == "tdq" and r.tdq_fit == "output" else []),
        *([f"mixed precision, {r.weight_bits_budget} bits"] if r.weight_bits_budget else []),
        *(["per-step output correction"] if r.output_correction else []),
        *(["attention matmuls float"] if not r.attention and r.activations != "none" else []),
        *([f"fine-tuned {r.finetune.iterations} steps"] if r.finetune is not None else []),
    ]
    extra = "".join(f"  + {e}" for e in extras)
    return f"{name:16s} weights {weights:15s} activations {acts:30s} observer {r.observer}{extra}"


@app.command("quantize")
def quantize_cmd(
    model: ModelOpt = "fashion-unet",
    recipe: Annotated[
        str, typer.Option(help="A named recipe (see `diffquant recipes`) or a recipe JSON file.")
    ] = "w8a8",
    out: Annotated[Path, typer.Option(help="Output directory (safetensors + recipe.json + meta.json).")] = Path(
        "quantized"
    ),
    selection: Annotated[str | None, typer.Option(help="Calibration steps: single, uniform, ndtc or all.")] = None,
    n_calib: Annotated[int | None, typer.Option(help="Calibration trajectories.")] = None,
    observer: Annotated[str | None, typer.Option(help="minmax, percentile or mse.")] = None,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="Fine-tuning recipes (*-ft): stop fine-tuning after this many minutes.")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Fine-tuning recipes: a directory for resumable checkpoints; the same command resumes."),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Text-conditioned pipelines: a text file of calibration prompts, one per line."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (no progress bar).")] = False,
):
    """Quantize a model with a recipe, calibrating on its own sampling trajectory.

    Example: diffquant quantize --model fashion-unet --recipe w8a8 --out unet-w8a8

    A diffusers pipeline folder (or a hub id in the local cache) calibrates by running the pipeline
    (its scheduler, text encoder, guidance) on the prompts of --prompts; the output directory holds
    the whole pipeline (`diffquant sample --quantized DIR --prompt "..."` runs it). A bare UNet or
    transformer folder calibrates on random latents and random conditioning, a stand-in for its
    pipeline (quantize the pipeline folder when you have it):

    Example: diffquant quantize --model ./my-sd-pipeline --prompts prompts.txt --recipe w8a8 --out sd-w8a8

    Recipes ending in -ft fine-tune the quantized model after calibration, distilled from the FP
    model on its own trajectory (minutes on a CPU):

    Example: diffquant quantize --recipe w4a4-ft --max-minutes 20 --checkpoint ft-ckpt --out unet-w4a4-ft

    Under torchrun the fine-tuning runs data parallel (gloo) and rank 0 writes the model:

    Example: torchrun --nproc-per-node 2 -m diffquant -- quantize --recipe w4a4-ft --out unet-w4a4-ft
    """
    import time

    from diffquant import quantize, save_quantized
    from diffquant.eval.distributed import init_from_env, rank_and_world
    from diffquant.integrations.pipelines import denoiser_name, is_pipeline
    from diffquant.serialization import weight_bytes

    _threads(threads)
    r = _recipe(recipe)
    cal = {k: v for k, v in {"selection": selection, "n_samples": n_calib}.items() if v is not None}
    changes = {"calibration": cal} if cal else {}
    if observer:
        changes["observer"] = observer
    if (max_minutes is not None or checkpoint is not None) and r.finetune is None:
        _fail(f"--max-minutes and --checkpoint apply to fine-tuning recipes (*-ft); {r.name!r} does not fine-tune.")
    if max_minutes is not None:
        changes["finetune"] = {"max_minutes": max_minutes}
    if changes:
        r = _run(r.replace, **changes)
    builtin = model in BUILTIN_MODELS
    m, folder = (_denoiser(model, weights), None) if builtin else _folder_model(model, weights)
    source = model if builtin else _source(model, folder)
    if folder is not None and (out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents):
        _fail(f"--out {out} would replace the folder the model comes from ({folder}); choose another --out.")
    start = time.perf_counter()
    fp_bytes = weight_bytes(getattr(m, denoiser_name(m)) if is_pipeline(m) else m)
    calibration = _calibration(m, r, prompts, source, folder)
    init_from_env()  # torchrun: every rank quantizes the same (seeded) model, fine-tuning splits its batches
    q = _run(quantize, m, r, progress=not as_json, checkpoint=checkpoint, **calibration)
    seconds = round(time.perf_counter() - start, 1)
    if rank_and_world()[0] != 0:
        return
    extra = {"quantize_seconds": seconds} | ({} if builtin else {"source": source})
    _run(save_quantized, q, out, model if builtin else None, extra)
    if is_pipeline(q):
        q = getattr(q, denoiser_name(q))
    if as_json:
        q_bytes = weight_bytes(q)
        info = {"out": str(out), "model": model, "recipe": r.name, "seconds": seconds, "fp_weight_bytes": fp_bytes}
        typer.echo(json.dumps(info | {"q_weight_bytes": q_bytes, "q_weight_ratio": round(q_bytes / fp_bytes, 4)}))
    else:
        typer.echo(f"wrote {out} ({r.name}, {seconds} s)")


def _folder_model(source: str, weights: Path | None):
    """``(pipeline or model, folder)`` of a diffusers folder or cached hub id given as ``--model``."""
    from diffquant.integrations.folders import load_folder, resolve

    if weights is not None:
        _fail("--weights applies to the built-in models; a diffusers folder brings its own weights.")
    folder = _run(resolve, source)
    return _run(load_folder, folder, source), folder


def _recipe(recipe: str):
    """The :class:`~diffquant.recipe.Recipe` of ``--recipe``: a named recipe or a recipe JSON file."""
    from diffquant.recipe import Recipe, get_recipe

    if Path(recipe).suffix == ".json":
        return _run(lambda: Recipe.from_json(Path(recipe).read_text(), source=recipe))
    return _run(get_recipe, recipe)


def _source(model: str, folder: Path) -> str:
    """What a quantized directory records as its FP source (for eval, report and bench from any
    directory): ``fashion-sd`` for the shipped pipeline's folder, a local folder's absolute path, or
    the hub id."""
    from diffquant.models.fashion_sd import NAME, pipeline_dir

    if folder.resolve() == pipeline_dir().resolve():
        return NAME
    return str(folder.resolve()) if Path(model).expanduser().is_dir() else model


def _calibration(model, recipe, prompts: Path | None, source: str, folder: Path | None) -> dict:
    """The keywords of ``quantize`` that calibrate ``model``: prompts for a text-conditioned pipeline, the
    stand-in random-latent loop for a bare diffusers denoiser (from ``folder``), nothing for a built-in model."""
    from diffquant.integrations.folders import random_latent_sampler, read_prompts, scheduler_for
    from diffquant.integrations.pipelines import is_pipeline, is_text_conditioned
    from diffquant.quantize import selections

    if is_pipeline(model):
        text = is_text_conditioned(model)
        if text and prompts is None and source == "fashion-sd":
            from diffquant.models.fashion_sd import CLASS_NOUNS, GUIDANCE, prompt

            prompts_ = [prompt(c) for c in range(len(CLASS_NOUNS))]  # its ten class prompts, at its guidance
            return {"prompts": prompts_, "pipeline_kwargs": {"guidance_scale": GUIDANCE}}
        if text and prompts is None:
            _fail(f"{source} is a text-conditioned {type(model).__name__}: pass --prompts FILE (one prompt per line).")
        if prompts is not None and not text:
            _fail(f"--prompts applies to text-conditioned pipelines; {type(model).__name__} takes no prompt.")
        return {"prompts": _run(read_prompts, prompts)} if text else {}
    if prompts is not None and folder is None:
        _fail(f"--prompts applies to text-conditioned diffusers pipelines; {source} is a class-conditional built-in.")
    if prompts is not None:
        _fail(f"--prompts needs a pipeline's text encoder, and {source} is a bare denoiser; pass its pipeline folder.")
    if folder is None:
        return {}  # a built-in model samples its own trajectory
    scheduler = _run(scheduler_for, folder)
    T = int(scheduler.config.num_train_timesteps)
    model.diffquant_num_timesteps = T  # saved with the model: its per-step tables span T steps
    if not selections(recipe):  # a data-free recipe: nothing to run
        return {"num_timesteps": T}
    typer.echo(
        f"note: {source} is a bare {type(model).__name__}: calibrating on random latents and random conditioning, "
        "a stand-in for its pipeline (quantize the pipeline folder to calibrate on real prompts)",
        err=True,
    )
    return {"calibration": _run(random_latent_sampler, model, recipe.calibration, scheduler), "num_timesteps": T}


@app.command()
def train(
    kind: Annotated[str, typer.Argument(help="unet, dit, features or sd (the fashion-sd pipeline).")],
    out: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: runs/KIND).")] = None,
    steps: Annotated[int | None, typer.Option(help="Total optimizer steps (default: the config's).")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Checkpoint and stop after this many minutes.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Fashion-MNIST idx directory.")] = None,
    export: Annotated[bool, typer.Option(help="When training is complete, write the shipped weights.")] = True,
    warm_start: Annotated[
        Path | None,
        typer.Option(help="Without a checkpoint in --out, start from these exported weights (e.g. the shipped ones)."),
    ] = None,
    threads: ThreadsOpt = None,
):
    """Train (or resume) a built-in model from its config in diffquant/models/configs.

    Running the same command again resumes from the checkpoint. When the run completes, the EMA
    weights replace the shipped ones (for `features`, also the training-set feature statistics; for
    `sd`, the pipeline folder: its VAE trains first, then the UNet and the text encoder; --steps
    counts the UNet phase).

    Example: diffquant train unet --max-minutes 120
    """
    from diffquant import train as training

    if kind not in (*training.KIND_TO_MODEL, "sd"):
        _fail(f"Unknown kind {kind!r}; choose unet, dit, features or sd.")
    if threads is not None and threads < 1:
        _threads(threads)  # the one message for a bad --threads
    out = out or Path("runs") / kind
    if kind == "sd":
        if warm_start is not None:
            _fail("--warm-start is for unet, dit and features; `train sd` resumes from the checkpoints in --out.")
        done, total = _run(training.train_sd, out, steps, max_minutes, data_dir, threads)
        if done < total:
            typer.echo(f"stopped at step {done}/{total} (VAE, then UNet); run the same command to resume")
        elif export:
            typer.echo(f"exported {_run(training.export_sd, out)}")
        return
    ckpt = _run(training.train, kind, out, steps, max_minutes, data_dir, threads, warm_start)
    done, total = training.checkpoint_progress(ckpt, steps)
    if done < total:
        typer.echo(f"stopped at step {done}/{total}; run the same command to resume")
        return
    if export:
        dest = _run(training.export_builtin, kind, ckpt, data_dir)
        typer.echo(f"exported {', '.join(str(d) for d in dest)}")


@app.command()
def report(
    quantized: Annotated[Path, typer.Option(help="A quantized model directory (from `diffquant quantize`).")],
    out: Annotated[Path, typer.Option(help="Output folder for report.html and its PNGs.")] = Path("diffquant-report"),
    n: Annotated[int, typer.Option(help="Samples per model (>= 10).")] = 200,
    steps: StepsOpt = 50,
    prompt: Annotated[
        str | None, typer.Option(help="A quantized text-to-image pipeline other than fashion-sd: the prompt.")
    ] = None,
    threads: ThreadsOpt = None,
):
    """Write an HTML report: FP vs quantized grids from identical noise, metrics, per-step error, ranges.

    Example: diffquant report --quantized unet-w8a8 --out report --n 200

    A quantized pipeline directory is reported against the FP pipeline it was quantized from (its
    meta.json): grids from identical noise and prompts, PSNR (fashion-sd: FD and prompt-class
    consistency too) and the per-step error on the FP pipeline's trajectory.
    """
    from diffquant.report.quant_report import write_quant_report
    from diffquant.serialization import read_meta

    _threads(threads)
    meta = _meta(quantized)
    if meta.get("pipeline_class"):
        from diffquant.report.pipeline_report import write_pipeline_report

        recipe_name = _run(read_meta, quantized)[1].name
        pipe, reference, source = _pipeline_pair(quantized)
        fashion = source == "fashion-sd"
        page = _run(write_pipeline_report, pipe, reference, out, source, recipe_name, n, steps, prompt, fashion)
        typer.echo(f"report: {page}")
        return
    if prompt is not None:
        _fail("--prompt applies to a quantized text-to-image pipeline (--quantized DIR); built-in models take classes.")
    q, fp, name = _model_or_quantized(None, None, quantized)
    _, recipe = _run(read_meta, quantized)
    page = _run(write_quant_report, q, fp, out, name, recipe.name, n, steps)
    typer.echo(f"report: {page}")


@app.command()
def bench(
    model: ModelOrSavedOpt = None,
    recipe: Annotated[
        str, typer.Option(help="Recipe to quantize with, named or a JSON file (ignored with --quantized).")
    ] = "w8a7",
    backend: Annotated[
        str, typer.Option(help="reference (fake quant), cpu (oneDNN int8) or cuda (int8/FP8 GEMMs, NVIDIA GPU).")
    ] = "cpu",
    batch: Annotated[int, typer.Option(help="Images per model call.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed calls per variant (median).")] = 5,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="Also time torch.compile.")] = True,
    sampling_steps: Annotated[
        int, typer.Option(help="Also time a whole DDIM sampling run of --batch images with this many steps (0: off).")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quantized: QuantizedOpt = None,
    threads: ThreadsOpt = None,
):
    """Time one denoiser call, FP32 vs quantized on a backend, side by side in this process.

    Prints backend, fp_ms (FP32 eager), q_ms (the backend, compiled unless --no-compile), speedup,
    fp_weight_bytes, q_weight_bytes, threads, and the eager/compiled variants. Without --quantized
    the model is quantized first on a small calibration (speed does not depend on it).

    Example: diffquant bench --model fashion-unet --recipe w8a7 --backend cpu --batch 64 --json

    A quantized pipeline directory times its denoiser against the FP pipeline's it was quantized from
    (meta.json), on random latents and conditioning of the pipeline's shapes (--batch rows: with
    classifier-free guidance a pipeline calls its denoiser on twice the images).

    Example: diffquant bench --quantized sd-w8a8 --batch 2 --json
    """
    from diffquant.backends import BACKENDS
    from diffquant.bench import bench_forward, bench_sampling, quantized_for_bench

    if backend not in BACKENDS:
        _fail(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    import torch

    if backend == "cuda" and not torch.cuda.is_available():
        _fail(
            "the cuda backend times NVIDIA GPU kernels and this machine has no CUDA device; its numerics are "
            "tested on the CPU (tests/backends/test_cuda.py). Use --backend cpu here."
        )
    if batch < 1 or repeats < 1 or sampling_steps < 0:
        _fail("--batch and --repeats must be at least 1, --sampling-steps at least 0.")
    _threads(threads)
    if quantized is not None and _meta(quantized).get("pipeline_class"):
        if model is not None or sampling_steps:
            _fail(
                f"{quantized} is a whole pipeline: leave out --model and --sampling-steps (one denoiser call is timed)."
            )
        fp, q, inputs, model = _pipeline_denoisers(quantized, batch)
    elif quantized is not None:
        q, fp, model = _model_or_quantized(model, None, quantized)
        inputs = None
    else:
        model = model or DEFAULT_MODEL
        _denoiser(model)  # a clear error for an unknown model
        fp, q = _run(quantized_for_bench, model, _recipe(recipe), progress=not as_json)
        inputs = None
    result = {"model": model, **_run(bench_forward, fp.eval(), q.eval(), backend, batch, repeats, compile, inputs)}
    if sampling_steps:
        result["sampling"] = _run(bench_sampling, fp, q, backend, batch, sampling_steps, compile=compile)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for k, v in result.items():
            typer.echo(f"{k:24s} {v}")


@app.command("export")
def export_cmd(
    quantized: Annotated[Path, typer.Option(help="A quantized model directory (from `diffquant quantize`).")],
    out: Annotated[Path, typer.Option(help="The .onnx file to write (replaced if it exists).")] = Path("model.onnx"),
    form: Annotated[
        str,
        typer.Option(help="integer (exact, ONNX Runtime integer kernels) or qdq (QuantizeLinear/DequantizeLinear)."),
    ] = "integer",
    batch: Annotated[int | None, typer.Option(help="A fixed batch size (default: dynamic).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, 13..20 (FP8 activations need 19+).")] = 19,
    step: Annotated[
        int | None,
        typer.Option(help="Bake in the scales of this one time step (default: per-step tables, every step)."),
    ] = None,
):
    """Export a quantized model to ONNX for ONNX Runtime (inputs x, t, class_labels; output eps).

    Example: diffquant export --quantized unet-w8a7 --out unet-w8a7.onnx
    """
    try:
        from diffquant.backends.onnx import export_onnx
    except ImportError as e:
        _fail(f"ONNX export needs the onnx and onnxruntime packages ({e}); pip install 'diffquant[onnx]'")
    q, _, _ = _model_or_quantized(None, None, quantized)
    typer.echo(_run(export_onnx, q, out, batch=batch, opset=opset, form=form, step=step).summary())


@app.command("export-weights")
def export_weights_cmd(
    kind: Annotated[str, typer.Argument(help="unet, dit, features or sd (the fashion-sd pipeline).")],
    checkpoint: Annotated[
        Path,
        typer.Option(help="A training checkpoint (checkpoint.pt); for sd, the training directory (--out of train)."),
    ],
    data_dir: Annotated[Path | None, typer.Option(help="Fashion-MNIST idx directory (features only).")] = None,
):
    """Write a training checkpoint's EMA weights as the shipped weights of a built-in model.

    For `features` this also recomputes the training-set feature statistics (needs the data set); for
    `sd` the pipeline folder is written (fp16 safetensors, `save_pretrained`'s layout).

    Example: diffquant export-weights unet --checkpoint /work/ckpt/unet/checkpoint.pt
    """
    from diffquant import train as training

    if kind not in (*training.KIND_TO_MODEL, "sd"):
        _fail(f"Unknown kind {kind!r}; choose unet, dit, features or sd.")
    if kind == "sd":
        if not ((checkpoint / "vae.pt").is_file() and (checkpoint / "unet.pt").is_file()):
            _fail(
                f"{checkpoint} holds no fashion-sd training checkpoints (vae.pt and unet.pt); train with `diffquant train sd`."
            )
        typer.echo(f"exported {_run(training.export_sd, checkpoint)}")
        return
    if not checkpoint.is_file():
        _fail(f"checkpoint not found: {checkpoint}")
    dest = _run(training.export_builtin, kind, checkpoint, data_dir)
    step, _ = training.checkpoint_progress(checkpoint)
    typer.echo(f"exported step {step}: {', '.join(str(d) for d in dest)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("diffquant-demo"),
    quick: Annotated[bool, typer.Option(help="Fewer samples and steps (under a minute).")] = False,
    n: Annotated[int | None, typer.Option(help="Samples per model (default 500, quick 100).")] = None,
    quantize: Annotated[
        bool, typer.Option(help="Also quantize fashion-unet with w8a8-tdq and report it against FP32.")
    ] = True,
    threads: ThreadsOpt = None,
):
    """Run the main job on the built-in models: sample, evaluate, quantize, write grids and HTML reports.

    Example: diffquant demo --out diffquant-demo
    """
    from diffquant.demo import run_demo

    _threads(threads)
    report = _run(run_demo, out, quick=quick, n=n, quantize=quantize)
    typer.echo(f"report: {report}")


def main() -> None:
    """Entry point of the ``diffquant`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
