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


def test_search_logs_one_mlflow_run_per_trial(tmp_path, tiny_bert, clean_env):  # noqa: F811
    import yaml
    from mlflow.tracking import MlflowClient

    from slimtune.search.study import SearchOptions, run_search

    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(80))
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump({
        "model": str(tiny_bert), "task": "classification", "method": "lora", "data": {"train": str(data), "max_length": 32},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "eval_every": 2, "log_every": 2, "cpu_threads": 1,
                  "precision": "fp32", "report_to": "mlflow"},
        "output_dir": str(tmp_path / "run"),
        "search": {"methods": ["lora"], "r": [2, 4], "targets": ["attention"], "layers": ["all"], "dropout": 0.0,
                   "lr": {"low": 1e-3, "high": 3e-2, "log": True}}}))
    out = tmp_path / "search"
    run_search(load_config(str(p)), SearchOptions(out=out, trials=2, seeds=1), log=lambda m: None)
    [db] = list(out.rglob("mlflow.db"))
    c = MlflowClient(f"sqlite:///{db}")
    runs = c.search_runs([c.get_experiment_by_name("slimtune").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["trial-0000", "trial-0001"]
    for r in runs:
        folder = Path(r.data.tags["slimtune.output_dir"])
        recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        want = {x["step"]: x["eval_loss"] for x in recs if "eval_loss" in x and x["step"] > 0}
        got = {m.step: m.value for m in c.get_metric_history(r.info.run_id, "eval_loss") if m.step > 0}
        assert got == pytest.approx(want) and r.data.params["method.r"] in ("2", "4")
