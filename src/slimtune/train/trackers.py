"""Where a run's metrics go besides metrics.jsonl: `train.report_to` (HF Trainer's names and meaning).

    tensorboard   OUTPUT_DIR/tensorboard (train/* and eval/* scalars)              the default
    mlflow        MLflow through its own client (MlflowClient): $MLFLOW_TRACKING_URI, else a SQLite store
                  next to the run (sqlite:///<parent of output_dir>/mlflow.db, artifacts in mlartifacts/);
                  experiment $MLFLOW_EXPERIMENT_NAME or "slimtune"
    wandb         Weights & Biases, offline unless $WANDB_MODE says otherwise (files in OUTPUT_DIR/wandb;
                  `wandb sync` uploads them later); project $WANDB_PROJECT or "slimtune"
    none          only metrics.jsonl / metrics.csv / plot.png
    all           every one of the above whose package is installed

Each gets the run's config as params, every logged record (loss, lr, eval metrics) at its step, and
at the end the adapter (best/ when there is one, else adapter/) and the report (report.md, plot.png,
summary.json) as artifacts. A resumed run continues the same MLflow / W&B run (ids kept in
OUTPUT_DIR/trackers.json). A tracker whose package is missing is a config error before training.

Inside `slimtune compare` / `slimtune search` each row's / trial's run joins the parent the command
opened (search/tracking.py, passed down in $SLIMTUNE_TRACKERS_PARENT so worker processes inherit it):
an MLflow child run (tag mlflow.parentRunId, in the parent's store and experiment) and a W&B run in
the command's group; $SLIMTUNE_TRACKERS_RUN_NAME names a compare row's run (its folder is ROW/main).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
IDS = "trackers.json"
PARENT_ENV = "SLIMTUNE_TRACKERS_PARENT"
NAME_ENV = "SLIMTUNE_TRACKERS_RUN_NAME"
TRAIN_KEYS = ("loss", "lr", "tokens_per_s", "grad_norm", "peak_mem_mb")


def names(value: Any) -> list[str]:
    """report_to as a list of tracker names ('all' = the installed ones, 'none' = none); raises ValueError."""
    items = [value] if isinstance(value, str) else list(value or [])
    bad = [x for x in items if x not in (*TRACKERS, "none", "all")]
    if bad:
        raise ValueError(f"unknown tracker {bad[0]!r}; choose from {', '.join([*TRACKERS, 'none', 'all'])}")
    if "all" in items:
        return [n for n in TRACKERS if importlib.util.find_spec(PACKAGES[n]) is not None]
    missing = [n for n in items if n in TRACKERS and importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        pkg = "mlflow-skinny" if missing[0] == "mlflow" else PACKAGES[missing[0]]
        raise ValueError(f"report_to {missing[0]!r} needs the {pkg} package: pip install 'slimtune[trackers]' "
                         f"(or remove {missing[0]} from train.report_to)")
    return [n for n in dict.fromkeys(items) if n in TRACKERS]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _numbers(rec: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def parent() -> dict[str, Any]:
    """The compare / search this run belongs to ({} for a run of its own): {"mlflow": {uri, experiment_id,
    run_id}, "wandb": {group, job_type}}."""
    try:
        d = json.loads(os.environ.get(PARENT_ENV) or "{}")
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def run_name(out: Path) -> str:
    return os.environ.get(NAME_ENV) or out.name


def mlflow_store(folder: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): $MLFLOW_TRACKING_URI (the server's or
    store's own artifact root), else a SQLite store in folder with artifacts in folder/mlartifacts."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    folder = folder.resolve()
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlartifacts").as_uri()


def mlflow_experiment(c: Any, location: str | None) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "slimtune")
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else c.create_experiment(name, artifact_location=location)


def _artifacts(out: Path) -> tuple[Path | None, list[Path]]:
    adapter = next((out / d for d in ("best", "adapter") if (out / d).is_dir()), None)
    return adapter, [out / f for f in ("report.md", "plot.png", "summary.json") if (out / f).is_file()]


class TensorBoard:
    def __init__(self, out: Path, params: dict[str, Any], step: int, ids: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)

    def log(self, rec: dict[str, Any]) -> None:
        for k, v in _numbers(rec).items():
            self.w.add_scalar(f"train/{k}" if k in TRAIN_KEYS else f"eval/{k}", v, rec["step"])

    def flush(self) -> None:
        self.w.flush()

    def finish(self, out: Path, ok: bool) -> None:
        self.w.close()


class MLflow:
    def __init__(self, out: Path, params: dict[str, Any], step: int, ids: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        up = parent().get("mlflow")
        if up:  # a compare row / search trial: a child run in its parent's store and experiment
            uri, exp_id = up["uri"], up["experiment_id"]
            self.c = MlflowClient(tracking_uri=uri)
        else:
            uri, location = mlflow_store(out.parent)
            self.c = MlflowClient(tracking_uri=uri)
            exp_id = mlflow_experiment(self.c, location)
        self.run_id = ids.get("mlflow") if step else None
        if self.run_id is None:
            tags = {"slimtune.output_dir": str(out.resolve())}
            if up:
                tags["mlflow.parentRunId"] = up["run_id"]  # what mlflow.start_run(nested=True) sets
            self.run_id = self.c.create_run(exp_id, run_name=run_name(out), tags=tags).info.run_id
            ps = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(ps), 100):  # MLflow takes at most 100 params per batch
                self.c.log_batch(self.run_id, params=ps[i:i + 100])
        else:
            self.c.update_run(self.run_id, status="RUNNING")
        ids["mlflow"] = self.run_id
        self.uri = uri

    def log(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.c.log_batch(self.run_id, metrics=[Metric(k, v, ts, int(rec["step"])) for k, v in _numbers(rec).items()])

    def flush(self) -> None:
        pass

    def finish(self, out: Path, ok: bool) -> None:
        adapter, files = _artifacts(out)
        if adapter is not None:
            self.c.log_artifacts(self.run_id, str(adapter), "adapter")
        for f in files:
            self.c.log_artifact(self.run_id, str(f), "report")
        self.c.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")


class WandB:
    def __init__(self, out: Path, params: dict[str, Any], step: int, ids: dict[str, Any]) -> None:
        import wandb

        rid = ids.get("wandb") if step else None
        up = parent().get("wandb") or {}  # a compare row / search trial: one run in the command's group
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "slimtune"), name=run_name(out), dir=str(out),
                              group=up.get("group"), job_type=up.get("job_type"),
                              mode=os.environ.get("WANDB_MODE", "offline"), config=params, id=rid,
                              resume="allow" if rid else None, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                                      disable_git=True, save_code=False))
        ids["wandb"] = self.run.id

    def log(self, rec: dict[str, Any]) -> None:
        self.run.log(_numbers(rec), step=int(rec["step"]))

    def flush(self) -> None:
        pass

    def finish(self, out: Path, ok: bool) -> None:
        import wandb

        adapter, files = _artifacts(out)
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", out.name) or "run"
        if adapter is not None:
            a = wandb.Artifact(f"{base}-adapter", type="model")
            a.add_dir(str(adapter))
            self.run.log_artifact(a)
        if files:
            r = wandb.Artifact(f"{base}-report", type="report")
            for f in files:
                r.add_file(str(f))
            self.run.log_artifact(r)
        self.run.finish(exit_code=0 if ok else 1)


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


class Trackers:
    """The run's trackers together; one failing is said once and dropped, never the run's end."""

    def __init__(self, items: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
        self.items, self.out, self.log_fn = items, out, log

    @classmethod
    def open(cls, report_to: Any, out: Path, params: dict[str, Any], step: int,
             log: Callable[[str], None], history: list[dict[str, Any]] = ()) -> "Trackers":
        """Each tracker's run: resumed where the folder's earlier session had one, else new. A new run
        that starts after step 0 (a run continued from a folder that reported nowhere, such as a
        compare row continuing its winning lr probe) gets the earlier steps' records (`history`)
        first, so the tracker holds the whole curve, as metrics.jsonl does."""
        ids = _read_ids(out) if step else {}
        had = set(ids) | ({"tensorboard"} if (out / "tensorboard").exists() else set())
        items: dict[str, Any] = {}
        flat = {k: v for k, v in _flat(params).items() if v is not None}
        for n in names(report_to):
            try:
                items[n] = TRACKERS[n](out, flat if n != "wandb" else params, step, ids)
                if step and n not in had:
                    for rec in history:
                        items[n].log(rec)
            except Exception as e:  # noqa: BLE001 - a tracker that cannot start does not stop the training
                log(f"{n} logging off ({type(e).__name__}: {e})")
                items.pop(n, None)
        if ids:
            (out / IDS).write_text(json.dumps(ids))
        t = cls(items, out, log)
        if items and set(items) != {"tensorboard"}:
            log("reporting to " + ", ".join(items) + (f" (MLflow store {items['mlflow'].uri})" if "mlflow" in items else ""))
        return t

    def _each(self, what: str, *args) -> None:
        for n, t in list(self.items.items()):
            try:
                getattr(t, what)(*args)
            except Exception as e:  # noqa: BLE001
                self.log_fn(f"{n} logging off ({type(e).__name__}: {e})")
                self.items.pop(n)

    def log(self, rec: dict[str, Any]) -> None:
        self._each("log", rec)

    def flush(self) -> None:
        self._each("flush")

    def finish(self, ok: bool) -> None:
        """The artifacts (after the report is written), then each run's end; only once."""
        self._each("finish", self.out, ok)
        self.items = {}


def _read_ids(out: Path) -> dict[str, Any]:
    try:
        d = json.loads((out / IDS).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}
