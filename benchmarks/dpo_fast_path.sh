#!/bin/bash
# DPO steps on examples/dpo_plot_review.yaml: the job's fast path (one row per pair) vs the padded
# two-rows-per-pair layout (train.chunked_ce=off) vs SFT on the same rows, 8 steps each, one after
# the other. Run from the repository root after `python examples/dpo_plot_review.py` wrote the data:
#   flock /tmp/slimtune-bench.lock bash benchmarks/dpo_fast_path.sh
C="examples/dpo_plot_review.yaml overwrite=true train.max_steps=8 train.eval_every=8 train.eval_before=false eval.max_examples=16 eval.generate=false eval.samples=0 --no-progress"
for v in fast padded sft; do
  case $v in
    fast) X="output_dir=runs/speed/fast";;
    padded) X="output_dir=runs/speed/padded train.chunked_ce=off";;
    sft) X="output_dir=runs/speed/sft train.objective=sft data.train=runs/dpo_plot_review/sft_train.jsonl data.validation=runs/dpo_plot_review/sft_validation.jsonl";;
  esac
  /usr/bin/time -f "$v wall %e s maxrss %M KB" .venv/bin/slimtune train $C $X > runs/speed-$v.log 2>&1
  tail -1 runs/speed-$v.log
  .venv/bin/python -c "import json;s=json.load(open('runs/speed/$v/summary.json'));print('$v', 'step_time_s', round(s['step_time_s'],3), 'train_s', round(s['train_time_s'],1))"
done
