"""Peak memory of loading a quantized pipeline directory, against the bytes it holds.

    python benchmarks/load_memory.py                         # every row (minutes)
    python benchmarks/load_memory.py --rows sd15-pipe        # one row
    python benchmarks/load_memory.py --dir sd-q              # a directory `diffquant quantize` wrote

Each row quantizes a pipeline once (data-free ``w8a8-dynamic``: round-to-nearest int8 weights, so no
calibration run is needed to make the directory), saves it with ``diffquant.save_quantized``, then
loads it twice in a fresh process: ``diffquant.load_quantized(dir)``, which builds the denoiser on
the ``meta`` device and assigns its saved integer weights, and loads the other components with
``from_pretrained``. The child's peak resident memory (``VmHWM``) is reset just before each load
(``/proc/self/clear_refs``), so ``peak - before`` is what that load takes: the first one also pays
one-time costs (lazily imported modules, allocator arenas), the second (after the first is freed)
what the data costs. safetensors maps the files, so a weight becomes resident when first read: every
tensor is read once (one element per page, without copying it: an earlier version summed small
tensors as float copies, which added up to 0.4x of fashion-sd's bytes to the peak) before the peak
is taken (``peak_lazy``: before that). The bound
(issue 22) is 1.3x the directory's weight bytes. One denoiser call
after loading checks the pipeline runs.

Rows:

    tiny-sd    the tests' tiny ``StableDiffusionPipeline`` (kilobytes of weights): what a load costs
               whatever the weights (configs, tokenizer, module objects), subtracted in the last column
    sd15-pipe  ``StableDiffusionPipeline`` with SD-1.5's UNet (random weights, 3.4 GB FP32: about
               0.9 GB as int8), a 2-layer CLIP text encoder and a one-block VAE (``scale.py``'s)
    fashion-sd the shipped ``fashion-sd`` pipeline (when it is there)

Results: ``benchmarks/results/load_memory.{json,md}`` (a rerun replaces the rows it runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from scale import cpu_model, sd15_pipeline, status_bytes  # noqa: E402  (benchmarks/scale.py, beside this file)

RESULTS = HERE / "results"
ROWS = ("tiny-sd", "sd15-pipe", "fashion-sd")


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))


def build(row: str, tmp: Path):
    if row == "tiny-sd":
        sys.path.insert(0, str(HERE.parent))
        from tests.integrations.tiny_pipelines import PROMPTS, save_tiny

        from diffquant.integrations.folders import load_folder

        return load_folder(save_tiny("sd", tmp / "tiny-sd")), PROMPTS[:1]
    if row == "sd15-pipe":
        return sd15_pipeline(tmp / "tokenizer"), ["a red shoe"]
    from diffquant.models.fashion_sd import load_fashion_sd

    return load_fashion_sd(), ["a photo of an ankle boot"]


def child(directory: str) -> dict:
    """In a fresh process: the imports, then the load alone (peak reset between them)."""
    # the classes a pipeline load touches, imported before the baseline (diffusers and transformers
    # import their modules lazily, on first use): what is measured is the load, not the code
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import diffquant
    import diffquant.integrations.pipelines
    import diffquant.serialization
    from diffquant.memory import trim

    def load() -> tuple[object, dict]:
        """One load: resident memory before it, its peak (reset first) and its seconds."""
        gc.collect()
        trim()
        before = status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        pipe = diffquant.load_quantized(directory)
        seconds = round(time.perf_counter() - start, 1)
        lazy = status_bytes("VmHWM")  # safetensors maps the files: pages become resident when first read
        with torch.no_grad():
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    for t in module.state_dict().values():  # one element per page: no copy of t is made
                        t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()
        return pipe, {"before": before, "peak_lazy": lazy, "peak": status_bytes("VmHWM"), "s": seconds}

    first_pipe, first = load()
    del first_pipe  # the second load finds code paths and caches warm: what it adds is the data
    pipe, second = load()
    with torch.no_grad():
        unet = pipe.unet
        size = unet.config.sample_size
        text = torch.zeros(1, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
        out = unet(torch.randn(1, unet.config.in_channels, size, size), 10, encoder_hidden_states=text).sample
    return {"first": first, "second": second, "runs": bool(out.isfinite().all())}


def measure(directory: Path) -> dict:
    """The two loads of ``directory`` in a fresh process (:func:`child`)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(directory)], capture_output=True, text=True, check=False
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1][len("RESULT ") :])


def ratios(size: int, result: dict) -> dict:
    return {
        "first_over_dir": round((result["first"]["peak"] - result["first"]["before"]) / size, 3),
        "second_over_dir": round((result["second"]["peak"] - result["second"]["before"]) / size, 3),
    }


def run_dir(directory: Path) -> dict:
    """A row for a quantized pipeline directory made elsewhere (its recipe from its recipe.json)."""
    recipe = json.loads((directory / "recipe.json").read_text()).get("name", "?")
    result, size = measure(directory), weight_bytes(directory)
    if "error" in result:
        return {"row": directory.name, **result}
    return {"row": directory.name, "recipe": recipe, "unet_fp32_bytes": None, "dir_weight_bytes": size, **result,
            **ratios(size, result)}  # fmt: skip


def run_row(row: str, threads: int) -> dict:
    import diffquant

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="diffquant-load-") as tmp:
        tmp = Path(tmp)
        pipe, prompts = build(row, tmp)
        fp_bytes = sum(p.numel() * 4 for p in pipe.unet.parameters())
        diffquant.quantize(pipe, "w8a8-dynamic", prompts=prompts, progress=False)
        directory = diffquant.save_quantized(pipe, tmp / "q")
        del pipe
        size = weight_bytes(directory)
        result = measure(directory)
    if "error" in result:
        return {"row": row, **result}
    return {"row": row, "recipe": "w8a8-dynamic", "unet_fp32_bytes": fp_bytes, "dir_weight_bytes": size, **result,
            **ratios(size, result)}  # fmt: skip


def write_markdown(record: dict, path: Path) -> None:
    lines = [
        "# Loading a quantized pipeline directory: peak memory against its bytes",
        "",
        f"Command: `{record['command']}` — {record['date']}, torch {record['torch']} (each row's host in its last column).",
        "",
        "`load peak - before`: the child process's peak resident memory during `diffquant.load_quantized(dir)` and a",
        "first read of every weight (safetensors maps the files; pages become resident when read) above its resident",
        "memory just before (the peak is reset there). `first`: the first load after importing torch,",
        "diffusers, transformers and diffquant (it also pays one-time costs: lazily imported modules, allocator",
        "arenas); `second`: the same directory again after the first was freed (what the data costs). Bound",
        "(issue 22): 1.3x the directory's weight bytes. `fixed`: `tiny-sd`'s second load, a pipeline of",
        "kilobytes (what any load costs: configs, tokenizer, module objects), subtracted in the last column.",
        "",
        "| pipeline | recipe | UNet FP32 (GB) | directory weights (GB) | first: peak - before (GB) | / directory "
        "| second: peak - before (GB) | / directory | load (s) | runs | (second - fixed) / directory | host |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    tiny = next((r for r in record["rows"] if r["row"] == "tiny-sd" and "error" not in r), None)
    fixed = tiny["second"]["peak"] - tiny["second"]["before"] if tiny else None
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error']} ||||||||||")
            continue
        first, second = (r[k]["peak"] - r[k]["before"] for k in ("first", "second"))
        fp32 = f"{r['unet_fp32_bytes'] / 1e9:.2f}" if r["unet_fp32_bytes"] else ""
        lines.append(
            f"| {r['row']} | {r['recipe']} | {fp32} | {r['dir_weight_bytes'] / 1e9:.3f} | "
            f"{first / 1e9:.3f} | {r['first_over_dir']:.2f} | {second / 1e9:.3f} | {r['second_over_dir']:.2f} | "
            f"{r['first']['s']} / {r['second']['s']} | {r['runs']} | "
            + (f"{(second - fixed) / r['dir_weight_bytes']:.2f} |" if fixed is not None and r is not tiny else " |")
            + f" {r.get('cpu', record['cpu'])} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "load_memory")
    ap.add_argument("--dir", type=Path, help="measure this quantized pipeline directory instead of the rows")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    path = args.out.with_suffix(".json")
    record = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    record.update(
        command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), torch=torch.__version__,
        cpu=cpu_model(), date=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    for row in [args.dir] if args.dir else args.rows:
        if row == "fashion-sd":
            from diffquant.models.fashion_sd import pipeline_dir

            if not (pipeline_dir() / "model_index.json").is_file():
                print("fashion-sd: not shipped yet, skipped", flush=True)
                continue
        result = {**(run_dir(row) if isinstance(row, Path) else run_row(row, args.threads)), "cpu": cpu_model()}
        print(json.dumps(result), flush=True)
        record["rows"] = [r for r in record["rows"] if r["row"] != result["row"]] + [result]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
        write_markdown(record, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
