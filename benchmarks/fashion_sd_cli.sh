#!/usr/bin/env bash
# The command-line path a user takes with the shipped fashion-sd folder, end to end, timed and with
# peak memory: quantize it with w8a8-tdq on its class prompts, sample "a photo of an ankle boot" from
# the quantized directory alone, and ask the fashion-features classifier what the image shows
# (seeds 0-3: one image per command, as a user runs it).
#
#     bash benchmarks/fashion_sd_cli.sh [WORKDIR]        # default /tmp/fashion_sd_cli
#
# Writes WORKDIR/{prompts.txt,sd-q/,img_SEED.png} and appends its log to
# benchmarks/results/fashion_sd_cli.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DQ=${DIFFQUANT:-.venv/bin/diffquant}
WORK=${1:-/tmp/fashion_sd_cli}
LOG=benchmarks/results/fashion_sd_cli.md
FOLDER=src/diffquant/models/weights/fashion-sd
mkdir -p "$WORK"
rm -rf "$WORK/sd-q"
"$PY" -c "from diffquant.models import fashion_sd as sd; print('\n'.join(sd.prompt(c) for c in range(10)))" > "$WORK/prompts.txt"

timed() {  # timed LABEL LOG CMD...: runs CMD (its output to LOG), prints "LABEL: S s, peak RSS G GiB"
  local label=$1 log=$2; shift 2
  local t0; t0=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$WORK/.rss" "$@" > "$log" 2>&1
  awk -v l="$label" -v t0="$t0" -v t1="$(date +%s.%N)" -v kb="$(cat "$WORK/.rss")" \
    'BEGIN { printf "- `%s`: %.0f s, peak RSS %.2f GiB\n", l, t1 - t0, kb / 1048576 }'
}

[ -f "$LOG" ] || printf '%s\n' "# fashion-sd from the command line: quantize the shipped folder, sample from the quantized directory alone" \
  "" "Each run appends: the commands with their wall time and peak resident memory, then what the fashion-features" \
  "classifier says each sampled image shows (prompt \"a photo of an ankle boot\", seeds 0-3)." > "$LOG"
{
  echo
  echo "## \`bash benchmarks/fashion_sd_cli.sh\`, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD), $("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from scale import cpu_model; print(cpu_model())'), OMP_NUM_THREADS=${OMP_NUM_THREADS:-all}"
  echo
  timed "diffquant quantize --model $FOLDER --recipe w8a8-tdq --prompts prompts.txt --out sd-q" "$WORK/quantize.log" \
    "$DQ" quantize --model "$FOLDER" --recipe w8a8-tdq --prompts "$WORK/prompts.txt" --out "$WORK/sd-q"
  for seed in 0 1 2 3; do
    timed "diffquant sample --quantized sd-q --prompt \"a photo of an ankle boot\" --seed $seed --out img_$seed.png" \
      "$WORK/sample_$seed.log" \
      "$DQ" sample --quantized "$WORK/sd-q" --prompt "a photo of an ankle boot" --seed "$seed" --out "$WORK/img_$seed.png"
  done
  "$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffquant.models import fashion_sd as sd
from diffquant.models import load_builtin

work = Path(sys.argv[1])
net = load_builtin("fashion-features")
for path in sorted(work.glob("img_*.png")):
    pixels = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32)) / 127.5 - 1
    x = sd.crop_images(pixels[None, None], (pixels.shape[-1] - 28) // 2)
    with torch.no_grad():
        p = net(x).softmax(1)[0]
    k = int(p.argmax())
    print(f"- {path.name}: the classifier says **{sd.CLASS_NOUNS[k][0]}** (p = {float(p[k]):.3f})")
EOF
} | tee -a "$LOG"
