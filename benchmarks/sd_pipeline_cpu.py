"""A whole SD-1.5-shaped text-to-image call on the CPU: text encoder, 20 guided UNet steps, VAE decode.

    python benchmarks/sd_pipeline_cpu.py --threads 2 --out benchmarks/results/xeon_amx/sd_pipeline_cpu
    python benchmarks/sd_pipeline_cpu.py --tiny --repeats 1        # a quick check of the script

The three models of Stable Diffusion 1.5 with its configurations and random weights (seed 0): a CLIP
text encoder (12 layers, 768 wide), the ``UNet2DConditionModel`` of ``benchmarks/sd_unet_cpu.py`` and
the ``AutoencoderKL`` decoder; batch 1, 512x512 pixels (64x64 latents), 20 DDIM steps with
classifier-free guidance (the UNet at batch 2: prompt and empty prompt), token ids in place of a
tokenizer (no vocabulary files offline). What a pipeline call does, written out so each part is timed:

    FP32 eager          the three models as built
    FP32 compiled       each ``diffquant.bench.compile_forward``-ed
    diffquant           the UNet ``w8a8-tdq`` (attention unquantized, round-to-nearest weights, as in
                        sd_unet_cpu.py) on the CPU backend, compiled, attention in float32 and in bfloat16
                        (``lower(.., attention="bfloat16")``); text encoder and VAE FP32 compiled

The text encoder and the VAE are not quantized: ``diffquant.quantize`` takes denoisers (a time-step
argument), and quantizing the other two is separate work; the table shows how much of the call they
take. Each row: the median of ``--repeats`` whole calls after a warm-up call, and the time spent in
each model within them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import sd_unet_cpu as sd

from diffquant import get_recipe, quantize
from diffquant.backends import lower
from diffquant.backends.cpu import host
from diffquant.bench import compile_forward


def text_encoder(tiny: bool):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if tiny:
        cfg = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=64)  # fmt: skip
    else:  # SD-1.5's openai/clip-vit-large-patch14 text tower
        cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    return CLIPTextModel(cfg).eval()


def vae(tiny: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
    if tiny:
        return AutoencoderKL(
            block_out_channels=(32, 32, 64, 64), norm_num_groups=16, layers_per_block=1, **blocks
        ).eval()
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512, **blocks
    ).eval()


class Timed:
    """``fn`` with its wall time summed into ``totals[name]``."""

    def __init__(self, fn, name: str, totals: dict):
        self.fn, self.name, self.totals = fn, name, totals

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.fn(*args)
        self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - start
        return out


def generate(te, unet, decode, steps: int, guidance: float = 7.5, seed: int = 0):
    """One text-to-image call: the prompt and the empty prompt encoded, ``steps`` guided DDIM steps, decode."""
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    ids[1] = 49407  # the empty prompt: end-of-text tokens
    ehs = te(ids)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    sched.set_timesteps(steps)
    latents = torch.randn(1, 4, 64, 64, generator=g)
    for t in sched.timesteps:
        eps = unet(torch.cat([latents, latents]), t.reshape(1).expand(2), ehs)
        cond, uncond = eps.chunk(2)
        latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return decode(latents / 0.18215)


class UNetCall(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, t, ehs):
        return self.m(x, t, ehs).sample


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--recipe", default="w8a8-tdq")
    ap.add_argument("--tiny", action="store_true", help="narrow models of the same blocks: a quick check")
    ap.add_argument("--out", default="benchmarks/results/sd_pipeline_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    te_fp, unet_fp, vae_fp = text_encoder(args.tiny), sd.sd15_unet(args.tiny), vae(args.tiny)
    if args.tiny:  # the tiny UNet takes 768-wide text states: project the tiny encoder's up
        proj = torch.nn.Linear(te_fp.config.hidden_size, 768)
    rows, images = [], {}

    def run(name, te_m, unet_m, vae_m, note=""):
        totals: dict = {}

        def te(ids):
            out = te_m(ids).last_hidden_state
            return proj(out) if args.tiny else out

        call = (Timed(te, "text encoder", totals), Timed(unet_m, "UNet", totals),
                Timed(lambda z: vae_m.decode(z).sample, "VAE decode", totals))  # fmt: skip
        start = time.perf_counter()
        images[name] = generate(*call, args.steps)  # warm-up: compiles where compiled
        first = time.perf_counter() - start
        walls, parts = [], []
        for _ in range(args.repeats):
            totals.clear()
            start = time.perf_counter()
            generate(*call, args.steps)
            walls.append(time.perf_counter() - start)
            parts.append(dict(totals))
        i = walls.index(statistics.median_low(walls))
        r = {"variant": name, "s": round(walls[i], 2), "first_call_s": round(first, 1), "note": note}
        r.update({f"{k} s": round(v, 2) for k, v in parts[i].items()})
        rows.append(r)
        print(json.dumps(r), flush=True)

    run("FP32 eager", te_fp, UNetCall(unet_fp), vae_fp)
    te_c, vae_c = compile_forward(copy.deepcopy(te_fp)), copy.deepcopy(vae_fp)
    vae_c.decode = torch.compile(vae_c.decode, dynamic=False)
    run("FP32 compiled", te_c, compile_forward(UNetCall(copy.deepcopy(unet_fp))), vae_c)
    gc.collect()
    recipe = get_recipe(args.recipe).replace(attention=False, weight_method="rtn", name=f"{args.recipe}-noattn")
    q = quantize(copy.deepcopy(unet_fp), recipe, sd.runner, progress=False)
    unet_fp = None
    gc.collect()
    for attention in ("float32", "bfloat16"):
        low, _ = lower(copy.deepcopy(q), "cpu", attention=attention)
        note = f"UNet {recipe.name}, attention {attention}; text encoder, VAE FP32 compiled"
        run(f"diffquant UNet, attention {attention}", te_c, compile_forward(UNetCall(low)), vae_c, note)
        low = None
        gc.collect()
    base, compiled = rows[0]["s"], rows[1]["s"]
    ref = images["FP32 eager"]
    for r in rows:
        r["speedup_vs_fp32_eager"] = round(base / r["s"], 3)
        r["speedup_vs_fp32_compiled"] = round(compiled / r["s"], 3)
        noise = (images[r["variant"]] - ref).pow(2).mean()
        r["psnr_vs_fp32_db"] = round(float(10 * torch.log10(4.0 / noise)), 1) if noise > 0 else float("inf")
    info = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": args.threads,
            "cpu": host()["text"], "machine": platform.machine(), "steps": args.steps, "repeats": args.repeats}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    lines = [
        f"# SD-1.5-shaped text-to-image call{' (tiny)' if args.tiny else ''}: text encoder, {args.steps} guided "
        "UNet steps, VAE decode",
        "",
        f"Command: `{info['command']}` (torch {info['torch']}, {args.threads} threads, median of {args.repeats} "
        f"calls after one warm-up call), {info['cpu']}.",
        "",
        "| variant | s | vs FP32 eager | vs FP32 compiled | text encoder (s) | UNet (s) | VAE decode (s) | "
        "PSNR vs FP32 eager (dB) | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['s']} | {r['speedup_vs_fp32_eager']}x | {r['speedup_vs_fp32_compiled']}x | "
            f"{r.get('text encoder s', '')} | {r.get('UNet s', '')} | {r.get('VAE decode s', '')} | "
            f"{r['psnr_vs_fp32_db']} | {r['note']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md / .json")


if __name__ == "__main__":
    main()
