"""What a run leaves for a person to read: report.md and plot.png (and summary.json, by run.py).

The report says how the run ended (finished, stopped early, interrupted, diverged) before anything
else, then the data sizes, speed (time per step, tokens/s), honest wall times over every session of
a resumed run, the warnings raised before and after training, held-out metrics before -> after, and
for LM runs a few generations before -> after. The plot has a title, the loss curves, the learning
rate, and marks at the best step and at each resume.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from .config import JobConfig, saved_form


def title(cfg: JobConfig, res: dict[str, Any]) -> str:
    return f"{Path(cfg.output_dir).name}: {cfg.model_name()} + {res.get('method', cfg.method_name())} on {res.get('data', '?')}"


def plot(history: list[dict], metric: str, path: Path, res: dict[str, Any] | None = None, name: str = "") -> None:
    import matplotlib.pyplot as plt

    fig = figure(history, metric, res, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(history: list[dict], metric: str, res: dict[str, Any] | None = None, name: str = ""):
    """Loss curves and the learning rate (left), the held-out metric (right), marks at the best
    step and at each resume, the run's title on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = res or {}
    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    lr = [tuple(x) for x in res.get("lr_curve") or []] or [(r["step"], r["lr"]) for r in history if "lr" in r]
    ev = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    mt = [(r["step"], r[metric]) for r in history if metric in r and metric != "eval_loss"]
    pref = _objective_series(history)
    n = 1 + bool(mt) + bool(pref)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n + 1, 4.2), squeeze=False)
    ax = axes[0][0]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax_lr = ax.twinx()
        (h,) = ax_lr.plot(*zip(*lr), "--", color="0.55", linewidth=1, label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        handles.append(h)
        labels.append("learning rate")
    panels = [ax] + ([axes[0][1]] if mt else [])
    if pref:
        panels.append(_objective_panel(axes[0][n - 1], pref))
    if mt:
        ax2 = axes[0][1]
        ax2.plot(*zip(*mt), "o-", color="C2")
        ax2.set_xlabel("step")
        ax2.set_ylabel(metric)
        ax2.set_title(f"held-out {metric}")
        ax2.grid(alpha=0.3)
    for i, a in enumerate(panels):
        if res.get("best_step") is not None:
            h = a.axvline(res["best_step"], color="C2", linestyle=":", linewidth=1.5, label=f"best (step {res['best_step']})")
            if i == 0:
                handles.append(h)
                labels.append(f"best (step {res['best_step']})")
        for j, s in enumerate(res.get("resume_steps") or []):
            h = a.axvline(s, color="C3", linestyle="--", linewidth=1, label="resumed")
            if i == 0 and j == 0:
                handles.append(h)
                labels.append("resumed")
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    fig.suptitle(name or "slimtune run", fontsize=10)
    fig.tight_layout()
    return fig


# What a preference / reward objective logs (objectives/): (left-axis keys, right-axis keys, title)
OBJECTIVE_PANELS = [(("reward_margin",), ("reward_accuracy",), "reward margin and accuracy"),
                    (("reward",), ("kl",), "mean reward and KL")]


def _objective_series(history: list[dict]) -> dict[str, Any] | None:
    """The training (logged per step, `train_` keys) and held-out series of the objective's
    statistics over steps, or None for a run that logs none (sft)."""
    for left, right, name in OBJECTIVE_PANELS:
        keys = left + right
        if not any(f"train_{k}" in r for r in history for k in keys):
            continue
        series = {}
        for k in keys:
            series[f"train {k}"] = [(r["step"], r[f"train_{k}"]) for r in history if f"train_{k}" in r]
            series[f"held-out {k}"] = [(r["step"], r[k]) for r in history if k in r and "loss" not in r]
        return {"left": left, "right": right, "title": name, "series": {k: v for k, v in series.items() if v}}
    return None


def _series(axis, pref: dict[str, Any], side: str, colour0: int, held_style: str) -> list:
    """One axis's curves: each key of pref[side] as a training line and a held-out line in one colour."""
    handles = []
    for i, k in enumerate(pref[side]):
        for style, split in (("-", "train"), (held_style, "held-out")):
            pts = pref["series"].get(f"{split} {k}")
            if pts:
                handles += axis.plot(*zip(*pts), style, color=f"C{colour0 + i}", alpha=0.6 if split == "train" else 1.0,
                                     label=f"{split} {k}")
    return handles


def _objective_panel(ax, pref: dict[str, Any]):
    """Margin / reward (left axis) and accuracy / KL (right axis) over steps, training and held out."""
    ax_r = ax.twinx()
    handles = _series(ax, pref, "left", 0, "o-") + _series(ax_r, pref, "right", 3, "s--")
    ax.set_xlabel("step")
    ax.set_ylabel(" / ".join(pref["left"]))
    ax.grid(alpha=0.3)
    ax_r.set_ylabel(" / ".join(pref["right"]))
    ax.set_title(pref["title"])
    ax.legend(handles=handles, fontsize=7, loc="best")
    return ax


def objective_table(history: list[dict]) -> list[str]:
    """The report's table of the objective's statistics at each evaluation (training values: the
    mean since the last log line), so margins and accuracy over steps read without the plot."""
    pref = _objective_series(history)
    if pref is None:
        return []
    keys = pref["left"] + pref["right"]
    tr = {r["step"]: r for r in history if any(f"train_{k}" in r for k in keys)}
    ev = {r["step"]: r for r in history if any(k in r for k in keys) and "loss" not in r}
    cols = [f"train {k}" for k in keys] + [f"held-out {k}" for k in keys]
    lines = ["", f"## {pref['title'][0].upper() + pref['title'][1:]} over steps", "", "| step | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for s in sorted(ev):
        cells = [f"{tr[s]['train_' + k]:.4f}" if s in tr and f"train_{k}" in tr[s] else "-" for k in keys]
        cells += [f"{ev[s][k]:.4f}" if k in ev[s] else "-" for k in keys]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def _status(cfg: JobConfig, res: dict[str, Any]) -> str:
    st, out = res.get("status", "finished"), cfg.output_dir
    steps = f"{res['steps']} of {res.get('total_steps', res['steps'])} steps"
    if st == "interrupted":
        if not res["steps"] or not res.get("last_checkpoint"):
            return (f"**Interrupted** ({res.get('signal') or 'Ctrl-C'}) before the first training step: nothing to "
                    "resume; run the command again to start.")
        return (f"**Interrupted** ({res.get('signal') or 'Ctrl-C'}) at step {steps}: checkpoint "
                f"`{res['last_checkpoint']}` written; `slimtune train {out} --resume` continues.")
    if st == "diverged":
        return f"**Diverged**: {res.get('error', 'the loss became NaN/Inf')}"
    if st == "stopped early":
        return f"**Stopped early** at {steps} (early stopping: no improvement for {cfg.train.early_stopping_patience} evals)."
    return f"**Finished**: {steps}."


def _times(res: dict[str, Any]) -> list[str]:
    lines = []
    if res.get("step_time_s"):
        lines.append(f"- speed: {res['step_time_s']:.3f} s per step this session"
                     + (f", {res['tokens_per_s']:,.0f} tokens/s over the run's training steps" if res.get("tokens_per_s") else ""))
    here = res.get("total_wall_s", 0.0)
    sess = res.get("sessions") or []
    if len(sess) > 1 or res.get("resumed_at"):
        whole = res.get("elapsed_before_s", 0.0) + here
        lines.append(f"- wall time: {here:.1f} s this session (set-up, evaluation, training), {whole:.1f} s over the "
                     f"run's {len(sess)} sessions (earlier ones counted up to their last checkpoint); training steps "
                     f"took {res['train_time_s']:.1f} s of the run ({res.get('session_train_s', 0.0):.1f} s this session)")
        lost = res.get("lost_steps") or 0
        lines.append(f"- resumed at step {res['resumed_at']} from its checkpoint"
                     + (f"; {lost} step(s) the earlier session ran after that checkpoint were lost and run again" if lost else ""))
    else:
        lines.append(f"- wall time: {here:.1f} s total (set-up, evaluation, training), {res['train_time_s']:.1f} s of "
                     "it in training steps")
    return lines


def _cell(s: Any, n: int = 80, tail: bool = False) -> str:
    """One table cell: whitespace folded, cut to n characters (its end kept for a prompt's question)."""
    s = " ".join(str(s).split())
    if len(s) > n:
        s = "…" + s[-(n - 1):] if tail else s[:n - 1] + "…"
    return s.replace("|", "\\|") or "(empty)"


def write_report(cfg: JobConfig, res: dict[str, Any], path: Path, history: list[dict] | None = None) -> None:
    m = res["metric"]
    b, a = res.get("before") or {}, res.get("after") or {}
    st = res.get("data_stats", {})
    data_line = (f"- data: {res['data']} ({res.get('format', '?')}): {res.get('n_train', '?')} train / "
                 f"{res.get('n_eval', '?')} validation examples" + (f"; {st['validation']}" if st.get("validation") else "")
                 + f"; truncation to {cfg.data.max_length} tokens cut {res.get('truncated', 0)}")
    lines = [
        f"# {title(cfg, res)}", "", _status(cfg, res), "",
        f"- model: `{cfg.model_name()}` ({res['task']}), method `{res['method']}`",
        *([f"- {res['quantization']}"] if res.get("quantization") else []),
        data_line,
        f"- trainable params: {res['trainable']:,d} of {res['total_params']:,d} ({res['trainable_pct']:.4f}%)",
        f"- steps: {res['steps']} of {res.get('total_steps', res['steps'])} (warm-up {res.get('warmup_steps', 0)}), batch "
        f"{cfg.train.batch_size} x {cfg.train.grad_accum} accumulation",
        *_times(res),
        f"- peak memory: {res['peak_mem_mb']:.0f} MB ({'GPU' if torch.cuda.is_available() else 'process RSS'})"
        + (" of rank 0" if res.get("world_size", 1) > 1 else ""),
        _world(res),
    ]
    if res.get("best") is not None:
        lines.append(f"- best {m}: {res['best']:.4f} at step {res['best_step']} (in best/)")
    if res.get("method_report"):  # e.g. AdaLoRA's final ranks
        lines += ["", f"## {res['method_report']['title']}", ""] + [f"- {x}" for x in res["method_report"]["lines"]]
    if res.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in res["warnings"]]
    lines += ["", "## Held-out metrics: before -> after", "", "| metric | before | after |", "|---|---|---|"]
    for k in sorted(set(b) | set(a)):
        fb = f"{b[k]:.4f}" if k in b else "-"
        fa = f"{a[k]:.4f}" if k in a else "-"
        lines.append(f"| {k}{' (selection metric)' if k == m else ''} | {fb} | {fa} |")
    lines += objective_table(history or [])
    sb, sa = res.get("samples_before") or [], res.get("samples_after") or []
    if sb:
        lines += ["", "## Generations: before -> after training", "",
                  "| prompt (end) | reference | before | after |", "|---|---|---|---|"]
        for i, s in enumerate(sb):
            after = sa[i]["generated"] if i < len(sa) else "(not trained to the end)"
            lines.append(f"| {_cell(s['prompt'], tail=True)} | {_cell(s['reference'], 40)} | {_cell(s['generated'], 60)} | "
                         f"{_cell(after, 60)} |")
    if res.get("why"):
        lines += ["", "## Choices made for you", ""] + [f"- {w}" for w in res["why"]]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(saved_form(cfg), sort_keys=False).rstrip(), "```", "",
              "![loss, learning rate and metric](plot.png)", ""]
    path.write_text("\n".join(lines))


def _world(res: dict[str, Any]) -> str:
    """The processes the run trained with (torchrun / accelerate launch: docs/distributed.md)."""
    w = res.get("world_size", 1)
    if w <= 1:
        return "- processes: 1"
    held = res.get("params_mb_per_process")
    return (f"- processes: {w} ({str(res.get('distributed', 'ddp')).upper()}), global batch "
            f"{res.get('global_batch', '?')} per micro-batch" + (f", parameters held per process {held:.1f} MiB"
                                                                  if held is not None else ""))
