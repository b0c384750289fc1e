"""`slimtune compare` / `slimtune search` on the trackers of `train.report_to`: one run per row / trial,
held together the way each tracker groups a sweep.

    MLflow  a parent run for the command (run name OUT's name, tag slimtune.kind compare|search, the
            base config as params; at the end its report, tables and plots as artifacts) and each
            row's / trial's run a child of it: the `mlflow.parentRunId` tag, what
            `mlflow.start_run(nested=True)` sets and what HF Trainer's MLflowCallback and Optuna's
            MLflowCallback(nest_trials=True) use; MLflow's UI shows the tree. Store: $MLFLOW_TRACKING_URI,
            else OUT/mlflow.db (SQLite) with artifacts in OUT/mlartifacts.
    W&B     W&B has no parent runs: each row's / trial's run joins one group (`wandb.init(group=...)`,
            job_type compare|search), W&B's grouping for the runs of a sweep.

The rows' runs learn their parent through $SLIMTUNE_TRACKERS_PARENT (train/trackers.py reads it), so
compare's worker processes and search's pool workers, started inside this context, inherit it. A
compare or search run again in the same OUT continues the same parent and group (ids in
OUT/trackers.json); a tracker that cannot start is said once and the rows log on their own.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from ..train import trackers as T

REPORTS = ("compare.md", "compare.csv", "compare.png", "search.md", "search.csv", "best.yaml")


class _MlflowParent:
    def __init__(self, out: Path, kind: str, params: dict[str, Any], ids: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri, location = T.mlflow_store(out)
        self.c = MlflowClient(tracking_uri=uri)
        exp_id = T.mlflow_experiment(self.c, location)
        self.run_id = ids.get("mlflow_parent")
        if self.run_id is not None:
            try:
                self.c.update_run(self.run_id, status="RUNNING")
            except MlflowException:  # the store was replaced since: a new parent
                self.run_id = None
        if self.run_id is None:
            self.run_id = self.c.create_run(exp_id, run_name=out.name, tags={
                "slimtune.kind": kind, "slimtune.output_dir": str(out.resolve())}).info.run_id
            ps = [Param(k, str(v)[:6000]) for k, v in T._flat(params).items() if v is not None]
            for i in range(0, len(ps), 100):
                self.c.log_batch(self.run_id, params=ps[i:i + 100])
        ids["mlflow_parent"] = self.run_id
        self.info = {"uri": uri, "experiment_id": exp_id, "run_id": self.run_id}

    def finish(self, out: Path, status: str) -> None:
        for f in REPORTS:
            if (out / f).is_file():
                self.c.log_artifact(self.run_id, str(out / f), "report")
        if (out / "plots").is_dir():
            self.c.log_artifacts(self.run_id, str(out / "plots"), "report/plots")
        self.c.set_terminated(self.run_id, status)


@contextlib.contextmanager
def parent_runs(report_to: Any, out: Path, kind: str, params: dict[str, Any],
                log: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Open the command's parent run / group for the rows' trackers; close it (FINISHED, KILLED on
    Ctrl-C, FAILED on an error) after the command's report is written. Yields what the rows join."""
    chosen = [n for n in T.names(report_to) if n in ("mlflow", "wandb")]
    if not chosen:
        yield {}
        return
    ids = T._read_ids(out)
    info: dict[str, Any] = {}
    mlf = None
    if "mlflow" in chosen:
        try:
            mlf = _MlflowParent(out, kind, params, ids)
            info["mlflow"] = mlf.info
        except Exception as e:  # noqa: BLE001 - the rows still log, each on its own
            log(f"mlflow parent run off ({type(e).__name__}: {e}); each run logs on its own")
    if "wandb" in chosen:
        ids.setdefault("wandb_group", f"{kind}-{out.name}-{uuid.uuid4().hex[:8]}")
        info["wandb"] = {"group": ids["wandb_group"], "job_type": kind}
    (out / T.IDS).write_text(json.dumps(ids))
    if mlf is not None:
        log(f"reporting each run to MLflow under the parent run {mlf.run_id} ({mlf.info['uri']})")
    before = os.environ.get(T.PARENT_ENV)
    os.environ[T.PARENT_ENV] = json.dumps(info)
    status = "FAILED"
    try:
        yield info
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (TrainingInterrupted): the command continues when run again
        status = "KILLED"
        raise
    finally:
        if before is None:
            os.environ.pop(T.PARENT_ENV, None)
        else:
            os.environ[T.PARENT_ENV] = before
        if mlf is not None:
            try:
                mlf.finish(out, status)
            except Exception as e:  # noqa: BLE001
                log(f"mlflow parent run: could not close it ({type(e).__name__}: {e})")
