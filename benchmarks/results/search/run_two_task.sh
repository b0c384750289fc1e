#!/usr/bin/env bash
# The two-task table of benchmarks/results/search/README.md (issue 28). Per task, one training budget B
# per run on the CPU clock (--budget-clock cpu: the process's CPU seconds per step over its threads, so
# a busy shared machine gives every row the same compute), train.cpu_threads=1, the same splits (test
# carved first, split seed 42). Three processes per task, all six at once (the budget is CPU time, so
# running side by side changes the wall time, not what each row trains):
#   config: the hand-set config as given (compare --methods none), 3 training seeds
#   full:   full fine-tuning with its own lr probe (compare --methods full --no-config-row), 2 seeds
#   search: trials at B each at their own step time (ranked at equal time), < 1% trainable, as many of
#           12 as fit --timeout 60 with room for the pick's second seed; the pick's test per seed
# Usage: bash benchmarks/results/search/run_two_task.sh OUT     (SLIMTUNE="python -m slimtune.cli.main")
set -euo pipefail
set -m  # job control: the background parts keep SIGINT (a non-interactive shell's & would ignore it)
OUT=${1:?output folder}
ST=${SLIMTUNE:-slimtune}
pids=()
trap 'for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || true; done' INT TERM
part() {  # log command...
  local log=$1; shift
  ("$@") >"$log" 2>&1 &
  pids+=($!)
}
one() {  # name config budget_min probe_steps overrides...
  local name=$1 cfg=$2 b=$3 ps=$4; shift 4
  local o=$OUT/$name
  mkdir -p "$o"
  part "$o/compare.log" $ST compare "$cfg" --methods none --budget-minutes "$b" --budget-clock cpu --seeds 3 \
      --out "$o/compare" train.cpu_threads=1 "$@"
  part "$o/compare-full.log" $ST compare "$cfg" --methods full --no-config-row --budget-minutes "$b" --budget-clock cpu \
      --seeds 2 --lr-grid 3 --probe-steps "$ps" --out "$o/compare-full" train.cpu_threads=1 "$@"
  part "$o/search.log" $ST search "$cfg" --budget-minutes "$b" --budget-clock cpu --trials 12 --timeout 60 \
      --max-trainable-pct 1 --seeds 2 --seed-top 1 --out "$o/search" train.cpu_threads=1 search.warmup_trials=1 "$@"
}
echo "start $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
one minilm_rt examples/minilm_rotten_tomatoes.yaml 2 24 data.max_eval=200
one smollm2_chatterbot examples/smollm2_chatterbot.yaml 1.5 8
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
echo "end $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg), rc $rc"
exit $rc
