"""Probe: one fashion-unet recipe variant, sampled with the PTQ table's protocol, scored three ways.

    OMP_NUM_THREADS=1 python benchmarks/probes/w4a8_variants.py 500 "w4a8+seed=7"
    OMP_NUM_THREADS=1 python benchmarks/probes/w4a8_variants.py 500 "w4a8+wm=gptq-seq+seed=7"

The variant is a named recipe followed by ``+key=value`` changes: ``seed`` (calibration seed),
``wm`` (weight_method), ``g`` (int4 group size). Prints one JSON line: FD against the training
set, PSNR against the FP images from identical noise, mean and std of the images, and the FD
between the variant's and the FP images' features (``fd_to_fp``). The FP images are cached beside
this file. Produced the seed study in ``docs/quantization.md`` ("Weight rounding"; raw lines in
``benchmarks/results/w4a8_variants_probe.jsonl``). This is a probe harness (one variant per call,
no resume, no interval); the PTQ table is the protocol of record.
"""

import dataclasses
import json
import sys
import time

from fp_cache import fp_images  # beside this file

from diffquant import quantize
from diffquant.eval import Evaluator, extract_features, feature_stats, frechet_distance, psnr
from diffquant.models import load_builtin
from diffquant.recipe import get_recipe
from diffquant.sampling import sample


def main() -> None:
    n, variant = int(sys.argv[1]), sys.argv[2]
    evaluator = Evaluator()
    kw = dict(n=n, steps=50, sampler="ddim", seed=0, progress=False)
    fp, _ = fp_images("fashion-unet", n)
    fp_stats = feature_stats(extract_features(evaluator.feature_net, fp))
    name, *changes = variant.split("+")
    recipe = get_recipe(name)
    for change in changes:
        key, value = change.split("=")
        if key == "seed":
            recipe = recipe.replace(calibration=dataclasses.replace(recipe.calibration, seed=int(value)))
        elif key == "wm":
            recipe = recipe.replace(weight_method=value)
        elif key == "g":
            recipe = recipe.replace(weight_group_size=int(value))
        else:
            raise SystemExit(f"unknown change {key!r}: use seed, wm or g")
    start = time.time()
    model = quantize(load_builtin("fashion-unet"), recipe, progress=False)
    seconds = time.time() - start
    images, _ = sample(model, **kw)
    stats = feature_stats(extract_features(evaluator.feature_net, images))
    row = dict(
        v=f"{variant} q{seconds:.0f}s",
        fd=round(frechet_distance(stats, evaluator.reference), 4),
        psnr=round(psnr(images, fp), 2),
        mean=round(float(images.mean()), 4),
        std=round(float(images.std()), 4),
        fd_to_fp=round(frechet_distance(stats, fp_stats), 4),
    )
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
