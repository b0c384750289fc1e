"""GRPO on the default task with a verifiable reward, offline (issue 24).

The packaged default task (Rotten Tomatoes: is this text a movie's plot summary or a critic's
review?) becomes GRPO prompts with an `answer` column; the built-in `exact_match` reward is 1 when a
completion's first word is the answer, and `examples.plot_review_rewards:first_label` (a user's
function) is 1 when the label the completion names first is the answer. The same 240 training /
100 validation rows as examples/dpo_plot_review.py (texts cut to 32 words). The script prints the
held-out mean of each reward (one greedy completion per validation prompt) before -> after, and the
share of the most common answer (what always naming one label would score).

    python examples/grpo_plot_review.py [key=value ...]     # e.g. train.max_steps=10
"""
from __future__ import annotations

import sys
from pathlib import Path

from slimtune.train.config import load_config
from slimtune.train.datasets_offline import load_builtin
from slimtune.train.run import run_train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dpo_plot_review import N_TRAIN, N_VAL, shorten, write  # noqa: E402  the same rows as the DPO example

OUT = HERE.parent / "runs" / "grpo_plot_review"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    rows, _, _ = load_builtin("rotten_tomatoes_plot")
    rows = [shorten(r) for r in rows[:N_TRAIN + N_VAL]]
    prompts = [{"prompt": r["instruction"], "answer": r["output"]} for r in rows]
    write(OUT / "prompts_train.jsonl", prompts[:N_TRAIN])
    write(OUT / "prompts_validation.jsonl", prompts[N_TRAIN:])
    cfg = load_config(str(HERE / "grpo_plot_review.yaml"), ["overwrite=true"] + sys.argv[1:])
    r = run_train(cfg, progress=False)
    b, a = r["before"] or {}, r["after"] or {}
    n = min(cfg.eval.max_examples, N_VAL)
    held = [p["answer"] for p in prompts[N_TRAIN:N_TRAIN + n]]
    top = max(set(held), key=held.count)
    print(f"\nheld-out ({n} validation prompts, one greedy completion each), before -> after "
          f"({r['steps']} steps, {r['train_time_s']:.0f} s training):")
    for k in sorted(k for k in a if k.startswith("reward")):
        print(f"  {k}: {b.get(k, float('nan')):.3f} -> {a[k]:.3f}")
    print(f"  (always answering '{top}' would score {held.count(top) / n:.3f} on the label rewards)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
