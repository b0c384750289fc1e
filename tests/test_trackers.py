"""train.report_to: MLflow (its own client, a local SQLite store), W&B offline and TensorBoard hold the
job's params, its metrics at every logged step (the same numbers as metrics.jsonl), the adapter and
the report as artifacts; unknown names and `none` behave as HF Trainer's."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest_train import sentiment_rows, tiny_bert, write_jsonl  # noqa: F401

from slimtune.train.config import JobConfigError, load_config
from slimtune.train.run import run_train


def _cfg(tmp_path: Path, model: Path, report_to: str, out: str = "runs/job") -> Path:
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {model}\ndata: {{train: {data}, max_length: 32}}\n"
                 f"train: {{max_steps: 4, batch_size: 4, lr: 1.0e-2, eval_every: 2, log_every: 1, cpu_threads: 1, "
                 f"precision: fp32, report_to: {report_to}}}\neval: {{max_examples: 8}}\noutput_dir: {tmp_path / out}\n")
    return p


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(tmp_path / "wandb-home"))


def wandb_records(path: Path):
    """The records of a W&B .wandb file (its LevelDB-log framing: 7-byte file header, 32 KiB blocks,
    7-byte record headers; FULL / FIRST / MIDDLE / LAST chunks), parsed with W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 0 and n == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
    return out


def test_unknown_tracker_is_a_config_error(tmp_path, tiny_bert):  # noqa: F811
    with pytest.raises(JobConfigError, match="unknown tracker 'comet'.*choose from tensorboard, mlflow, wandb"):
        load_config(str(_cfg(tmp_path, tiny_bert, "[tensorboard, comet]")))


def test_none_writes_no_tracker_files(tmp_path, tiny_bert, clean_env):  # noqa: F811
    res = run_train(load_config(str(_cfg(tmp_path, tiny_bert, "none"))), log=lambda m: None, progress=False)
    out = tmp_path / "runs" / "job"
    assert res["status"] == "finished" and (out / "metrics.jsonl").is_file()
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_mlflow_wandb_tensorboard_hold_the_jobs_metrics(tmp_path, tiny_bert, clean_env):  # noqa: F811
    from mlflow.tracking import MlflowClient

    cfg = load_config(str(_cfg(tmp_path, tiny_bert, "[tensorboard, mlflow, wandb]")))
    lines = []
    run_train(cfg, log=lines.append, progress=False)
    out = tmp_path / "runs" / "job"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in recs if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in recs if "eval_loss" in r}
    assert sorted(loss) == [1, 2, 3, 4] and 2 in evals and 4 in evals
    assert not any("logging off" in x for x in lines), lines

    # MLflow: the SQLite store next to the run, read back through MLflow's client
    c = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("slimtune")
    [run] = c.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "job"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["train.max_steps"] == "4"
    assert {m.step: m.value for m in c.get_metric_history(run.info.run_id, "loss")} == pytest.approx(loss)
    assert {m.step: m.value for m in c.get_metric_history(run.info.run_id, "eval_loss")} == pytest.approx(evals)
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert arts == {"adapter", "report"}
    assert {Path(a.path).name for a in c.list_artifacts(run.info.run_id, "report")} >= {"report.md", "plot.png",
                                                                                        "summary.json"}
    assert "adapter_model.safetensors" in {Path(a.path).name for a in c.list_artifacts(run.info.run_id, "adapter")}

    # W&B offline: the run's own log file holds every step's metrics, the config and two artifacts
    [f] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    records = wandb_records(f)
    hist = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            hist[int(items["_step"])] = items
    assert {s: h["loss"] for s, h in hist.items() if "loss" in h} == pytest.approx(loss)
    assert {s: h["eval_loss"] for s, h in hist.items() if "eval_loss" in h} == pytest.approx(evals)
    kinds = [r.WhichOneof("record_type") for r in records]
    cfg_keys = {i.key for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update} | \
        {i.key for r in records if r.WhichOneof("record_type") == "run" for i in r.run.config.update}
    assert {"train", "method", "model"} <= cfg_keys, kinds
    arts = {r.artifact.name: r.artifact.type for r in records if r.WhichOneof("record_type") == "artifact"}
    assert arts == {"job-adapter": "model", "job-report": "report"}
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)

    # the UI lists the run, not the copies of its adapter in MLflow's artifact folder beside it
    from slimtune.ui import runs as ui_runs

    assert (tmp_path / "runs" / "mlartifacts").is_dir()
    assert [p.name for p in ui_runs.find(tmp_path / "runs")] == ["job"]

    # TensorBoard as before
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "trackers.json").read_text()).keys() == {"mlflow", "wandb"}


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` (the full mlflow package) as a process on 127.0.0.1:<free port>: a SQLite backend
    and served artifacts (--artifacts-destination) in tmp_path; killed with its workers at the end."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("mlflow.server", reason="the full mlflow package (the test extra) runs `mlflow server`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "mlflow-server.log", "w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey job runner beside it
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                          "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                          "--artifacts-destination", str(tmp_path / "server-artifacts")],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                         start_new_session=True)  # its own process group: uvicorn's worker goes with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180  # migrations + imports: ~40 s on a loaded 2-core machine
        while True:
            if p.poll() is not None:
                raise AssertionError(f"mlflow server exited ({p.returncode}): "
                                     f"{(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError("mlflow server not answering /health after 180 s: "
                                     f"{(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        except ProcessLookupError:
            pass
        log.close()


def test_mlflow_tracking_server_holds_params_metrics_artifacts(tmp_path, tiny_bert, clean_env, mlflow_server,  # noqa: F811
                                                               monkeypatch):
    """A job with report_to: [mlflow] against a real tracking server ($MLFLOW_TRACKING_URI, HF's
    variable): its params, every step's metrics and the adapter and report read back through
    MlflowClient over HTTP; the artifacts went through the server into its artifact store."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "slimtune-served")
    lines = []
    res = run_train(load_config(str(_cfg(tmp_path, tiny_bert, "[mlflow]"))), log=lines.append, progress=False)
    out = tmp_path / "runs" / "job"
    assert res["status"] == "finished" and not any("logging off" in x for x in lines), lines
    assert f"MLflow store {mlflow_server}" in "\n".join(lines)
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing local: the server holds it
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    c = MlflowClient(mlflow_server)
    [run] = c.search_runs([c.get_experiment_by_name("slimtune-served").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "job"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["train.report_to"] == "['mlflow']"
    for key in ("loss", "lr", "eval_loss", "accuracy"):
        want = {r["step"]: r[key] for r in recs if key in r}
        assert want and {m.step: m.value for m in c.get_metric_history(run.info.run_id, key)} == pytest.approx(want), key
    assert {a.path for a in c.list_artifacts(run.info.run_id)} == {"adapter", "report"}
    got = Path(c.download_artifacts(run.info.run_id, "report/report.md", str(tmp_path / "dl")))
    assert got.read_bytes() == (out / "report.md").read_bytes()
    ad = Path(c.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "dl")))
    local = next(out / d for d in ("best", "adapter") if (out / d).is_dir())
    assert (ad / "adapter_model.safetensors").read_bytes() == (local / "adapter_model.safetensors").read_bytes()
    # uploaded through the server (mlflow-artifacts:), stored under its --artifacts-destination
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((tmp_path / "server-artifacts").rglob("report.md"))


def _wandb_runs(folder: Path) -> dict[str, object]:
    """name -> the run record of every W&B offline run file under folder."""
    out = {}
    for f in folder.rglob("run-*.wandb"):
        [run] = [r.run for r in wandb_records(f) if r.WhichOneof("record_type") == "run"][:1]
        out[run.display_name] = run
    return out


def _children(c, exp_id: str, parent_id: str):
    return c.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def _tracked_config(tmp_path, tiny_bert, **extra) -> Path:
    """A 4-step classification config on 80 sentiment rows that reports to MLflow and W&B (+ `extra`)."""
    import yaml

    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(80))
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump({
        "model": str(tiny_bert), "task": "classification", "method": "lora", "data": {"train": str(data), "max_length": 32},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "eval_every": 2, "log_every": 2, "cpu_threads": 1,
                  "precision": "fp32", "report_to": ["mlflow", "wandb"]},
        "output_dir": str(tmp_path / "run"), **extra}))
    return p


def test_search_logs_one_nested_run_per_trial(tmp_path, tiny_bert, clean_env):  # noqa: F811
    """MLflow: a parent run for the search, each trial a child (mlflow.parentRunId) with the trial's own
    metrics; W&B offline: each trial a run in the search's group."""
    from mlflow.tracking import MlflowClient

    from slimtune.search.study import SearchOptions, run_search

    p = _tracked_config(tmp_path, tiny_bert, search={
        "methods": ["lora"], "r": [2, 4], "targets": ["attention"], "layers": ["all"], "dropout": 0.0,
        "lr": {"low": 1e-3, "high": 3e-2, "log": True}})
    out = tmp_path / "search"
    run_search(load_config(str(p)), SearchOptions(out=out, trials=2, seeds=1), log=lambda m: None)
    assert [x.relative_to(out) for x in out.rglob("mlflow.db")] == [Path("mlflow.db")]  # one store for the search
    c = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("slimtune").experiment_id
    ids = json.loads((out / "trackers.json").read_text())
    [parent] = c.search_runs([exp], filter_string="tags.`slimtune.kind` = 'search'")
    assert parent.info.run_id == ids["mlflow_parent"] and parent.info.status == "FINISHED"
    assert parent.info.run_name == "search" and parent.data.params["train.lr"] == "0.01"
    assert {Path(a.path).name for a in c.list_artifacts(parent.info.run_id, "report")} >= {"search.md", "search.csv",
                                                                                          "best.yaml", "plots"}
    runs = _children(c, exp, parent.info.run_id)
    assert sorted(r.info.run_name for r in runs) == ["trial-0000", "trial-0001"]
    assert len(c.search_runs([exp])) == 3  # the parent and its trials, nothing else (no timing or probe runs)
    for r in runs:
        folder = Path(r.data.tags["slimtune.output_dir"])
        recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        want = {x["step"]: x["eval_loss"] for x in recs if "eval_loss" in x and x["step"] > 0}
        got = {m.step: m.value for m in c.get_metric_history(r.info.run_id, "eval_loss") if m.step > 0}
        assert got == pytest.approx(want) and r.data.params["method.r"] in ("2", "4")
    wb = _wandb_runs(out / "trials")
    assert sorted(wb) == ["trial-0000", "trial-0001"]
    assert {(x.run_group, x.job_type) for x in wb.values()} == {(ids["wandb_group"], "search")}
    assert ids["wandb_group"].startswith("search-search-")


def test_compare_logs_one_nested_run_per_row(tmp_path, tiny_bert, clean_env, capsys):  # noqa: F811
    """Each compare row (its own worker process) a child run named after the row, its lr probes none;
    the same command again keeps the rows and the parent; W&B offline: each row a run in the group."""
    from mlflow.tracking import MlflowClient

    from slimtune.cli.main import main

    p = _tracked_config(tmp_path, tiny_bert, eval={"samples": 0})
    out = tmp_path / "cmp"
    argv = ["compare", str(p), "--methods", "ia3", "--steps", "4", "--probe-steps", "2", "--lr-grid", "2",
            "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    c = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("slimtune").experiment_id
    ids = json.loads((out / "trackers.json").read_text())
    [parent] = c.search_runs([exp], filter_string="tags.`slimtune.kind` = 'compare'")
    assert parent.info.run_id == ids["mlflow_parent"] and parent.info.status == "FINISHED"
    assert {Path(a.path).name for a in c.list_artifacts(parent.info.run_id, "report")} == {"compare.md", "compare.csv",
                                                                                          "compare.png"}
    runs = {r.info.run_name: r for r in _children(c, exp, parent.info.run_id)}
    assert sorted(runs) == ["config", "ia3"] and len(c.search_runs([exp])) == 3  # ia3's lr probes log no run
    for name, r in runs.items():
        assert r.data.tags["slimtune.output_dir"] == str((out / "runs" / name / "main").resolve())
        recs = [json.loads(x) for x in (out / "runs" / name / "main" / "metrics.jsonl").read_text().splitlines()]
        want = {x["step"]: x["loss"] for x in recs if "loss" in x}
        assert {m.step: m.value for m in c.get_metric_history(r.info.run_id, "loss")} == pytest.approx(want)
        assert r.info.status == "FINISHED" and "adapter" in {a.path for a in c.list_artifacts(r.info.run_id)}
    assert runs["ia3"].data.params["method.name"] == "ia3"
    wb = _wandb_runs(out / "runs")  # the probes' folders hold none
    assert sorted(wb) == ["config", "ia3"]
    assert {(x.run_group, x.job_type) for x in wb.values()} == {(ids["wandb_group"], "compare")}
    # the same command again: the rows are kept, the parent continues (no second parent, no new rows)
    capsys.readouterr()
    assert main(argv) == 0 and capsys.readouterr().out.count("kept from an earlier session") == 2
    assert len(c.search_runs([exp])) == 3
    assert c.get_run(parent.info.run_id).info.status == "FINISHED"
