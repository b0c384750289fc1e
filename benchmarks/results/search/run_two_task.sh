#!/usr/bin/env bash
# The two-task table of benchmarks/results/search/README.md (issue 28). Per task, one training budget B
# per run on the CPU clock (--budget-clock cpu: the process's CPU seconds per step over its threads, so
# a busy machine gives every row the same compute), train.cpu_threads=1, the same splits (test carved
# first, split seed 42), every row under train.seed 42, 43, 44. Per task, two phases, one task after the
# other (two processes at a time: one per core):
#   1. config: the hand-set config as given (compare --methods none), beside
#      full:   full fine-tuning with its own lr probe (compare --methods full --no-config-row);
#   2. search: 2 worker processes on one study (--workers 2), 16 trials at B each at their own step time
#      (ranked at equal time, successive halving at B/4 rungs), < 1% trainable, warm-started from the
#      job's choice and from LoRA on every linear; the top 2 configs under 3 seeds, the pick by the mean,
#      its test split once per seed.
# Usage: bash benchmarks/results/search/run_two_task.sh OUT     (SLIMTUNE="python -m slimtune.cli.main")
#        TASKS="minilm_rt" bash ... OUT   runs one task (default: both)
#        MINILM_B=4 MINILM_ARGS="data.max_train=20000" bash ... OUT   MiniLM's budget (CPU minutes, default 2) and
#        extra overrides for every MiniLM row (default none: the example's 2,000 training snippets)
#        PHASES=search TRIALS=32 SEARCH_ARGS="search.pruner=hyperband" bash ... OUT   only the search phase (the
#        config rows taken from an earlier run of the same command), its trial count (default 16) and extra
#        overrides for the search alone
# Then:  python benchmarks/results/search/two_task_table.py OUT
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
wait_parts() {
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  pids=()
  return $rc
}
one() {  # name config budget_min probe_steps overrides...
  local name=$1 cfg=$2 b=$3 ps=$4; shift 4
  local o=$OUT/$name
  mkdir -p "$o"
  if [[ " ${PHASES:-config search} " == *" config "* ]]; then
  echo "$name phase 1 $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
  part "$o/compare.log" $ST compare "$cfg" --methods none --budget-minutes "$b" --budget-clock cpu --seeds 3 \
      --out "$o/compare" train.cpu_threads=1 "$@"
  part "$o/compare-full.log" $ST compare "$cfg" --methods full --no-config-row --budget-minutes "$b" --budget-clock cpu \
      --seeds 3 --lr-grid 3 --probe-steps "$ps" --out "$o/compare-full" train.cpu_threads=1 "$@"
  wait_parts
  fi
  [[ " ${PHASES:-config search} " == *" search "* ]] || return 0
  echo "$name phase 2 $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
  part "$o/search.log" $ST search "$cfg" --budget-minutes "$b" --budget-clock cpu --trials "${TRIALS:-16}" --workers 2 --timeout "${TIMEOUT:-60}" \
      --max-trainable-pct 1 --seeds 3 --seed-top 2 --out "$o/search" train.cpu_threads=1 search.warmup_trials=2 "$@" ${SEARCH_ARGS:-}
  wait_parts
}
echo "start $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
rc=0
TASKS=${TASKS:-minilm_rt smollm2_chatterbot}
# MiniLM: validation 400 (the example's own), test 1,000 of the 1,281 carved (12,808 snippets x 0.1), so a
# 0.02 lead is ~1.4 test sd (binomial, p 0.75) rather than 0.6 at 200
[[ " $TASKS " == *" minilm_rt "* ]] && { one minilm_rt examples/minilm_rotten_tomatoes.yaml "${MINILM_B:-2}" 24 data.max_test=1000 ${MINILM_ARGS:-} || rc=1; }
[[ " $TASKS " == *" smollm2_chatterbot "* ]] && { one smollm2_chatterbot examples/smollm2_chatterbot.yaml 1.5 8 || rc=1; }
echo "end $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg), rc $rc"
exit $rc
