#!/usr/bin/env bash
# The two-task table of benchmarks/results/search/README.md (issue 28): per task, under one training-
# time budget B per run, train.cpu_threads=1, the same splits (test carved first, split seed 42):
#   1. compare: the hand-set config as given, and full fine-tuning with its own lr probe; 3 seeds a row
#   2. search: trials at the hand-set row's step count S (what LoRA trains in B), < 1% trainable,
#      the top 2 configs under 2 seeds, the pick by the mean
#   3. compare best.yaml --methods none: the search's pick under the same budget B, 3 seeds
# Usage: bash benchmarks/results/search/run_two_task.sh OUT   (run under flock /tmp/slimtune-bench.lock)
set -euo pipefail
OUT=${1:?output folder}
ST=${SLIMTUNE:-slimtune}
one() {  # name config budget_min probe_steps trials timeout_min overrides...
  local name=$1 cfg=$2 b=$3 ps=$4 trials=$5 tmo=$6; shift 6
  local o=$OUT/$name
  mkdir -p "$o"
  echo "== $name: compare (config as given, full) $(date -u +%T)"
  $ST compare "$cfg" --methods full --budget-minutes "$b" --seeds 3 --lr-grid 3 --probe-steps "$ps" \
      --out "$o/compare" train.cpu_threads=1 "$@"
  local s
  s=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['budget_steps'])" "$o/compare/runs/config/result.json")
  echo "== $name: search at $s steps a trial $(date -u +%T)"
  $ST search "$cfg" --trials "$trials" --timeout "$tmo" --max-trainable-pct 1 --seeds 2 --seed-top 2 \
      --out "$o/search" train.cpu_threads=1 train.max_steps="$s" "$@"
  echo "== $name: the search's pick under the same budget $(date -u +%T)"
  $ST compare "$o/search/best.yaml" --methods none --budget-minutes "$b" --seeds 3 --out "$o/best" train.cpu_threads=1
  echo "== $name: done $(date -u +%T)"
}
one minilm_rt examples/minilm_rotten_tomatoes.yaml 1 6 6 9 data.max_eval=200
one smollm2_chatterbot examples/smollm2_chatterbot.yaml 1.25 2 4 10
