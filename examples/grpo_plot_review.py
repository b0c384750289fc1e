"""GRPO on the default task's two classes, offline (issue 24), measured so that a collapse to one
answer shows, against SFT at the same number of steps (the figures and what they say: README.md,
"Preference and reward tuning").

The packaged default task (Rotten Tomatoes: is this text a movie's plot summary or a critic's
review? answer plot / review) as GRPO prompts with an `answer` column; the reward is the built-in
`exact_match` (1 when the completion's first word is the answer). Training prompts are balanced
(111 of each class, alternating), the 100 held-out prompts are as they come (52 review).

  1. SFT, K steps (examples/grpo_plot_review_sft.yaml). SmolLM2-Instruct answers in a sentence
     ("This text is a movie's plot summary, ..."), so exact_match pays 0 for every sampled
     completion and GRPO's group-normalised advantages are all 0; K short SFT steps teach it to
     answer with the bare label.
  2. GRPO, M steps from stage 1's trained weights (examples/grpo_plot_review.yaml; the job's
     `--resume-weights-only`: fresh optimizer and schedule).
  3. SFT for K + M steps from the base (the same number of optimizer steps as 1 + 2).

Each run's final adapter then answers the held-out prompts greedily through `slimtune predict` (a
real process), and the script prints accuracy, balanced accuracy (the mean of the per-class recalls:
always naming one class scores 0.5 however skewed the split), each class's recall, and the share
of the most common answer (1.0 = a collapse to one answer).

    python examples/grpo_plot_review.py [K M] [key=value ...]   # K, M: below; overrides: the GRPO stage
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from slimtune.train.config import load_config
from slimtune.train.datasets_offline import load_builtin
from slimtune.train.objectives.grpo import collapse_metrics
from slimtune.train.objectives.rewards import exact_match
from slimtune.train.run import run_train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dpo_plot_review import N_TRAIN, N_VAL, shorten, write  # noqa: E402  the same rows as the DPO example

OUT = HERE.parent / "runs" / "grpo_plot_review"
K, M = 12, 12  # SFT steps, then GRPO steps (the same-steps SFT baseline runs K + M)


def balanced(rows: list[dict]) -> list[dict]:
    """As many rows of each answer as the rarer one has, alternating (plot, review, plot, ...)."""
    by = {a: [r for r in rows if r["output"] == a] for a in sorted({r["output"] for r in rows})}
    n = min(len(v) for v in by.values())
    return [by[a][i] for i in range(n) for a in by]


def scores(run: Path, val: Path) -> dict[str, float]:
    """Held-out metrics of the greedy answers of `run`'s adapter (`slimtune predict RUN`, a separate
    process: the run's own data settings, so the prompts are the training ones; each run evaluates
    once, at its last step, so its best/ adapter is its final one)."""
    preds = OUT / f"pred_{run.name}.jsonl"
    subprocess.run([sys.executable, "-m", "slimtune", "predict", str(run), str(val), "--out", str(preds),
                    "--max-new-tokens", "4", "--batch-size", "50"], check=True)
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    answers = [r["answer"] for r in rows]
    right = torch.tensor(exact_match()([r["prompt"] for r in rows], [r["generated"] for r in rows], answer=answers))
    out = {"accuracy": float(right.mean()), **collapse_metrics(right, [r["generated"] for r in rows], answers)}
    for a in sorted(set(answers)):
        out[f"recall_{a}"] = float(right[[i for i, x in enumerate(answers) if x == a]].mean())
    return out


def main() -> int:
    nums = [a for a in sys.argv[1:] if a.isdigit()]
    k, m = (int(nums[0]), int(nums[1])) if len(nums) == 2 else (K, M)
    extra = [a for a in sys.argv[1:] if not a.isdigit()]  # key=value overrides for the GRPO stage
    OUT.mkdir(parents=True, exist_ok=True)
    rows, _, _ = load_builtin("rotten_tomatoes_plot")
    rows = [shorten(r) for r in rows[:N_TRAIN + N_VAL]]
    train, val = balanced(rows[:N_TRAIN]), rows[N_TRAIN:]
    write(OUT / "sft_train.jsonl", train)
    write(OUT / "sft_validation.jsonl", val)
    write(OUT / "prompts_train.jsonl", [{"prompt": r["instruction"], "answer": r["output"]} for r in train])
    val_file = Path(write(OUT / "prompts_validation.jsonl",
                          [{"prompt": r["instruction"], "answer": r["output"]} for r in val]))
    runs = {}
    sft = load_config(str(HERE / "grpo_plot_review_sft.yaml"), ["overwrite=true", f"train.max_steps={k}"])
    runs[f"SFT {k} steps"] = run_train(sft, progress=False)
    grpo = load_config(str(HERE / "grpo_plot_review.yaml"),
                       ["overwrite=true", f"train.max_steps={m}", f"train.eval_every={m}",
                        f"resume={OUT / 'sft' / 'checkpoints' / f'step-{k:06d}'}", "resume_weights_only=true"] + extra)
    runs[f"SFT {k} + GRPO {m} steps"] = run_train(grpo, progress=False)
    same = load_config(str(HERE / "grpo_plot_review_sft.yaml"),
                       ["overwrite=true", f"train.max_steps={k + m}", f"output_dir={OUT / 'sft_same_steps'}"])
    runs[f"SFT {k + m} steps (same steps)"] = run_train(same, progress=False)
    dirs = [OUT / "sft", OUT / "grpo", OUT / "sft_same_steps"]
    print(f"\nheld-out: {len(val)} prompts ({sum(r['output'] == 'review' for r in val)} review), one greedy answer "
          "each from the final adapter")
    print(f"  {'run':34s} {'accuracy':>8s} {'balanced':>8s} {'recall plot':>11s} {'recall review':>13s} "
          f"{'top share':>9s} {'train s':>7s}")
    for (name, r), d in zip(runs.items(), dirs):
        s = scores(d, val_file)
        print(f"  {name:34s} {s['accuracy']:8.2f} {s['reward_balanced']:8.2f} {s['recall_plot']:11.2f} "
              f"{s['recall_review']:13.2f} {s['top_share']:9.2f} {r['train_time_s']:7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
