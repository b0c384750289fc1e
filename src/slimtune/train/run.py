"""`slimtune train` as a function: claim the folder, set up, check, wrap with the adapter, train,
report. The pipeline, each step its own module:

    rundir.claim (lock, resume / overwrite) -> job.setup (model, data, method) -> checks.preflight
    -> job.apply_method -> Trainer.train -> report.write_report / report.plot

Everything the run prints also goes to OUTPUT_DIR/train.log, and an unexpected error leaves its
traceback there (the CLI names the file). Ctrl-C / SIGTERM: the loop saves a checkpoint, the
report is written, then `TrainingInterrupted` says what was kept.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from . import rundir
from .checks import best_no_better, preflight
from .config import JobConfig
from .distributed import Dist
from .launch import QuietLog
from .launch import claim as claim_folder
from .interrupt import SetupSignals, TrainingInterrupted
from .job import apply_method, score_for_selection, setup, upcast_trainable
from .report import plot, title, write_report
from .tasks import get_task
from .trainer import Trainer, TrainingDiverged

__all__ = ["run_train", "plot", "write_report", "trainable_summary"]


def trainable_summary(model) -> tuple[int, int, float]:
    t, a = model.get_nb_trainable_parameters()
    return t, a, 100 * t / max(a, 1)


class RunLog:
    """A log function that also appends every line to the run's train.log."""

    def __init__(self, path: Path, echo: Callable[[str], None]) -> None:
        self.path, self.echo = path, echo
        self.f = open(path, "a", encoding="utf-8")
        self.f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} slimtune train into {path.parent}\n")
        self.f.flush()

    def __call__(self, msg: str) -> None:
        self.echo(msg)
        self.write(msg)

    def write(self, msg: str) -> None:
        if not self.f.closed:
            self.f.write(msg.rstrip("\n") + "\n")
            self.f.flush()

    def close(self) -> None:
        self.f.close()


def run_train(cfg: JobConfig, log: Callable[[str], None] = print, progress: bool = True,
              on_evaluate: Callable[[int, dict], str | None] | None = None) -> dict[str, Any]:
    """Run the job of `cfg`; `on_evaluate(step, metrics)` is the trainer's per-evaluation callback
    (a reason returned stops the run there: search's pruning)."""
    t_start = time.time()
    notes: list[str] = []
    dist = Dist.from_env(cfg.train)  # torchrun / accelerate launch: this process's rank (distributed.py)
    dist.start(cfg.train.cpu_threads)
    with SetupSignals() as sig, claim_folder(cfg, notes.append, dist) as claim:
        runlog = RunLog(claim.out / "train.log", log) if dist.is_main else QuietLog()  # rank 0 logs
        try:
            for n in notes:
                runlog(n)
            return _run(cfg, claim, runlog, progress and dist.is_main, t_start, dist, on_evaluate)
        except TrainingInterrupted as e:
            runlog.write(f"stopped: {e}")
            raise
        except KeyboardInterrupt:  # during set-up, or a second Ctrl-C in the loop
            what = "SIGTERM" if sig.signum else "Ctrl-C"
            ck = rundir.checkpoints(claim.out)
            if ck:
                msg = (f"interrupted ({what}) at once: the last checkpoint {ck[-1]} is kept, the steps after it are "
                       f"lost; `slimtune train {claim.out} --resume` continues")
            elif _started(claim.out):
                msg = (f"interrupted ({what}) at once, before the first checkpoint: the steps trained so far are lost; "
                       "run the command again (train.save_every sets how often checkpoints are written)")
            else:
                msg = (f"interrupted ({what}) before training started: nothing was trained, nothing needs keeping; "
                       "run the command again to start")
            runlog.write(f"stopped: {msg}")
            raise TrainingInterrupted(msg, sig.signum or 2) from None
        except TrainingDiverged as e:  # says itself what it kept
            runlog.write(f"stopped: {e}")
            raise
        except Exception as e:
            lost = dist.explain(e, claim.out)  # a peer died or hung: one message, the checkpoint it kept
            if lost is not None:
                dist.hold_signals()
            runlog.write("error: " + "".join(traceback.format_exception(e)))
            if lost is not None:
                runlog.write(f"stopped: {lost}")
                raise lost from None
            e.slimtune_log = str(runlog.path)  # the CLI says where the traceback is
            raise
        finally:
            runlog.close()


def _run(cfg: JobConfig, claim: rundir.Claim, log: RunLog, progress: bool, t_start: float,
         dist: Dist | None = None, on_evaluate: Callable[[int, dict], str | None] | None = None) -> dict[str, Any]:
    import random

    import numpy as np

    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    out = claim.out
    if not torch.cuda.is_available():  # before set-up: the GGUF conversion runs on CPU too
        from .resources import set_cpu_threads

        set_cpu_threads(cfg.train.cpu_threads, log)
    s = setup(cfg, log)
    data = s["data"]
    log(f"task: {s['task']}  data: {data.source} ({data.format}), {len(data.train)} train / {len(data.eval)} validation"
        + (f"; {data.stats['validation']}" if "validation" in data.stats else ""))
    head = get_task(s["task"]).describe(data)
    if head:
        log(head)
    if s["why"]:
        log(f"method {s['adapter_config'].method}: chose " + "; ".join(s["why"]))
    if s["adapter_config"].needs_scores():  # sparse fisher / top-k heads: choose from the data
        s["adapter_config"] = score_for_selection(s["adapter_config"], s["model"], data, cfg, s["tokenizer"], log)
    from ..quant import quantized_size

    qsize = quantized_size(s["model"])  # model.quantize: what quantizing saved, for the report
    torch.manual_seed(cfg.train.seed)  # adapter init independent of what set-up consumed
    model = apply_method(s["model"], s["adapter_config"])
    if upcast_trainable(model):
        log(f"precision: frozen base in {next(model.get_base_model().parameters()).dtype}, trained parameters "
            "in fp32, forward under autocast")
    t, a, pct = trainable_summary(model)
    log(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {pct:.4f}")
    dist = dist or Dist.from_env(cfg.train)
    dist.resume_batch(cfg.train, claim.resume_from)  # another world size than the checkpoint's: same global batch
    if dist.note:
        log(dist.note)
    trainer = Trainer(cfg, model, s["tokenizer"], data, s["task"], log=log, progress=progress, session_t0=t_start,
                      dist=dist, on_evaluate=on_evaluate)
    if dist.world > 1:
        log(f"distributed: {dist.label()}, batch {trainer.t.batch_size} per process x {dist.world} = "
            f"{trainer.global_bs} per micro-batch; parameters held per process {dist.held_mb(trainer.model_unwrapped):.1f} MiB")
    warnings = preflight(cfg, data, trainer.schedule, trainer.metric, s["task"])
    for w in warnings:
        log(f"warning: {w}")
    if claim.init_from is not None:  # --resume-weights-only: the weights must fit before the old run moves
        trainer.load_weights(claim.init_from)
        dist.barrier()  # every rank has read the weights before rank 0 moves the old run aside
        moved = claim.commit()
        if moved:
            log(moved)
        log(f"trained weights from {claim.init_from}; optimizer, schedule and step count start fresh")
    if trainer.is_main:
        rundir.write_config(cfg, out / "config.yaml")
    info = dict(task=s["task"], trainable=t, total_params=a, trainable_pct=pct, why=s["why"],
                quantization=qsize.line() if qsize is not None else None,
                truncated=data.stats.get("truncated", 0), data=data.source, format=data.format,
                n_train=len(data.train), n_eval=len(data.eval), model_path=s["model_path"],
                method=s["adapter_config"].method, warnings=list(warnings), labels=data.labels,
                data_stats={k: v for k, v in data.stats.items() if k != "lengths"},
                world_size=dist.world, distributed=dist.mode, global_batch=trainer.global_bs,
                params_mb_per_process=dist.held_mb(trainer.model_unwrapped))
    try:
        res = trainer.train(claim.resume_from)
    except TrainingDiverged as e:
        res = getattr(e, "result", None)
        if res is not None and trainer.is_main:
            res.update(info, total_wall_s=time.time() - t_start, error=str(e))
            _write(cfg, trainer, res, out)
        _end_trackers(trainer, False)
        raise
    except BaseException:
        _end_trackers(trainer, False)
        raise
    if s["tokenizer"] is not None and trainer.is_main and res["status"] != "interrupted":
        s["tokenizer"].save_pretrained(out / "adapter")
    res.update(info, total_wall_s=time.time() - t_start)
    late = best_no_better(trainer.metric, trainer.metric_max, res["before"], res["best"], res["best_step"])
    if late:
        res["warnings"].append(late)
        log(f"warning: {late}")
    if trainer.is_main:
        _write(cfg, trainer, res, out)
        _end_trackers(trainer, res["status"] != "interrupted")  # after the report: it goes as an artifact
        m = res["metric"]
        b = (res["before"] or {}).get(m)
        f = (res["after"] or {}).get(m)
        msg = f"held-out {m}: " + (f"{b:.4f} -> " if b is not None else "") + (f"{f:.4f}" if f is not None else "n/a")
        if res["best"] is not None:
            msg += f"  (best {res['best']:.4f} at step {res['best_step']})"
        log(msg)
        if res["status"] != "interrupted":
            log(f"wrote {out}/adapter (last), {out}/best, {out}/report.md, {out}/plot.png, {out}/metrics.jsonl")
    dist.barrier()  # the other ranks stay until rank 0 has written: none exits (or fails) while it writes
    if res["status"] == "interrupted":
        signum = trainer.stop.signum if trainer.stop and trainer.stop.signum else 2
        if res["steps"] and res.get("last_checkpoint"):
            raise TrainingInterrupted(f"interrupted ({res['signal']}) at step {res['steps']} of {res['total_steps']}: "
                                      f"checkpoint {res['last_checkpoint']} and {out}/report.md written; "
                                      f"`slimtune train {out} --resume` continues", signum)
        raise TrainingInterrupted(f"interrupted ({res['signal']}) before the first training step: nothing to resume; "
                                  "run the command again to start", signum)
    res["trainer"] = trainer
    res["peft_model"] = model
    return res


def _end_trackers(trainer: Trainer, ok: bool) -> None:
    if trainer.trackers is not None:
        trainer.trackers.finish(ok)


def _started(out: Path) -> bool:
    """Whether this run has begun training (its config.yaml is written just before the loop)."""
    return (out / "config.yaml").is_file()


def _write(cfg: JobConfig, trainer: Trainer, res: dict[str, Any], out: Path) -> None:
    plot(trainer.history, trainer.metric, out / "plot.png", res, title(cfg, res))
    write_report(cfg, res, out / "report.md", trainer.history)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps({k: v for k, v in res.items() if k != "lr_curve"}, indent=2, default=str))
    tmp.replace(out / "summary.json")
