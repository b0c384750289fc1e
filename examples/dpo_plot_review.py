"""DPO vs SFT on the default task at the same budget, offline (issue 24).

The packaged default task (Rotten Tomatoes: is this text a movie's plot summary or a critic's
review? answer "plot" / "review") becomes preference pairs: chosen = the right one-word answer,
rejected = the other one. The same 240 training / 100 validation rows (texts cut to 32 words) train
  - DPO  (examples/dpo_plot_review.yaml: train.objective dpo, reference = adapter off), and
  - SFT  (the same prompts and right answers as instruction rows),
each 30 steps of batch 8 with the same LoRA, and the script prints the held-out generated-answer
accuracy (greedy, the metric of the default run) before -> after for both.

    python examples/dpo_plot_review.py            # ~ minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from slimtune.train.config import load_config
from slimtune.train.datasets_offline import RT_KIND, load_builtin
from slimtune.train.run import run_train

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "runs" / "dpo_plot_review"
N_TRAIN, N_VAL = 240, 100
WORDS = 32  # texts cut to their first 32 words for both runs: DPO refuses a prompt longer than the limit


def shorten(r: dict) -> dict:
    text = r["instruction"].split("\n")[0].removeprefix("Text: ")
    return {**r, "instruction": RT_KIND.format(text=" ".join(text.split()[:WORDS]))}


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    rows, _, info = load_builtin("rotten_tomatoes_plot")
    answers = info["answers"]
    rows = [shorten(r) for r in rows[:N_TRAIN + N_VAL]]
    train, val = rows[:N_TRAIN], rows[N_TRAIN:]

    def pair(r):
        wrong = next(a for a in answers if a != r["output"])
        return {"prompt": r["instruction"], "chosen": r["output"], "rejected": wrong}

    write(OUT / "pairs_train.jsonl", [pair(r) for r in train])
    write(OUT / "pairs_validation.jsonl", [pair(r) for r in val])
    write(OUT / "sft_train.jsonl", train)
    write(OUT / "sft_validation.jsonl", val)
    extra = sys.argv[1:]  # key=value overrides for both runs (e.g. train.max_steps=10)
    results = {}
    dpo = load_config(str(HERE / "dpo_plot_review.yaml"), ["overwrite=true", "train.metric=gen_accuracy"] + extra)
    results["dpo"] = run_train(dpo, progress=False)
    sft = load_config(str(HERE / "dpo_plot_review.yaml"),
                      ["overwrite=true", "train.objective=sft", f"data.train={OUT / 'sft_train.jsonl'}",
                       f"data.validation={OUT / 'sft_validation.jsonl'}", f"output_dir={OUT / 'sft'}",
                       "train.metric=gen_accuracy"] + extra)
    results["sft"] = run_train(sft, progress=False)
    n = min(dpo.eval.max_examples, N_VAL)
    print(f"\nheld-out ({n} validation rows), generated-answer accuracy, before -> after; train time")
    for name, r in results.items():
        b, a = (r["before"] or {}).get("gen_accuracy"), (r["after"] or {}).get("gen_accuracy")
        line = f"  {name:4s} {b:.2f} -> {a:.2f}  ({r['steps']} steps, {r['train_time_s']:.0f} s training)"
        if name == "dpo":
            line += (f"; reward accuracy {(r['before'] or {}).get('reward_accuracy', 0):.2f} -> "
                     f"{(r['after'] or {}).get('reward_accuracy', 0):.2f}")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
