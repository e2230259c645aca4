#!/usr/bin/env bash
# Train (or resume) the built-in diffusion models in the background, one thread each, so both
# progress side by side on a 2-core machine. Checkpoints live in $CKPT (default /work/ckpt, outside
# the work tree); when a checkpoint is missing, training warm-starts from the shipped weights.
#   scripts/train_builtin.sh            start/resume unet and dit
#   scripts/train_builtin.sh unet       only one (THREADS=2 scripts/train_builtin.sh unet: both cores)
# Progress: tail -f $CKPT/unet.out $CKPT/dit.out
# Ship a checkpoint: .venv/bin/diffquant export-weights unet --checkpoint $CKPT/unet/checkpoint.pt
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:-/work/ckpt}
mkdir -p "$CKPT"
for kind in "${@:-unet dit}"; do
  for k in $kind; do
    name=fashion-$k
    warm=()
    if [ ! -f "$CKPT/$k/checkpoint.pt" ] && [ -f "src/diffquant/models/weights/$name.safetensors" ]; then
      warm=(--warm-start "src/diffquant/models/weights/$name.safetensors")
    fi
    nohup .venv/bin/diffquant train "$k" --out "$CKPT/$k" --threads "${THREADS:-1}" --no-export "${warm[@]}" >> "$CKPT/$k.out" 2>&1 &
    echo "training $k in the background (pid $!, log $CKPT/$k.out)"
  done
done
