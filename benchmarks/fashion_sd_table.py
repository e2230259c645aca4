"""fashion-sd under the evaluation protocol: FP reference quality, floors, and the quantization table.

    python benchmarks/fashion_sd_table.py --n 5000                          # FP rows, floors, sample grid
    python benchmarks/fashion_sd_table.py --n 500 --recipes w8a8 w8a8-tdq w4a8 w8a4-tdq fp8

FP rows at guidance 1 and 3 (DDIM-50, the class prompt of each sample, ``fashion_sd.generate``): FD of
the decoded images (cropped to 28 x 28) in ``fashion-features`` space against the training set's
statistics, and prompt-class consistency (the classifier agrees with the class the prompt names).
Next to them two floors: real test images (``fashion-features-reference.json``, the FD a perfect
generator scores at that N) and the same test images through the VAE (encode, decode: what the
latent space alone costs). Quantized rows (guidance 3) quantize the pipeline's UNet with each recipe,
calibrated by running the pipeline on its ten class prompts at guidance 3 (what ``diffquant quantize
--model fashion-sd`` does), and are scored beside the FP row of the same run, with PSNR against the
FP images from identical noise and prompts, and a per-step error curve: the noise prediction's SQNR
at each step of the FP pipeline's own trajectory (its UNet calls recorded and replayed on the quantized
UNet, so each step's error is the model's, not accumulated drift). Rows are appended as they finish; a rerun skips them.
Results: ``benchmarks/results/fashion_sd_table_n{N}.{json,md}`` and ``..._step_sqnr.png``; the grid: ``docs/samples_fashion-sd.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import diffquant
from diffquant.data.fashion_mnist import load_fashion_mnist, to_model_range
from diffquant.eval import Evaluator
from diffquant.eval.evaluate import load_reference
from diffquant.eval.metrics import psnr_per_image
from diffquant.models import fashion_sd as sd
from diffquant.report.pipeline_report import record_pipeline_trajectory, step_sqnr
from diffquant.report.plots import plot_step_sqnr

HERE = Path(__file__).parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"
STEP_SAMPLES = 20  # per-step error curves: two samples per class prompt (noise seed 777, not calibration's)


def vae_floor(pipe, evaluator: Evaluator, n: int) -> dict:
    """FD and accuracy of the first ``n`` test images after the VAE (posterior mean, decoded)."""
    images, labels = load_fashion_mnist("test")
    x = sd.pad_images(to_model_range(images[:n]), (pipe.vae.config.sample_size - 28) // 2)
    out = []
    with torch.no_grad():
        for lo in range(0, n, 250):
            z = pipe.vae.encode(x[lo : lo + 250]).latent_dist.mean
            out.append(pipe.vae.decode(z).sample.clamp(-1, 1))
    recon = sd.crop_images(torch.cat(out), (pipe.vae.config.sample_size - 28) // 2)
    score = evaluator.score(recon, labels[:n])
    psnr = float(psnr_per_image(recon, sd.crop_images(x, (pipe.vae.config.sample_size - 28) // 2)).mean())
    return {"fd": score["fd"], "class_consistency": score["class_consistency"], "psnr": psnr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--recipes", nargs="*", default=[])
    ap.add_argument("--pipeline", type=Path, default=None, help="a fashion-sd folder (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path, default=None, help="results stem (default: results/fashion_sd_table_nN)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from scale import cpu_model

    out = args.out or RESULTS / f"fashion_sd_table_n{args.n}"
    path = out.with_suffix(".json")
    record = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    record.update(
        command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), torch=torch.__version__,
        cpu=cpu_model(), threads=args.threads, n=args.n, steps=args.steps,
    )  # fmt: skip
    done = {(r["bits"], r["guidance"]) for r in record["rows"]}
    pipe = sd.load_fashion_sd(args.pipeline)
    evaluator = Evaluator()

    def save(row: dict) -> None:
        record["rows"].append(row)
        record["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
        write_markdown(record, out.with_suffix(".md"))
        print(json.dumps(row), flush=True)

    if ("floor: test images", "-") not in done:
        floor = load_reference()["fd_test_vs_train"].get(str(args.n))
        save({"bits": "floor: test images", "guidance": "-", "fd": floor, "class_consistency": None})
    if ("floor: test images through the VAE", "-") not in done:
        save({"bits": "floor: test images through the VAE", "guidance": "-", **vae_floor(pipe, evaluator, args.n)})
    prompts = [sd.prompt(c) for c in range(len(sd.CLASS_NOUNS))]
    todo = [name for name in args.recipes if (name, sd.GUIDANCE) not in done]
    fp_images = {}
    for guidance in (1.0, sd.GUIDANCE):
        if ("FP32", guidance) in done and not (todo and guidance == sd.GUIDANCE):
            continue  # scored already, and no recipe to compare with it
        start = time.perf_counter()
        images, labels = sd.generate(pipe, args.n, args.steps, guidance, batch_size=args.batch)
        fp_images[guidance] = images
        if ("FP32", guidance) not in done:
            score = evaluator.score(images, labels)
            save({"bits": "FP32", "guidance": guidance, **score, "seconds": round(time.perf_counter() - start, 1)})
    if args.grid:
        from diffquant.report.grid import save_grid

        grid, _ = sd.generate(pipe, 100, args.steps, sd.GUIDANCE, seed=1, batch_size=100)
        save_grid(grid, DOCS / "samples_fashion-sd.png", ncol=10)  # image i has class i % 10: one per column
    guided = {"guidance_scale": sd.GUIDANCE}
    fp_calls = record_pipeline_trajectory(pipe, STEP_SAMPLES, args.steps, prompts, guided) if todo else None
    for name in todo:
        start = time.perf_counter()
        q = copy.deepcopy(pipe)
        diffquant.quantize(q, name, prompts=prompts, pipeline_kwargs=guided, progress=False)
        calib = round(time.perf_counter() - start, 1)
        images, labels = sd.generate(q, args.n, args.steps, sd.GUIDANCE, batch_size=args.batch)
        score = evaluator.score(images, labels)
        psnr = float(psnr_per_image(images, fp_images[sd.GUIDANCE]).mean())
        curve = step_sqnr(fp_calls, q.unet)  # the FP trajectory recorded once, replayed per recipe
        row = {"bits": name, "guidance": sd.GUIDANCE, **score, "psnr_vs_fp": psnr, "calib_seconds": calib}
        save({**row, "step_sqnr": curve})
        del q
    curves = {r["bits"]: r["step_sqnr"] for r in record["rows"] if "step_sqnr" in r}
    if curves:
        title = f"fashion-sd, guidance {sd.GUIDANCE}: error of each step on the FP trajectory ({STEP_SAMPLES} samples)"
        plot_step_sqnr(curves, out.with_name(out.name + "_step_sqnr.png"), title)


def write_markdown(record: dict, path: Path) -> None:
    rows = record["rows"]
    fp = {r["guidance"]: r for r in rows if r["bits"] == "FP32"}
    lines = [
        f"# fashion-sd: reference quality and quantization (N = {record['n']}, DDIM-{record['steps']})",
        "",
        f"`{record['command']}` — {record.get('date', '')}, torch {record['torch']}, {record['cpu']}, "
        f"{record['threads']} threads.",
        "",
        "FD: decoded samples (cropped to 28 x 28) in `fashion-features` space against the training set; "
        "consistency: the classifier agrees with the class the prompt names; gap: FD against the FP row of the "
        "same guidance in this run; PSNR: against the FP images from identical noise and prompts.",
        "",
        "| row | guidance | FD | FD gap | class consistency | PSNR vs FP (dB) | step SQNR min / median (dB) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = fp.get(r["guidance"])
        gap = f"{100 * (r['fd'] / ref['fd'] - 1):+.1f} %" if ref and r["bits"] != "FP32" and r["fd"] else ""
        cc = f"{r['class_consistency']:.3f}" if r.get("class_consistency") is not None else ""
        psnr = f"{r['psnr_vs_fp']:.2f}" if "psnr_vs_fp" in r else (f"{r['psnr']:.2f} (vs input)" if "psnr" in r else "")
        fd = f"{r['fd']:.3f}" if r["fd"] is not None else "n/a"
        secs = r.get("calib_seconds", r.get("seconds", ""))
        db = sorted(x["sqnr_db"] for x in r.get("step_sqnr", []))
        steps = f"{db[0]:.1f} / {db[len(db) // 2]:.1f}" if db else ""
        lines.append(f"| {r['bits']} | {r['guidance']} | {fd} | {gap} | {cc} | {psnr} | {steps} | {secs} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
