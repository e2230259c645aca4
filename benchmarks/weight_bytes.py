"""Weight bytes of the quantized built-in models against FP32, for every weight format of the named recipes.

Bytes are what a forward reads: integer weights at their stored size (int4 and below packed two per
byte), their scales, biases, norms, embeddings and the layers a recipe leaves in float. Activation
settings do not change weight bytes, so every recipe is applied with dynamic activations (no
calibration needed). Writes benchmarks/results/weight_bytes.{json,md}:

    python benchmarks/weight_bytes.py
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from diffquant import get_recipe, quantize
from diffquant.models import DENOISERS, load_builtin
from diffquant.recipe import RECIPES
from diffquant.serialization import weight_bytes

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    rows = []
    seen = set()
    for name in DENOISERS:
        fp = load_builtin(name)
        fp_bytes = weight_bytes(fp)
        for recipe_name in RECIPES:
            recipe = get_recipe(recipe_name)
            key = (recipe.weights, recipe.weight_group_size, recipe.weight_bits_budget)
            if recipe.weight_bits_budget is not None or (name, key) in seen:
                continue  # `auto` needs a sensitivity run; one row per weight format
            seen.add((name, key))
            q = quantize(copy.deepcopy(fp), recipe.replace(act_mode="dynamic"), progress=False)
            b = weight_bytes(q)
            rows.append(
                {"model": name, "recipe": recipe_name, "weights": recipe.weights, "group_size": recipe.weight_group_size,
                 "fp32_bytes": fp_bytes, "q_bytes": b, "ratio": round(b / fp_bytes, 4)}
            )  # fmt: skip
    record = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "weight_bytes.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Weight bytes of the quantized built-in models",
        "",
        f"Command: `{record['command']}`. Bytes a forward reads (packed integer weights, scales, biases, norms,",
        "embeddings, layers left in float) against the FP32 model; one row per weight format.",
        "",
        "| model | recipe | weights | group | FP32 bytes | quantized bytes | ratio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        group = r["group_size"] or "channel"
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['weights']} | {group} | {r['fp32_bytes']:,} | {r['q_bytes']:,} | "
            f"{100 * r['ratio']:.2f} % |"
        )
    (RESULTS / "weight_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
