#!/usr/bin/env bash
# The accelerator run of benchmarks/decode.py (issue 12): the bench-gpu config (5.2 B bf16, 1.09 B active per
# token) built in memory with a head that agrees at 0.8; batch 1 with a profile (trace summary, the while loop's
# predicate round trip), then batches 4 and 16. Each part has its own time limit and writes its JSON when done.
#   bash benchmarks/decode_gpu.sh OUTDIR [MODEL]      (on the device machine: OUTDIR=$OUT)
# Needs jax with an accelerator and gguf (carry its wheel in .whl/ where pip cannot reach an index).
set -u
out=${1:?output folder}
model=${2:-bench-gpu}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import gguf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv 2>/dev/null
python3 -c "import jax; print(jax.__version__, jax.devices())"
common=(--model "$model" --accept 0.8 --no-llama --max-new-tokens 128)
timeout "${T1:-260}" python3 benchmarks/decode.py "${common[@]}" --batch 1 --k 1 2 3 auto --repeats 3 --profile \
  --out "$out/decode-gpu-b1"
echo "batch 1 rc=$?"
timeout "${T2:-150}" python3 benchmarks/decode.py "${common[@]}" --batch 4 16 --k 1 3 auto --repeats 2 \
  --out "$out/decode-gpu-b4-16"
echo "batches 4 16 rc=$?"
