#!/usr/bin/env bash
# The main job on a CPU-only machine (run after scripts/install.sh):
# 1. a tiny random-weight Mixtral (no download) under build/;
# 2. A/B of the stock rules vs the hybrimoe rules on it: measured speed, hit rate, CPU/GPU split, token
#    agreement (the GPU tier is the CPU stand-in), plus the SIMULATED projection of both strategies;
# 3. the simulator on the real Mixtral routing trace (../shared/traces; synthetic when absent).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results
hybrimoe-kt make-tiny-model --family mixtral --out build/tiny-mixtral --force
hybrimoe-kt ab --model-path build/tiny-mixtral --rules-a optimize_rules/Mixtral-stock.yaml \
  --rules-b optimize_rules/Mixtral-hybrimoe.yaml --prompts scripts/prompts.txt --max-new-tokens 32 \
  --json results/ab-tiny-mixtral.json
# Q4_K_M expert slots (the host format); "max" = the largest cache that fits a 24 GB card
hybrimoe-kt simulate --cache-ratio 0.125,max --json results/simulate.json --plot results/simulate.png
