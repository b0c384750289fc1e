"""DPO vs SFT on the default task at the same budget, offline (issue 24).

The packaged default task (Rotten Tomatoes: is this text a movie's plot summary or a critic's
review? answer "plot" / "review") becomes preference pairs: chosen = the right one-word answer,
rejected = the other one. The same 240 training / 100 validation rows (texts cut to 32 words) train
  - DPO + SFT term (examples/dpo_plot_review.yaml: train.objective dpo, reference = adapter off,
    train.sft_weight 1: RPO, TRL's loss_type [sigmoid, sft]),
  - plain DPO (the same, sft_weight 0), and
  - SFT  (the same prompts and right answers as instruction rows),
each 30 steps of batch 8 with the same LoRA. The script prints, before -> after, the held-out reward
accuracy and margin (DPO's own metric: does the policy rank the right answer above the wrong one,
against the reference) and the generated-answer accuracy (greedy, the metric of the default run).

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
    dpo = load_config(str(HERE / "dpo_plot_review.yaml"), ["overwrite=true"] + extra)
    results["dpo+sft"] = run_train(dpo, progress=False)
    plain = load_config(str(HERE / "dpo_plot_review.yaml"),
                        ["overwrite=true", "train.sft_weight=0", f"output_dir={OUT / 'dpo_plain'}"] + extra)
    results["dpo"] = run_train(plain, progress=False)
    sft = load_config(str(HERE / "dpo_plot_review.yaml"),
                      ["overwrite=true", "train.objective=sft", f"data.train={OUT / 'sft_train.jsonl'}",
                       f"data.validation={OUT / 'sft_validation.jsonl'}", f"output_dir={OUT / 'sft'}",
                       "train.metric=gen_accuracy"] + extra)
    results["sft"] = run_train(sft, progress=False)
    n = min(dpo.eval.max_examples, N_VAL)
    print(f"\nheld-out ({n} validation rows), before -> after; train time")
    for name, r in results.items():
        b, a = r["before"] or {}, r["after"] or {}
        line = f"  {name:8s} generated-answer accuracy {b['gen_accuracy']:.2f} -> {a['gen_accuracy']:.2f}"
        if "reward_accuracy" in a:
            line += (f", reward accuracy {b['reward_accuracy']:.2f} -> {a['reward_accuracy']:.2f}, "
                     f"reward margin {b['reward_margin']:+.2f} -> {a['reward_margin']:+.2f}")
        print(line + f"  ({r['steps']} steps, {r['train_time_s']:.0f} s training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
