"""Quantizing at Stable Diffusion size: peak resident memory, wall time and FP passes per named recipe.

    python benchmarks/scale.py                                   # every row below (hours on 2 cores)
    python benchmarks/scale.py --rows sd15:w8a8 sdxl:w8a8-tdq    # some rows

Rows (random weights, seed 0; built from diffusers configs, nothing downloaded):

    sd15      ``UNet2DConditionModel`` with SD-1.5's configuration (860 M parameters, 3.4 GB FP32)
    sdxl      ``UNet2DConditionModel`` with SDXL's configuration (2.6 B parameters, 10.3 GB FP32),
              64x64 latents (not 128x128) to bound CPU time
    sd15-pipe a ``StableDiffusionPipeline`` around the SD-1.5-shaped UNet (a 2-layer CLIP text encoder
              of width 768, a one-block VAE), quantized with ``diffquant.quantize(pipe, recipe, prompts=...)``

The UNets are calibrated the way a user with their own loop does it: ``diffquant.quantize(unet, recipe,
my_sampler)``, where ``my_sampler`` runs ``--samples`` trajectories of a DDIM-``--steps`` loop with
classifier-free guidance (text states as a pipeline gives them: ``[uncond, cond]`` stacked, 77 tokens;
SDXL's pooled text embeddings and time ids too). The recipe's own step selections apply to that
recording (uniform every 5th step, GPTQ's last step and every 5th before it, all steps for TDQ).

Each row runs in its own process, so its peak resident memory (``VmHWM`` of ``/proc/self/status``)
is that row's alone; it is compared with the model's FP32 weight bytes. ``fp_runs`` counts the
sampling runs over the FP model (one recording for every method step), ``replays`` the recorded
calls GPTQ replayed (once per Hessian group). Results: ``benchmarks/results/scale.{json,md}``;
rows are appended as they finish and a rerun skips rows already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DEFAULT_ROWS = (
    "sd15:w8a8", "sd15:w8a8-tdq", "sd15:w4a8", "sd15:w8a8-smoothquant", "sdxl:w8a8-tdq", "sd15-pipe:w8a8-tdq",
)  # fmt: skip


def sd15_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()


def sdxl_unet(**changes):
    """SDXL's UNet configuration (random weights, seed 0); ``changes`` shrink it (the GPU check's dry run)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(
        sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )  # fmt: skip
    return UNet2DConditionModel(**{**config, **changes}).eval()


def sd15_pipeline(tmp: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.integrations.tiny_pipelines import tiny_tokenizer  # a character-level CLIP tokenizer, offline

    tokenizer = tiny_tokenizer(tmp, max_length=77)
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=768, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    text_encoder = CLIPTextModel(config).eval()
    vae = AutoencoderKL(
        block_out_channels=(32,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32, sample_size=64,
    ).eval()  # fmt: skip
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=sd15_unet(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def my_sampler(n: int, steps: int, sdxl: bool):
    """The user's own DDIM loop with classifier-free guidance (guidance 7.5), as a pipeline calls the UNet."""
    from diffusers import DDIMScheduler

    def run(unet):
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(0)
        width = 2048 if sdxl else 768
        text = torch.cat([torch.zeros(n, 77, width), torch.randn(n, 77, width, generator=g)])  # [uncond, cond]
        extra = {}
        if sdxl:
            time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(2 * n, 1)
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2 * n, 1280, generator=g), "time_ids": time_ids}
        latents = torch.randn(n, 4, 64, 64, generator=g)
        for t in scheduler.timesteps:
            out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=text, **extra).sample
            uncond, cond = out.chunk(2)
            latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample

    return run


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in bytes (-1 when absent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def peak_rss() -> int:
    return status_bytes("VmHWM")


class RssTrace:
    """Samples this process's resident memory and its main thread's stack every ``interval`` seconds.

    Each sample is charged to a phase: the method step running (the diffquant module under
    ``run_methods``, or ``record`` / ``prepare`` ...) and the innermost diffquant function. ``phases()``
    gives each phase's seconds and highest RSS; ``peak`` the stack at the highest sample, so a peak
    is attributed to a line, not guessed.
    """

    def __init__(self, interval: float = 0.2, live: Path | None = None, every: float = 30.0):
        import threading

        self.interval, self.main = interval, threading.main_thread().ident
        self.live, self.every, self.start = live, every, time.perf_counter()
        self.table: dict[str, list] = {}  # phase -> [seconds, max rss]
        self.peak, self.peak_stack, self.ticks = 0, [], 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        if self.live is not None:
            self.write(status_bytes("VmRSS"), [])

    def _frames(self) -> list[str]:
        import traceback

        frame = sys._current_frames().get(self.main)
        if frame is None:
            return []
        return [
            f"{Path(f.filename).as_posix().split('src/diffquant/')[-1]}:{f.lineno} {f.name}"
            for f in traceback.extract_stack(frame)
            if "src/diffquant/" in Path(f.filename).as_posix()
        ]

    def _loop(self) -> None:
        while not self.done.wait(self.interval):
            rss, frames = status_bytes("VmRSS"), self._frames()
            step = "outside quantize"
            for i, f in enumerate(frames):
                if f.endswith(" run_methods") and i + 1 < len(frames):
                    step = frames[i + 1].split(":")[0]
                    break
                if f.endswith(" _record"):
                    step = "record"
            inner = frames[-1].split(" ")[-1] if frames else "-"
            entry = self.table.setdefault(f"{step} / {inner}", [0.0, 0])
            entry[0] += self.interval
            entry[1] = max(entry[1], rss)
            if rss > self.peak:
                self.peak, self.peak_stack = rss, frames
            self.ticks += 1
            if self.live is not None and self.ticks % max(1, round(self.every / self.interval)) == 0:
                self.write(rss, frames)

    def write(self, rss: int, frames: list[str]) -> None:
        """The trace so far, to ``live`` (a row stopped before it ends still leaves its trace)."""
        self.live.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "elapsed_s": round(time.perf_counter() - self.start, 1), "rss_gb": round(rss / 1e9, 2),
            "peak_rss_gb": round(self.peak / 1e9, 2), "now": frames[-4:], "peak_stack": self.peak_stack,
            "phases": self.phases(),
        }  # fmt: skip
        tmp = self.live.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.live)

    def phases(self) -> dict:
        top = sorted(self.table.items(), key=lambda kv: -kv[1][1])
        return {k: {"s": round(v[0], 1), "max_rss_gb": round(v[1] / 1e9, 2)} for k, v in top}


def child(model: str, recipe_name: str, args) -> dict:
    """One row, in this process, traced (:class:`RssTrace`)."""
    torch.set_num_threads(args.threads)
    live = args.out.parent / "scale_traces" / f"{model}_{recipe_name}.json"
    commit = git_commit()  # the code this row runs (read now: the checkout may move while it runs)
    with RssTrace(live=live) as trace:
        start = time.perf_counter()
        unet, fp32, build_s = run_row(model, recipe_name, args)
    report = unet.diffquant_report
    gptq = report.get("gptq", {})
    return {
        "model": model, "recipe": recipe_name, "fp32_weight_bytes": fp32, "peak_rss_bytes": peak_rss(),
        "peak_over_fp32": round(peak_rss() / fp32, 2), "quantize_s": round(time.perf_counter() - start - build_s, 1),
        "fp_runs": 1, "calibration_calls": report.get("ranges", {}).get("calls"),
        "gptq_groups": gptq.get("groups"), "gptq_replays": gptq.get("replays"),
        "samples": args.samples, "steps": args.steps, "threads": args.threads,
        "peak_stack": trace.peak_stack, "phases": trace.phases(), "commit": commit,
    }  # fmt: skip


def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when the tree has changes): the code a row ran on."""
    try:
        here = Path(__file__).parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src/diffquant"], cwd=here.parent, capture_output=True, text=True
        )
        return sha.strip() + ("+dirty" if dirty.stdout.strip() else "") or None
    except OSError:
        return None


def run_row(model: str, recipe_name: str, args):
    """Build the row's model and quantize it: ``(unet, its FP32 weight bytes, build seconds)``."""
    import diffquant
    from diffquant.recipe import CalibrationConfig, get_recipe

    start = time.perf_counter()
    recipe = get_recipe(recipe_name)
    if model == "sd15-pipe":
        import tempfile

        pipe = sd15_pipeline(Path(tempfile.mkdtemp()))
        unet = pipe.unet
        fp32 = sum(p.numel() * 4 for p in unet.parameters())
        build_s = time.perf_counter() - start
        cal = CalibrationConfig(n_samples=args.samples, steps=args.steps, batch_size=1)
        diffquant.quantize(
            pipe, recipe, cal, prompts=["a red shoe", "a small bag"], progress=False,
            pipeline_kwargs={"height": 64, "width": 64},
        )  # fmt: skip
    else:
        unet = sd15_unet() if model == "sd15" else sdxl_unet()
        fp32 = sum(p.numel() * 4 for p in unet.parameters())
        build_s = time.perf_counter() - start
        diffquant.quantize(unet, recipe, my_sampler(args.samples, args.steps, model == "sdxl"), progress=False)
    return unet, fp32, build_s


def where(stack: list[str] | None) -> str:
    """The method step and the innermost diffquant function of the peak's stack (``RssTrace``)."""
    if not stack:
        return "-"
    step = next((stack[i + 1].split(":")[0] for i, f in enumerate(stack[:-1]) if f.endswith(" run_methods")), "")
    return f"{step} / `{stack[-1].split(' ')[-1]}`" if step else f"`{stack[-1].split(' ')[-1]}`"


def write_markdown(record: dict, path: Path) -> None:
    lines = [
        "# Quantizing at Stable Diffusion size (peak resident memory per named recipe)",
        "",
        f"Command: `{record['command']}` — {record['date']}, torch {record['torch']}, {record['cpu']}.",
        "",
        "Random weights (seed 0). Each row in its own process; peak RSS is that process's `VmHWM` (model "
        "construction included). The acceptance bound is 2.5x the FP32 weight bytes. `fp runs`: sampling "
        "runs over the FP model (the recording every method step replays); `gptq groups`: Hessian groups "
        "under the byte budget (a tenth of RAM), each one replay of GPTQ's recorded calls.",
        "",
        "Wall times are on a shared 2-core machine (tests and other benchmarks ran beside some rows); "
        "`peak reached in`: the method step and function running when the peak was sampled (traces: "
        "`scale_traces/`).",
        "",
        "| model | recipe | FP32 weights (GB) | peak RSS (GB) | peak / FP32 | quantize (s) | fp runs | gptq groups | gptq replays | trajectory | peak reached in |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['recipe']} | | | | | | | | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['fp32_weight_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
            f"{r['peak_over_fp32']:.2f} | {r['quantize_s']:.0f} | {r['fp_runs']} | {r.get('gptq_groups') or '-'} | "
            f"{r.get('gptq_replays') or '-'} | {r['samples']} x DDIM-{r['steps']}, CFG | {where(r.get('peak_stack'))} |"
        )
    for note in record.get("notes", []):  # hand-written paragraphs kept in the JSON, so a rerun keeps them
        lines += ["", note]
    path.write_text("\n".join(lines) + "\n")


def cpu_model() -> str:
    """The CPU model, its int8 ISA flags and family / model numbers (``diffquant.backends.cpu.host``)."""
    from diffquant.backends.cpu import host

    return host()["text"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), metavar="MODEL:RECIPE")
    ap.add_argument("--samples", type=int, default=1, help="calibration trajectories (each with guidance)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps of the calibration loop")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per row")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "RECIPE"), help=argparse.SUPPRESS)
    ap.add_argument("--markdown", action="store_true", help="only rewrite the markdown from the JSON")
    args = ap.parse_args()
    if args.markdown:
        write_markdown(json.loads(args.out.with_suffix(".json").read_text()), args.out.with_suffix(".md"))
        return
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args)), flush=True)
        return
    path = args.out.with_suffix(".json")
    record = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    record.update(
        command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), torch=torch.__version__,
        cpu=cpu_model(), memory_bytes=__import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES"),
    )  # fmt: skip
    done = {(r["model"], r["recipe"]) for r in record["rows"] if "error" not in r}
    for row in args.rows:
        model, recipe = row.split(":", 1)
        if (model, recipe) in done:
            continue
        cmd = [sys.executable, __file__, "--child", model, recipe, "--samples", str(args.samples)]
        cmd += ["--steps", str(args.steps), "--threads", str(args.threads), "--out", str(args.out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if lines:
                result = json.loads(lines[-1][len("RESULT ") :])
            else:
                tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                result = {"model": model, "recipe": recipe, "error": f"exit {proc.returncode}: {tail[:200]}"}
        except subprocess.TimeoutExpired:
            result = {"model": model, "recipe": recipe, "error": f"timed out after {args.timeout} s"}
        record["rows"] = [r for r in record["rows"] if (r["model"], r["recipe"]) != (model, recipe)] + [result]
        record["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
        write_markdown(record, args.out.with_suffix(".md"))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
