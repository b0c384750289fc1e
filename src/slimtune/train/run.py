"""`slimtune train` as a function: set up, wrap with the adapter, train, plot, report."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .config import JobConfig
from .job import score_for_selection, setup, upcast_trainable
from .trainer import Trainer


def trainable_summary(model) -> tuple[int, int, float]:
    t, a = model.get_nb_trainable_parameters()
    return t, a, 100 * t / max(a, 1)


def run_train(cfg: JobConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    from .. import get_peft_model

    t_start = time.time()
    torch.manual_seed(cfg.train.seed)
    import random

    import numpy as np

    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    if not torch.cuda.is_available():  # before set-up: the GGUF conversion runs on CPU too
        from .resources import set_cpu_threads

        set_cpu_threads(cfg.train.cpu_threads, log)
    s = setup(cfg, log)
    data = s["data"]
    log(f"task: {s['task']}  data: {data.source} ({data.format}), {len(data.train)} train / {len(data.eval)} eval"
        + (f"; {data.stats['validation']}" if "validation" in data.stats else ""))
    if s["why"]:
        log(f"method {s['adapter_config'].method}: chose " + "; ".join(s["why"]))
    if s["adapter_config"].needs_scores():  # sparse fisher / top-k heads: choose from the data
        s["adapter_config"] = score_for_selection(s["adapter_config"], s["model"], data, cfg, s["tokenizer"], log)
    from ..quant import quantized_size

    qsize = quantized_size(s["model"])  # model.quantize: what quantizing saved, for the report
    torch.manual_seed(cfg.train.seed)  # adapter init independent of what set-up consumed
    model = get_peft_model(s["model"], s["adapter_config"])
    if upcast_trainable(model):
        log(f"precision: frozen base in {next(model.get_base_model().parameters()).dtype}, trained parameters "
            "in fp32, forward under autocast")
    t, a, pct = trainable_summary(model)
    log(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {pct:.4f}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    trainer = Trainer(cfg, model, s["tokenizer"], data, s["task"], log=log, progress=progress)
    res = trainer.train(resume=cfg.resume)
    if s["tokenizer"] is not None and trainer.is_main:
        s["tokenizer"].save_pretrained(out / "adapter")
    res.update(task=s["task"], trainable=t, total_params=a, trainable_pct=pct, total_wall_s=time.time() - t_start,
               why=s["why"], truncated=data.stats.get("truncated", 0), data=data.source,
               model_path=s["model_path"], method=s["adapter_config"].method,
               quantization=qsize.line() if qsize is not None else None)
    if trainer.is_main:
        plot(trainer.history, trainer.metric, out / "plot.png")
        write_report(cfg, res, out / "report.md")
        (out / "summary.json").write_text(json.dumps(res, indent=2, default=str))
        m = res["metric"]
        b = (res["before"] or {}).get(m)
        f = (res["after"] or {}).get(m)
        msg = f"held-out {m}: " + (f"{b:.4f} -> " if b is not None else "") + (f"{f:.4f}" if f is not None else "n/a")
        if res["best"] is not None:
            msg += f"  (best {res['best']:.4f} at step {res['best_step']})"
        log(msg)
        log(f"wrote {out}/adapter (last), {out}/best, {out}/report.md, {out}/plot.png, {out}/metrics.jsonl")
    res["trainer"] = trainer
    res["peft_model"] = model
    return res


def plot(history: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    mt = [(r["step"], r[metric]) for r in history if metric in r and metric != "eval_loss"]
    fig, axes = plt.subplots(1, 2 if mt else 1, figsize=(11 if mt else 6, 4), squeeze=False)
    ax = axes[0][0]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if mt:
        ax2 = axes[0][1]
        ax2.plot(*zip(*mt), "o-", color="C2")
        ax2.set_xlabel("step")
        ax2.set_ylabel(metric)
        ax2.set_title(f"held-out {metric}")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(cfg: JobConfig, res: dict[str, Any], path: Path) -> None:
    m = res["metric"]
    b, a = res["before"] or {}, res["after"] or {}
    lines = [
        f"# slimtune run: {cfg.output_dir}", "",
        f"- model: `{cfg.model_name()}` ({res['task']}), method `{res['method']}`",
        f"- {res['quantization']}" if res.get("quantization") else "",
        f"- data: {res['data']}, truncation cut {res['truncated']} examples",
        f"- trainable params: {res['trainable']:,d} of {res['total_params']:,d} ({res['trainable_pct']:.4f}%)",
        f"- steps: {res['steps']}" + (" (stopped early)" if res["stopped_early"] else ""),
        f"- wall time: {res['total_wall_s']:.1f} s total, {res['train_time_s']:.1f} s in training steps",
        f"- peak memory: {res['peak_mem_mb']:.0f} MB ({'GPU' if torch.cuda.is_available() else 'process RSS'})",
        f"- best {m}: {res['best']:.4f} at step {res['best_step']}" if res["best"] is not None else "",
        "", "## Held-out metrics: before -> after", "", "| metric | before | after |", "|---|---|---|",
    ]
    for k in sorted(set(b) | set(a)):
        fb = f"{b[k]:.4f}" if k in b else "-"
        fa = f"{a[k]:.4f}" if k in a else "-"
        lines.append(f"| {k}{' (selection metric)' if k == m else ''} | {fb} | {fa} |")
    if res["why"]:
        lines += ["", "## Choices made for you", ""] + [f"- {w}" for w in res["why"]]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False).rstrip(), "```", "",
              "![loss and metric](plot.png)", ""]
    path.write_text("\n".join(lines))
