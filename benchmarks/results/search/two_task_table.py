"""The two-task table from run_two_task.sh's output: python two_task_table.py OUT (markdown on stdout).

Per task: the hand-set config row (OUT/TASK/compare), full fine-tuning (OUT/TASK/compare-full) and the
search's pick (OUT/TASK/search/study.db), each with steps in the budget, clock seconds per step,
validation and test per training seed, mean and sd. Every number is read from the runs' own files.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

TASKS = [("minilm_rt", "accuracy"), ("smollm2_chatterbot", "eval_loss")]


def ms(vals: list[float]) -> str:
    if not vals:
        return "—"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.3f} ± {sd:.3f}"


def steady(res: dict) -> float | None:
    """A run's CPU seconds per step after its first (the warm-up): what its budget counted."""
    from slimtune.search.prepare import steady_step_s

    s = steady_step_s(res)
    return res.get("step_cpu_s") if s is None else s[1]


def compare_row(path: Path, metric: str) -> dict | None:
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    if r.get("status") != "ok":
        return {"label": r.get("label"), "status": r.get("status"), "error": r.get("error")}
    seeds = r.get("seed_runs") or [{"seed": r["spec"]["config"]["train"]["seed"], "val": r["run"]["best"],
                                    "test": r["test"]}]
    return {"label": r["label"], "pct": r["run"]["trainable_pct"], "lr": r["lr"], "lr_source": r["lr_source"],
            "steps": r.get("budget_steps"), "step_s": r.get("budget_step_s"), "wall_step_s": r.get("budget_wall_step_s"),
            "run_step_s": steady(r["run"]), "trained": r["run"].get("steps"),
            "val": [s["val"] for s in seeds], "test": [s["test"][metric] for s in seeds], "seeds": [s["seed"] for s in seeds],
            "probe": r.get("probe")}


def search_pick(db: Path, metric: str) -> dict | None:
    import optuna

    if not db.is_file():
        return None
    st = optuna.load_study(study_name="slimtune-search", storage=f"sqlite:///{db}")
    tests = st.user_attrs.get("seed_tests") or {}
    if not tests:
        return None
    num = next(iter(tests))
    t = next(x for x in st.trials if str(x.number) == num)
    seeds = (st.user_attrs.get("seeds") or {}).get(num, {})
    order = sorted(tests[num], key=int)
    plan = t.user_attrs.get("budget_plan") or {}
    res = t.user_attrs.get("result") or {}
    states = [x.state.name.lower() if not x.user_attrs.get("skipped") else "skipped" for x in st.trials]
    return {"label": f"trial {t.number}: {t.user_attrs.get('method_block')}", "params": t.params,
            "pct": res.get("trainable_pct"), "lr": t.params.get("lr"), "steps": plan.get("steps"),
            "step_s": plan.get("step_s"), "run_step_s": steady(res), "trained": res.get("steps"), "val": [seeds[s] for s in order if s in seeds],
            "test": [tests[num][s][metric] for s in order], "seeds": [int(s) for s in order],
            "trials": {k: states.count(k) for k in sorted(set(states))}}


def main(out: str) -> None:
    for task, metric in TASKS:
        o = Path(out) / task
        rows = [("hand-set config", compare_row(o / "compare" / "runs" / "config" / "result.json", metric)),
                ("full fine-tuning", compare_row(o / "compare-full" / "runs" / "full" / "result.json", metric)),
                ("search's pick", search_pick(o / "search" / "study.db", metric))]
        print(f"\n### {task} ({metric})\n")
        print("| row | trainable % | lr | steps trained (first guess at s/step) | steady CPU s/step in the run (CPU s) "
              "| validation, mean ± sd | **test, mean ± sd** | test per seed |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in rows:
            if r is None or "test" not in r:
                print(f"| {name} | — | — | — | — | — | — | {r and r.get('status')}: {r and r.get('error')} |")
                continue
            per = " / ".join(f"{v:.3f}" for v in r["test"]) + f" (seeds {', '.join(map(str, r['seeds']))})"
            step = f"{r['trained']} ({r['steps']} at {r['step_s']:.2f})" if r.get("steps") else "—"
            run = (f"{r['run_step_s']:.2f} ({r['run_step_s'] * r['trained']:.0f} s)" if r.get("run_step_s") and r.get("trained")
                   else "—")
            print(f"| {name} | {r['pct']:.3f} | {r['lr']:.3g} | {step} | {run} | {ms(r['val'])} | **{ms(r['test'])}** | {per} |")
        for name, r in rows:
            if r:
                extra = {k: r[k] for k in ("label", "probe", "trials", "wall_step_s") if r.get(k) is not None}
                print(f"\n- {name}: {json.dumps(extra, default=str)[:600]}")


if __name__ == "__main__":
    main(sys.argv[1])
