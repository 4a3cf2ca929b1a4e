#!/usr/bin/env bash
# The README's simulated table: the real Mixtral trace (../shared/traces; skipped when absent) and
# synthetic DeepSeek-V2-Lite / Qwen3-30B-A3B traces, on the rtx4090-ddr5 and rtx5090-ddr5 presets, at
# 25/50/75% cache or the largest that fits, host time charged from the profile. Writes results/simulate-<model>-<hw>.{json,txt,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results
MIXTRAL=../shared/traces/mixtral-8x7b-instruct__speculative-moe
for hw in rtx4090-ddr5 rtx5090-ddr5; do
  tag=${hw%%-*}
  if [ -f "$MIXTRAL.npz" ]; then
    hybrimoe-kt simulate --trace "$MIXTRAL" --hardware "$hw" --cache-ratio 0.125,max --no-progress \
      --json "results/simulate-mixtral-$tag.json" --plot "results/simulate-mixtral-$tag.png" \
      | tee "results/simulate-mixtral-$tag.txt"
  fi
  for m in deepseek-v2-lite qwen3-30b-a3b; do
    ratios=0.25,0.5,0.75  # slots hold the GGUF Q4_K blocks (the default --gpu-format host)
    hybrimoe-kt simulate --trace "synthetic:$m" --hardware "$hw" --cache-ratio "$ratios" --no-progress \
      --json "results/simulate-$m-$tag.json" --plot "results/simulate-$m-$tag.png" \
      | tee "results/simulate-$m-$tag.txt"
  done
done
