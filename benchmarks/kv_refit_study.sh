#!/usr/bin/env bash
# The K/V refit comparison of benchmarks/results/kv_refit/README.md: POP at the default plan
# (last third) with each refit variant, on the same held-out texts, one CPU thread.
# Usage: [VARIANTS=state,kv-chat-4x] benchmarks/kv_refit_study.sh [MODEL ...]
#        (default: smollm2-135m-instruct gemma-3-270m and the variants below)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
variants="${VARIANTS:-state,kv-chat,state-chat,kv-chat-4x,state-chat-4x}"
only="pop-33%,pop-33%+kvfit,$(echo "$variants" | sed 's/\([^,]*\)/pop-33%+kvfit:\1/g')"
for model in "${@:-smollm2-135m-instruct gemma-3-270m}"; do
  for m in $model; do
    case "$m" in
      gemma*) texts=(--num-texts 8 --continuation-len 48) ;;  # its 262k-entry LM head makes scoring 2x dearer
      *) texts=(--num-texts 16) ;;
    esac
    "$py" -m pop_disagg.cli eval fidelity --model "$m" "${texts[@]}" --tasks '' --kv-fit-ratios 0.3333334 \
      --kv-fit-variants "$variants" --only "$only" --threads 1 --no-plots --no-progress \
      --output "benchmarks/results/kv_refit/${m}.json"
  done
done
