#!/usr/bin/env bash
# The GPU check in one call on the device machine (torch 2.11 there, no diffusers, no network).
# Here, once:   echo /.whl/ >> .git/info/exclude
#               for p in diffusers==0.42.1 huggingface_hub==2.4.0 safetensors==0.8.0 importlib_metadata==10.2.0 \
#                        httpx2==2.16.2 httpcore2==2.16.2 truststore click==8.5.1; do
#                 python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $p; done
#               (diffusers and what it needs beyond the machine's packages, ~8 MB; the rest is there)
# Then: device run, carry [".whl"], command "bash benchmarks/gpu/check.sh", timeout_s 540.
# Results: $OUT/gpu_check.json (written after every row) and $OUT/log.
set -uo pipefail
OUT=${OUT:-.}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
python3 -c "import diffusers, torch; print('diffusers', diffusers.__version__, 'torch', torch.__version__)" || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/log"
timeout 480 python3 benchmarks/gpu/check.py --out "$OUT/gpu_check.json" "$@" 2>&1 | tee -a "$OUT/log"
