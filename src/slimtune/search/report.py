"""What compare and search leave in their folder: Markdown tables, CSV, plots, and search's best.yaml.

    compare.md / compare.csv / compare.png   one row per method: trainable count, lr and how it was
                                             chosen, validation metric (selection), test metric
                                             (measured once), training time, step time, peak memory
    search.md / search.csv / plots/*.png     the trials, the best config (or the Pareto front) with its
                                             test numbers, history, importances, rung curves, front
    best.yaml                                the best trial's config: `slimtune train best.yaml` reruns it
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from ..train.config import saved_form
from . import prepare as P


def _f(v: Any, nd: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _load(t: tuple | None) -> str:
    return "n/a" if not t else f"{t[0]:.2f}, {t[1]:.2f}, {t[2]:.2f}"


def _command() -> str:
    import shlex

    return shlex.join(["slimtune"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("slimtune", "__main__.py")) \
        else "(called from Python)"


def _split_note(pf) -> str:
    d = pf.data
    return (f"{len(d.train)} train / {len(d.eval)} validation / {len(d.test)} test examples "
            f"({d.stats.get('test', 'test split')}; {d.stats.get('validation', '')})")


# ---- compare ------------------------------------------------------------------------------------

COMPARE_COLS = ["name", "label", "status", "trainable", "trainable_pct", "lr", "lr_source", "val_metric", "val_step",
                "test_metric", "test_eval_loss", "steps", "train_time_s", "step_time_s", "peak_mem_mb", "error",
                "seeds", "val_mean", "val_sd", "test_mean", "test_sd", "test_min", "test_max"]


def _spread(values: list) -> dict[str, Any]:
    import statistics

    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v), "max": max(v)}


def compare_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    pf = summary["pf"]
    rows = []
    for r in summary["rows"]:
        run, test = r.get("run") or {}, r.get("test") or {}
        rows.append({"name": r["name"], "label": r["label"], "status": r.get("status"), "trainable": run.get("trainable"),
                     "trainable_pct": run.get("trainable_pct"), "lr": r.get("lr"), "lr_source": r.get("lr_source"),
                     "val_metric": run.get("best"), "val_step": run.get("best_step"), "test_metric": test.get(pf.metric),
                     "test_eval_loss": test.get("eval_loss"), "steps": run.get("steps"),
                     "train_time_s": run.get("train_time_s"), "step_time_s": run.get("step_time_s"),
                     "peak_mem_mb": run.get("peak_mem_mb"), "error": r.get("error"), "probe": r.get("probe")})
        sr = r.get("seed_runs") or []
        if sr:
            vs, ts = _spread([x["val"] for x in sr]), _spread([(x["test"] or {}).get(pf.metric) for x in sr])
            rows[-1].update(seeds=len(sr), val_mean=vs["mean"], val_sd=vs["sd"], test_mean=ts["mean"], test_sd=ts["sd"],
                            test_min=ts["min"], test_max=ts["max"])
    ok = [x for x in rows if x["status"] == "ok" and x["test_metric"] is not None]
    ok.sort(key=lambda x: x["test_metric"], reverse=pf.metric_max)
    return ok + [x for x in rows if x not in ok]


def write_compare(summary: dict[str, Any], out: Path) -> None:
    pf, opts = summary["pf"], summary["opts"]
    rows = compare_rows(summary)
    m = pf.metric
    loss_col = m != "eval_loss"  # the test loss as its own column only when the metric is something else
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COMPARE_COLS + ["probe"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "probe": ";".join(f"{p['lr']:g}={_f(p.get('value'))}" for p in r["probe"] or [])})
    steps = (f"{opts.steps} steps (--steps)" if opts.steps else
             f"{opts.budget_min:g} min of training per method (--budget-minutes; steps from each method's step time on "
             f"the {P.clock_words(summary.get('clock') or 'wall', summary['threads'])}, --budget-clock)"
             if opts.budget_min else f"{pf.total_steps} steps (the config's schedule)")
    lines = [f"# slimtune compare: {summary['cfg'].model_name()}, {pf.data.source}", "",
             f"`{_command()}`", "",
             f"Every row: the same data and split ({_split_note(pf)}), {steps}, seed {summary['cfg'].train.seed}, "
             f"{summary['threads']} CPU thread(s); the best checkpoint by validation {m}.",
             f"**Held-out numbers are measured once, on the test split**, which no run, no lr probe and no checkpoint "
             f"choice saw; the lr probe ({summary['probe_steps']} steps per learning rate, half-decade grid) and the "
             "best checkpoint were chosen on validation.",
             f"Load average (1, 5, 15 min) at the start: {_load(summary['load_start'])}; at the end: "
             f"{_load(summary['load_end'])}; whole compare {summary['wall_s'] / 60:.1f} min.", "",
             f"| method | trainable | trainable % | lr (chosen by) | validation {m} (step) | **test {m}** "
             + ("| test eval_loss " if loss_col else "") + "| steps | training s | s/step | peak MB |",
             "|---|---|---|---|---|---|" + ("---|" if loss_col else "") + "---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | — | — | — | {r['status']}: {str(r['error'])[:160].replace('|', '/')} "
                         "| — | " + ("— | " if loss_col else "") + "— | — | — | — |")
            continue
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['trainable_pct']:.3f} | {r['lr']:.3g} ({r['lr_source']}) "
                     f"| {_f(r['val_metric'])} ({r['val_step']}) | **{_f(r['test_metric'])}** "
                     + (f"| {_f(r['test_eval_loss'])} " if loss_col else "")
                     + f"| {r['steps']} | {_f(r['train_time_s'], 0)} | {_f(r['step_time_s'], 2)} | {_f(r['peak_mem_mb'], 0)} |")
    seeded = [r for r in rows if r.get("seeds")]
    if seeded:
        lines += ["", f"Spread over training seeds (each row's chosen lr and steps trained again from step 0 under "
                  f"{seeded[0]['seeds']} seeds, same splits; every run measured once on the test split):", "",
                  f"| method | seeds | validation {m} mean ± sd | **test {m} mean ± sd** | test min – max |",
                  "|---|---|---|---|---|"]
        for r in seeded:
            lines.append(f"| {r['label']} | {r['seeds']} | {_f(r['val_mean'])} ± {_f(r['val_sd'])} | "
                         f"**{_f(r['test_mean'])} ± {_f(r['test_sd'])}** | {_f(r['test_min'])} – {_f(r['test_max'])} |")
    probes = [r for r in rows if r["probe"]]
    if probes:
        lines += ["", f"lr probe (validation {m} after {summary['probe_steps']} steps):", ""]
        for r in probes:
            ps = summary["probe_steps"]
            lines.append(f"- {r['name']}: " + ", ".join(
                f"{p['lr']:g}" + (f" at {p['steps']} steps" if p.get("steps", ps) != ps else "")
                + f" → {_f(p.get('value')) if p['status'] == 'ok' else p['status']}" for p in r["probe"])
                + ("; **could not separate the rates** on validation " + m + ", even with successive halving "
                   "(the better half continued to twice the steps): chosen by validation loss"
                   if any(p.get("undecided") for p in r["probe"]) else ""))
    lines += ["", "Peak memory is each method's process (its lr probe, run and nothing else): ru_maxrss on CPU, "
              "max allocated on GPU. Training s counts the optimizer steps only (evaluations and set-up are extra).",
              "", "![compare](compare.png)", ""]
    (out / "compare.md").write_text("\n".join(lines))
    _plot_compare(rows, m, out / "compare.png")


def _plot_compare(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["test_metric"] is not None]
    if not ok:
        return
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    for r in ok:
        ax[0].scatter(r["trainable"], r["test_metric"], color="C3" if r["name"] == "config" else "C0")
        ax[0].annotate(r["name"], (r["trainable"], r["test_metric"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax[1].scatter(r["train_time_s"], r["test_metric"], color="C3" if r["name"] == "config" else "C0")
        ax[1].annotate(r["name"], (r["train_time_s"], r["test_metric"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("trainable parameters (log)")
    ax[0].set_ylabel(f"test {metric}")
    ax[0].set_title(f"test {metric} vs trainable parameters")
    ax[1].set_xlabel("training time (s)")
    ax[1].set_ylabel(f"test {metric}")
    ax[1].set_title(f"test {metric} vs training time")
    names = [r["name"] for r in ok]
    ax[2].barh(names, [r["peak_mem_mb"] or 0 for r in ok], color="C2")
    ax[2].set_xlabel("peak memory (MB)")
    ax[2].set_title("peak memory per method")
    ax[2].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- search -------------------------------------------------------------------------------------

def trial_rows(study, metric: str) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        p = t.user_attrs.get("params") or {}
        res = t.user_attrs.get("result") or {}
        rows.append({"trial": t.number, "state": "skipped" if t.user_attrs.get("skipped") else t.state.name.lower(), "method": p.get("method"), "r": p.get("r"),
                     "alpha_over_r": p.get("alpha_over_r"), "targets": p.get("targets"),
                     "layers": p.get("layers") if not isinstance(p.get("layers"), list) else ",".join(map(str, p["layers"])),
                     "dropout": p.get("dropout"), "rslora": p.get("rslora"), "mlp_r_factor": p.get("mlp_r_factor"), "lr": p.get("lr"),
                     metric: t.values[0] if t.values else None, "best_step": res.get("best_step"),
                     "steps": res.get("steps"), "trainable_pct": res.get("trainable_pct", t.user_attrs.get("trainable_pct")),
                     "step_time_s": res.get("step_time_s"), "step_cpu_s": res.get("step_cpu_s"),
                     "budget_steps": (t.user_attrs.get("budget_plan") or {}).get("steps"),
                     "duration_s": t.duration.total_seconds() if t.duration else None,
                     "reason": t.user_attrs.get("reason") or t.user_attrs.get("interrupted") or ""})
    return rows


def write_search(s: dict[str, Any], out: Path) -> None:
    study, pf, best = s["study"], s["pf"], s["best"]
    m = pf.metric
    loss_col = m != "eval_loss"  # the test loss as its own column only when the metric is something else
    rows = trial_rows(study, m)
    cols = list(rows[0]) if rows else []
    with open(out / "search.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    states = {k: sum(1 for r in rows if r["state"] == k) for k in ("complete", "pruned", "fail", "skipped")}
    bc = s["best_config"]
    if bc is not None:
        header = (f"# slimtune search: {bc.model_name()}, {pf.data.source}\n# best trial {best.number} of {s.get('storage_shown') or str(out) + '/study.db'}: "
                  f"validation {m} {best.values[0]:.4f}; test {m} {_f((s['tests'].get(str(best.number)) or {}).get(m))} "
                  f"(measured once)\n#   slimtune train {out / 'best.yaml'}\n")
        (out / "best.yaml").write_text(header + yaml.safe_dump(saved_form(bc), sort_keys=False))
    sec = s["section"]
    base = s["base"]
    lines = [f"# slimtune search: {base.model_name()}, {pf.data.source}", "", f"`{_command()}`", "",
             f"Objective: validation {m} ({'higher' if pf.metric_max else 'lower'} is better)"
             + (f" and {'trainable %' if s['pareto_with'] == 'params' else 'step time'} (Pareto, no pruning: Optuna does "
                "not prune multi-objective studies)" if s["pareto"] else
                f"; pruner {sec.pruner} at evaluation rungs every "
                + (f"{s['every']} steps" if not s.get("budget") else f"{s['budget'].every_s:.0f} s of training (clock time, "
                   "the same for every trial)")
                + f" after {sec.warmup_trials} trials reached a rung (reduction factor {sec.reduction_factor})"),
             f"Space: {'; '.join(s['space'].describe())}" + (f"; trials above {sec.max_trainable_pct:g}% trainable are "
                                                             "skipped before training" if sec.max_trainable_pct else ""),
             f"Data: {_split_note(pf)}; " + (f"{pf.total_steps} steps a trial" if not s.get("budget") else
                                             _budget_words(s["budget"], s["threads"])) + f", seed {base.train.seed}, "
             f"{s['threads']} CPU thread(s). TPE sampler (multivariate), storage {s.get('storage_shown') or str(out) + '/study.db'}.",
             f"Trials: {len(rows)} ({states['complete']} complete, {states['pruned']} pruned, {states['fail']} failed"
             + (f", {states['skipped']} skipped above the trainable limit, not counted" if states["skipped"] else "")
             + f") of --trials {s['trials_target']}" + (f", --timeout {s['timeout_min']:g} min" if s["timeout_min"] else "")
             + f"; {s['elapsed_s'] / 60:.1f} min of trials over all sessions; this session stopped: {s['stop_why']}.",
             f"Load average (1, 5, 15 min) at the start of this session: {_load(s['load_start'])}; at the end: "
             f"{_load(s['load_end'])}.", "",
             "**Selection used only the validation split**: trial values and pruning are validation metrics. "
             "The test numbers below are measured once, on the test split, for the reported trial(s) only.", ""]
    if best is None:
        lines += ["## Best", "", "No trial finished: every one was pruned, skipped or failed (see the table).", ""]
    lines += [] if best is None else ["## Best" + (" (Pareto front, by validation metric)" if s["pareto"] else ""), "",
              f"| trial | settings | trainable % | validation {m} | **test {m}** |" + (" test eval_loss |" if loss_col else ""),
              "|---|---|---|---|---|" + ("---|" if loss_col else "")]
    for t in s["chosen"][:8]:
        te = s["tests"].get(str(t.number)) or {}
        res = t.user_attrs.get("result") or {}
        lines.append(f"| {t.number} | {_settings(t.user_attrs.get('params') or {})} | {_f(res.get('trainable_pct'), 3)} "
                     f"| {t.values[0]:.4f} | **{_f(te.get(m))}** |" + (f" {_f(te.get('eval_loss'))} |" if loss_col else ""))
    lines += _spread_lines(s, m)
    if best is not None:
        lines += ["", f"`best.yaml` (trial {best.number}) reruns it: `slimtune train {out / 'best.yaml'}` (method block: "
                  f"`{best.user_attrs.get('method_block')}`)."]
    lines += ["", "## Trials", "",
              f"| trial | state | settings | validation {m} | best step / steps trained (planned) | trainable % | s | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {r['state']} | {_settings(r)} | {_f(r[m])} | {_f(r['best_step'])} / "
                     f"{_f(r['steps'] or r['budget_steps'])}"
                     + (f" ({r['budget_steps']})" if r['budget_steps'] and r['steps'] and r['budget_steps'] != r['steps'] else "")
                     + " "
                     f"| {_f(r['trainable_pct'], 3)} | {_f(r['duration_s'], 0)} | {str(r['reason'])[:120].replace('|', '/')} |")
    plots = _plot_search(study, m, out / "plots", s["pareto"], s["pareto_with"])
    lines += [""] + [f"![{name}](plots/{name}.png)" for name in plots] + [""]
    (out / "search.md").write_text("\n".join(lines))


def _budget_words(budget, threads: int) -> str:
    return (f"**trials ranked at equal training time**: each trial trains {budget.seconds / 60:g} min "
            f"(--budget-minutes) at its own step time, so a slower config gets fewer steps (steps column); step "
            f"times on the {P.clock_words(budget.clock, threads)} (--budget-clock), from a 3-step timing run (steady steps) per "
            "structure")


def _spread_lines(s: dict[str, Any], m: str) -> list[str]:
    """How sure the best is (seeds.py): the top configs over training seeds, the pick's test per seed."""
    rows = s.get("spread") or []
    if not rows:
        return []
    study = s["study"]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    seeds = list(rows[0]["values"])
    out = ["", f"## How sure: the top {len(rows)} configs under {len(seeds)} training seeds "
               f"({', '.join(map(str, seeds))}; the same validation and test examples)", "",
           "The pick is the best mean validation value over the seeds (not the best single trial); the spread is "
           "the sample standard deviation and the range over seeds.", "",
           f"| trial | settings | validation {m} per seed | mean ± sd | min – max |", "|---|---|---|---|---|"]
    for r in rows:
        t = by_number.get(r["trial"])
        out.append(f"| {r['trial']} | {_settings((t.user_attrs.get('params') if t else None) or {})} | "
                   f"{' / '.join(f'{v:.4f}' for v in r['values'].values())} | {r['mean']:.4f} ± {r['std']:.4f} | "
                   f"{r['min']:.4f} – {r['max']:.4f} |")
    tests = s.get("seed_tests") or {}
    vals = [te.get(m) for te in tests.values() if te.get(m) is not None]
    if vals:
        import statistics

        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out += ["", f"**The pick (trial {rows[0]['trial']}) on the test split**, measured once per seed run after the "
                f"choice: {' / '.join(f'{v:.4f}' for v in vals)} (seeds {', '.join(tests)}); mean **{statistics.fmean(vals):.4f}"
                f" ± {sd:.4f}**, range {min(vals):.4f} – {max(vals):.4f}."]
    return out


def _settings(p: dict[str, Any]) -> str:
    if not p.get("method"):
        return "—"
    bits = [str(p["method"])]
    if p.get("r") is not None:
        bits.append(f"r={p['r']} α/r={p['alpha_over_r']:g}")
    if p.get("targets") is not None:
        layers = p["layers"] if isinstance(p["layers"], str) else ",".join(map(str, p["layers"]))
        bits.append(f"{p['targets']} layers={layers}")
    if p.get("dropout") is not None:
        bits.append(f"dropout={p['dropout']:g}")
    if p.get("rslora"):
        bits.append("rsLoRA")
    if p.get("mlp_r_factor") not in (None, 1.0):
        bits.append(f"MLP r×{p['mlp_r_factor']:g}")
    if p.get("lr") is not None:
        bits.append(f"lr={p['lr']:.2e}")
    return " ".join(bits)


def _plot_search(study, metric: str, folder: Path, pareto: bool, pareto_with: str) -> list[str]:
    """Optuna's matplotlib plots: history, importances, rung curves, Pareto front (what the trials allow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as vm
    from optuna.trial import TrialState

    folder.mkdir(parents=True, exist_ok=True)
    target = (lambda t: t.values[0]) if pareto else None
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {"history": lambda: vm.plot_optimization_history(study, target=target, target_name=metric)}
    if len(done) >= 2 and len({tuple(sorted(t.params.items())) for t in done}) >= 2:
        # fANOVA: how much of the metric's variance each parameter explains (direction-free, seeded)
        fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)
        plots["importances"] = lambda: vm.plot_param_importances(study, evaluator=fanova, target=target,
                                                                 target_name=metric)
    if not pareto:
        plots["rungs"] = lambda: vm.plot_intermediate_values(study)
    else:
        plots["pareto"] = lambda: vm.plot_pareto_front(study, target_names=[metric, "trainable %" if pareto_with ==
                                                                             "params" else "step time (s)"])
    made = []
    for name, fn in plots.items():
        with matplotlib.rc_context():  # Optuna's plots switch the global style to ggplot: put it back after
            try:
                ax = fn()
            except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few trials for this plot
                (folder / f"{name}.txt").write_text(f"not drawn: {e}\n")
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=110)
            plt.close(fig)
        made.append(name)
    return made
