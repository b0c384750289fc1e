"""KTO steps, the one-row layout (objectives/shared.py: each prompt once, its completion and the KL
term's mismatched completion beside it, one policy and one reference forward, the frozen blocks below
the first adapter once for both) vs TRL's padded layout (train.chunked_ce=off: a row per completion
and per KL completion, four forwards), on SmolLM2-135M-Instruct and the packaged default task made
unpaired (prompt = the plot-or-review question, completion = the right answer, desirable, or the
wrong one, undesirable). Each layout runs as its own `slimtune train` process, alternating, ROUNDS
times; it prints each run's s/step (the job's summary: its training steps only) and the median
ratio. From the repository root:

    flock /tmp/slimtune-bench.lock .venv/bin/python benchmarks/kto_fast_path.py [--rounds 2] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "kto_speed"


def write_rows(n: int = 160) -> Path:
    sys.path.insert(0, str(ROOT / "examples"))
    from dpo_plot_review import shorten

    from slimtune.train.datasets_offline import load_builtin

    rows, _, info = load_builtin("rotten_tomatoes_plot")
    answers = info["answers"]
    out = []
    for i, r in enumerate(shorten(r) for r in rows[:n]):
        good = i % 2 == 0
        wrong = next(a for a in answers if a != r["output"])
        out.append({"prompt": r["instruction"], "completion": r["output"] if good else wrong, "label": good})
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def run(layout: str, data: Path, steps: int, i: int) -> dict:
    out = OUT / f"{layout}-{i}"
    cmd = [sys.executable, "-m", "slimtune", "train", "model=smollm2-135m", "method=lora", f"data.train={data}",
           "data.max_length=128", "data.system_prompt=", "data.val_fraction=0.1", "train.objective=kto",
           f"train.max_steps={steps}", "train.batch_size=8", "train.lr=2e-3", "train.eval_before=false",
           f"train.eval_every={steps}", "eval.max_examples=8", "eval.generate=false", "eval.samples=0",
           f"output_dir={out}", "overwrite=true", "--no-progress"]
    if layout == "padded":
        cmd.append("train.chunked_ce=off")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{layout} run failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    line = next((x for x in (out / "train.log").read_text().splitlines() if "loss:" in x), "")
    return {"step_time_s": s["step_time_s"], "layout_log": line.strip()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    data = write_rows()
    times: dict[str, list[float]] = {"padded": [], "one_row": []}
    for i in range(a.rounds):
        for layout in ("padded", "one_row"):
            r = run(layout, data, a.steps, i)
            times[layout].append(r["step_time_s"])
            print(f"round {i + 1} {layout}: {r['step_time_s']:.3f} s/step   [{r['layout_log'][-140:]}]", flush=True)
    p, f = statistics.median(times["padded"]), statistics.median(times["one_row"])
    print(f"KTO, SmolLM2-135M, batch 8, {a.steps} steps x {a.rounds} rounds: padded {p:.3f} s/step, one-row "
          f"{f:.3f} s/step, speed-up {p / f:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
