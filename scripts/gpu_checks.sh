#!/usr/bin/env bash
# The GPU checks (gpu tests, decode, prefill at the paper's setting, a profiled chunk step), as one
# short run on a machine with a CUDA GPU (nothing in CI needs one). Needs a Python whose torch has
# CUDA: PY=/path/to/python scripts/gpu_checks.sh.
# Budget: about 6 minutes on one H100/H200 (random-weight Llama-3.1-8B geometry built on the GPU,
# bf16, 16 GB). Every result lands under $OUT (default benchmarks/results/gpu/), with the GPU's name.
set -uo pipefail  # no -e: one failing check must not hide the others' results
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
run() { echo "== $* ($(date -u +%T))" | tee -a "$OUT/log.txt"; timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$OUT/log.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$OUT/log.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'this torch has no CUDA'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/log.txt" || exit 1

# 1. The GPU-only tests (CUDA-graph decode == eager decode, token for token).
run "$PY" -m pytest -q -m gpu tests/test_speed_paths.py
# 2. Decode tok/s at batch 1 and 32, CUDA graphs (default) vs --enforce-eager; "ours / limit" is the
#    step time over weights+KV bytes / measured HBM bandwidth (its inverse: the fraction of the limit).
#    Llama-3.1-8B (bandwidth-bound) and SmolLM2-135M's geometry (launch-bound: what graphs are for).
dec() {  # model mode
  local extra=(); [ "$2" = eager ] && extra=(--enforce-eager)
  run "$PY" benchmarks/decode_speed.py --device cuda --dtype bfloat16 --clock wall --models "$1" \
      --batch-sizes 1,32 --prompt-len 128 --new-tokens 64 --repeats 2 "${extra[@]}" --json "$OUT/decode_$1_bf16_$2.json"
}
dec llama-3.1-8b graphs
# 3. POP vs full prefill at the paper's setting (Table 2's first row: Llama-3.1-8B, bf16, batch 8).
run "$PY" benchmarks/prefill_speedup.py --model llama-3.1-8b --dtype bfloat16 --device cuda \
    --lengths 128,512,2048 --batch-sizes 8 --repeats 5 --warmup 2 --no-decode --no-progress \
    --json "$OUT/prefill_speedup_llama-3.1-8b_bf16_b8.json"
dec llama-3.1-8b eager
dec smollm2-135m graphs
dec smollm2-135m eager
# 5. Why a 512-token chunk step costs ~155 ms on an H200 instead of ~25-30 (benchmarks/results/gpu/
#    README.md, "Chunked prefill"): the 8th chunk step of an 8k prompt beside 8 decoding streams,
#    under torch.profiler (CPU + CUDA), ops sorted by GPU time, in $OUT/chunk_step_profile.txt.
run "$PY" benchmarks/chunked_stall.py --model llama-3.1-8b --device cuda --dtype bfloat16 --clock wall --streams 8 \
    --stream-prompt 128 --stream-tokens 64 --long-prompt 8192 --budgets 512 --profile-chunk-step 8 \
    --profile-out "$OUT/chunk_step_profile.txt" --json "$OUT/chunked_stall_profile.json"
echo "results in $OUT ($(date -u +%T))" | tee -a "$OUT/log.txt"
