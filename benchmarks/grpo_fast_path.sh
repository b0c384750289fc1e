#!/bin/bash
# GRPO steps on examples/grpo_plot_review.yaml (8 prompts x 8 completions a step, from the example's SFT
# stage): the job's fast path (the prompts' KV cache once per group when sampling, a prompt and its 8
# completions in one row for the loss) vs the plain layout (train.chunked_ce=off: generate runs every
# prompt 8 times, the loss 8 padded rows per prompt), 4 steps each, one after the other, the same seed.
# Run from the repository root after `python examples/grpo_plot_review.py` wrote the data and the SFT stage:
#   flock /tmp/slimtune-bench.lock bash benchmarks/grpo_fast_path.sh
CK=${CK:-runs/grpo_plot_review/sft/checkpoints/step-000012}  # the example's SFT stage (K = 12)
C="examples/grpo_plot_review.yaml overwrite=true resume=$CK resume_weights_only=true train.max_steps=4 train.eval_every=1000 eval.max_examples=8 --no-progress"
for v in fast plain; do
  X="output_dir=runs/speed-grpo/$v"
  [ $v = plain ] && X="$X train.chunked_ce=off"
  /usr/bin/time -f "$v wall %e s maxrss %M KB" .venv/bin/slimtune train $C $X > runs/speed-grpo-$v.log 2>&1
  tail -1 runs/speed-grpo-$v.log
  .venv/bin/python -c "import json;s=json.load(open('runs/speed-grpo/$v/summary.json'));print('$v', 'step_time_s', round(s['step_time_s'],3), 'train_s', round(s['train_time_s'],1))"
done
