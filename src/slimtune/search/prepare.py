"""What compare and search know before any run: the data with its three splits, the task and the
metrics it produces, the model's block structure, trainable counts of candidate configs, and (for a
time budget) how long one run takes. Plus the one measurement on the test split at the end.

Everything here reuses the job's own steps (`train.job`: model path, tokenizer, data preparation,
method choice, `apply_method`; `train.evaluate`: the metrics), so what is checked is exactly what a
run will do, and a mistake in the config or the data is one message before any run starts.
"""
from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..train.config import JobConfig
from ..train.data import Prepared
from ..train.evaluate import Evaluation
from ..train.lock import RunLock
from ..train.tasks import get_task
from ..train.objectives.hooks import ObjectiveSteps
from . import targets as T
from .space import SearchError

TEST_FRACTION = 0.1  # the test split compare / search carve when the config has none (capped at max_eval)


def derive(cfg: JobConfig, updates: dict[str, Any]) -> JobConfig:
    """cfg with nested updates (a `method` value replaces the method block whole), validated again."""
    d = cfg.model_dump()
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict) and k != "method":
            d[k] = {**d[k], **v}
        else:
            d[k] = copy.deepcopy(v)
    try:
        return JobConfig.model_validate(d)
    except Exception as e:  # pydantic's ValidationError: name what was derived
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            from ..train.config import explain

            raise SearchError(explain(e, "derived run config")) from None
        raise


def with_test_split(cfg: JobConfig, fraction: float | None, log: Callable[[str], None]) -> JobConfig:
    """The config with a held-out test split: its own data.test / test_fraction, else `fraction` of
    the data carved off before validation (capped at data.max_eval, so test and validation are alike)."""
    if cfg.data.test or cfg.data.test_fraction:
        return cfg
    f = TEST_FRACTION if fraction is None else fraction
    if f <= 0:
        raise SearchError("compare / search report their final numbers on a test split no run selected on; give "
                          "data.test (a file) or data.test_fraction, or a --test-fraction above 0")
    upd: dict[str, Any] = {"test_fraction": f}
    if cfg.data.max_test is None and cfg.data.max_eval:
        upd["max_test"] = cfg.data.max_eval
    log(f"test split: {f:g} of the data carved off before validation" +
        (f" (at most {upd['max_test']} examples, as data.max_eval)" if "max_test" in upd else "") +
        "; selection uses validation, the final numbers this test split")
    return derive(cfg, {"data": upd})


class _Metrics(ObjectiveSteps, Evaluation):
    """The trainer's metric rules without a model: which metrics this task, objective and data produce."""

    def __init__(self, cfg: JobConfig, data: Prepared, task: str, tok) -> None:
        self.cfg, self.data, self.task, self.tok, self.t = cfg, data, task, tok, cfg.train
        self._start_objective()  # preference / reward objectives: reward_accuracy, reward, ...


@dataclass
class Preflight:
    cfg: JobConfig  # the config with its test split
    task: str
    data: Prepared
    model_path: str | None
    num_labels: int | None
    metrics: list[str]  # what evaluation produces for this task and data
    metric: str  # the objective
    metric_max: bool
    blocks: T.Blocks | None
    n_train: int
    total_steps: int
    notes: list[str] = field(default_factory=list)

    def skeleton(self):
        """The run's model on the meta device (no weights): structure and parameter counts only."""
        return skeleton(self.cfg, self.model_path, self.task, self.num_labels)


def preflight(cfg: JobConfig, metric: str | None, log: Callable[[str], None] = print) -> Preflight:
    from ..train import models
    from ..train.checks import plan
    from ..train.data import prepare
    from ..train.job import resolve_task
    from ..train.tasks import task_for_model, torch_models

    if cfg.model_name() in torch_models():
        raise SearchError(f"compare / search run transformers models ({cfg.model_name()} is a CNN with no transformer "
                          "blocks to search over); use slimtune train for it")
    path = models.resolve(cfg.model_name(), log)
    own = get_task(cfg.task) if cfg.task != "auto" else task_for_model(cfg.model_name(), path)
    tok = (own or get_task("causal_lm")).load_processor(cfg, path)  # as the job: an image model's processor
    pre_task = cfg.task if cfg.task != "auto" else "auto"
    from ..train.objectives.hooks import prepare_data  # train.objective dpo / kto / grpo ...: TRL's formats

    data = prepare_data(cfg, tok, log) or prepare(cfg.data, tok, pre_task, cfg.train.seed, log)
    task = resolve_task(cfg, data.format, path)
    get_task(task).after_data(tok, data)
    if not data.test:
        raise SearchError(f"{data.source}: the test split is empty; raise data.test_fraction or give data.test")
    measured = _Metrics(cfg, data, task, tok).measured_metrics()
    chosen = metric or cfg.train.metric or _Metrics(cfg, data, task, tok)._default_metric()
    if chosen not in measured:
        raise SearchError(f"metric {chosen!r} is not produced by this task ({task}) and data: evaluation measures "
                          f"{', '.join(measured)}; choose one of them (--objective / search.metric / train.metric)")
    num_labels = cfg.num_labels or (len(data.labels) if data.labels else None)
    pf = Preflight(cfg, task, data, path, num_labels, measured, chosen,
                   not (chosen.endswith("loss") or chosen == "perplexity"), None, len(data.train),
                   plan(cfg.train, len(data.train)).total_steps)
    pf.blocks = T.find_blocks(pf.skeleton())
    log(f"data: {len(data.train)} train / {len(data.eval)} validation / {len(data.test)} test ({data.format}, {task}); "
        f"objective {chosen} ({'higher' if pf.metric_max else 'lower'} is better), {pf.total_steps} steps a run")
    return pf


def skeleton(cfg: JobConfig, path: str | None, task: str, num_labels: int | None):
    from transformers import AutoConfig

    from ..train.job import hf_quiet

    with hf_quiet():
        return get_task(task).skeleton(AutoConfig.from_pretrained(path), num_labels)


def count_trainable(pf: Preflight, cfg: JobConfig) -> tuple[int, int, float] | None:
    """(trainable, total, %) of cfg's method on the model, counted on a weightless copy by the job's own
    method choice and injection; None for methods that choose what trains from data (scored at run time)."""
    from ..train.job import apply_method, auto_method

    model = pf.skeleton()
    adapter_cfg, _ = auto_method(cfg, model, pf.task, pf.total_steps)
    if adapter_cfg.needs_scores():
        return None
    with torch.device("meta"):  # the adapter's own tensors on the meta device too: shapes only
        peft = apply_method(model, adapter_cfg)
    t, a = peft.get_nb_trainable_parameters()
    return t, a, 100 * t / max(a, 1)


# ---- runs ----------------------------------------------------------------------------------------

def quiet(_msg: str) -> None:
    """A run's own log lines go only to its train.log (compare and search print one line per step of theirs)."""


def run_once(cfg: JobConfig, on_evaluate=None, log: Callable[[str], None] = quiet) -> dict[str, Any]:
    """One job through `train.run.run_train`, reduced to what the tables need (JSON-safe)."""
    from ..train.run import run_train

    res = run_train(cfg, log=log, progress=False, on_evaluate=on_evaluate)
    return compact(res)


KEEP_KEYS = ("status", "steps", "total_steps", "best", "best_step", "metric", "before", "after", "trainable",
             "total_params", "trainable_pct", "train_time_s", "wall_s", "total_wall_s", "step_time_s",
             "tokens_per_s", "peak_mem_mb", "stop_reason", "method", "n_train", "n_eval", "warnings", "session_steps",
             "resumed_at", "step_cpu_s", "session_cpu_s", "first_step_s", "first_step_cpu_s", "session_train_s")


def compact(res: dict[str, Any]) -> dict[str, Any]:
    return {k: res.get(k) for k in KEEP_KEYS}


def strip_checkpoints(run_dir: Path) -> None:
    """A finished run keeps best/ and adapter/ (and its reports); its resumable checkpoints go."""
    import shutil

    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)


def measure_test(run_cfg: JobConfig, run_dir: Path) -> dict[str, float]:
    """The run's best adapter on the test split: the held-out number, measured once."""
    from .. import PeftModel
    from ..cli.common import adapter_folder
    from ..train.job import setup
    from ..train.trainer import Trainer

    adapter = adapter_folder(str(run_dir))
    s = setup(run_cfg, quiet)
    model = PeftModel.from_pretrained(s["model"], adapter, is_trainable=True)
    with tempfile.TemporaryDirectory(prefix="slimtune-test-") as tmp:
        tr = Trainer(run_cfg.model_copy(update={"output_dir": tmp}), model, s["tokenizer"], s["data"].held_out(),
                     s["task"], log=quiet, progress=False)
        res = tr.evaluate()
    res["n_test"] = len(s["data"].test)
    return res


CLOCKS = ("auto", "cpu", "wall")


def resolve_clock(clock: str) -> str:
    """The clock a training-time budget is counted on (`--budget-clock`): `cpu` (the process's CPU
    seconds per step over its threads, resources.cpu_step_clock: the same compute whatever else runs on
    the machine), `wall`, or `auto`: cpu when training runs on the CPU, wall on a GPU (whose work the
    CPU clock does not see). Why cpu by default on CPU: on a shared machine equal wall-clock budgets
    are not equal compute (issue 28: rows at load 14 got 13-17 steps, rows at load 3 got 40-56)."""
    if clock not in CLOCKS:
        raise SearchError(f"--budget-clock {clock!r}: choose {', '.join(CLOCKS)}")
    if clock == "auto":
        return "wall" if torch.cuda.is_available() else "cpu"
    if clock == "cpu" and torch.cuda.is_available():
        raise SearchError("--budget-clock cpu on a GPU: the GPU's work is not on the CPU clock, so a step would look "
                          "almost free; use --budget-clock wall (or auto)")
    return clock


def clock_step_s(res: dict[str, Any], clock: str) -> float | None:
    """A finished run's seconds per step on `clock` (this session's steps)."""
    return res.get("step_cpu_s") if clock == "cpu" else res.get("step_time_s")


def clock_words(clock: str, threads: int) -> str:
    """How a report names the budget's clock."""
    if clock == "cpu":
        return (f"CPU clock: the process's CPU seconds per training step / {threads} thread(s), the same compute "
                "whatever the machine's load (equals wall time on a quiet machine)")
    return "wall clock: seconds per training step as the machine ran them (depends on its load)"


@dataclass
class Timing:
    setup_s: float  # the whole short run minus its steps and its evaluation: load, data, set-up
    step_s: float  # wall seconds per step
    eval_s: float
    cpu_step_s: float = 0.0  # resources.cpu_step_clock seconds per step

    def budget_step_s(self, clock: str) -> float:
        """Seconds per step on the budget's clock (resolve_clock)."""
        return self.cpu_step_s if clock == "cpu" else self.step_s

    def run_s(self, steps: int, evals: int) -> float:
        return self.setup_s + steps * self.step_s + evals * self.eval_s


def time_run(cfg: JobConfig, out: Path, steps: int = 3) -> Timing:
    """A short run of cfg (3 steps and one evaluation) to see what a run costs here, now. Not a trial.

    The step times leave out the first step: it carries the warm-up (allocations, first kernels), which
    measured 1.8x the steady step on SmolLM2 (2.40 s of CPU over a 2-step timing against 1.34 s over
    the 37-step run, issue 28), and a budget's steps are the budget over the steady step."""
    import shutil

    c = derive(cfg, {"train": {"max_steps": steps, "eval_every": steps, "eval_before": False, "save_every": 10**6,
                               "warmup_steps": 0, "early_stopping_patience": None, "report_to": "none"},
                     "eval": {"samples": 0}, "output_dir": str(out), "overwrite": True, "resume": False})
    t0 = time.time()
    res = run_once(c)
    wall = time.time() - t0
    shutil.rmtree(out, ignore_errors=True)
    ev = max(0.0, (res["wall_s"] or 0) - (res["train_time_s"] or 0))  # the loop's time outside steps: the evaluation
    steady = steady_step_s(res)
    if steady is not None:
        step, cpu = steady
    else:
        n = res.get("session_steps") or res["steps"] or 1
        step, cpu = (res["train_time_s"] or 0) / max(n, 1), res.get("step_cpu_s") or 0.0
    return Timing(max(0.0, wall - (res["wall_s"] or 0)), step, ev, cpu)


def steady_step_s(res: dict[str, Any]) -> tuple[float, float] | None:
    """A run's (wall, cpu clock) seconds per step after this session's first step (its warm-up): what
    a training-time budget counts (train/clock_budget.py re-plans on it). None under 2 steps."""
    n = res.get("session_steps") or res.get("steps") or 0
    if n < 2 or res.get("first_step_s") is None:
        return None
    return (((res.get("session_train_s") or 0) - res["first_step_s"]) / (n - 1),
            ((res.get("session_cpu_s") or 0) - (res.get("first_step_cpu_s") or 0)) / (n - 1))


def evals_of(total_steps: int, eval_every: int | None, epoch_steps: int) -> int:
    every = eval_every or max(1, epoch_steps)
    return math.ceil(total_steps / every)


def check_budget(what: str, budget_s: float, need_s: float, how: str) -> None:
    if budget_s < need_s:
        raise SearchError(f"{what} of {budget_s / 60:.1f} min is too small for one run: {how} takes about "
                          f"{need_s / 60:.1f} min here (measured by a 3-step run just now); raise it, or shorten the runs "
                          "(train.max_steps, data.max_train)")


@contextlib.contextmanager
def owned_folder(out: Path):
    """compare's / search's output folder, created and locked (train/lock.py) for the whole command,
    so a second command on the same folder is refused instead of writing into it."""
    if out.exists() and not out.is_dir():
        raise SearchError(f"--out '{out}' is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    lock.acquire()
    try:
        yield out
    finally:
        lock.release()
