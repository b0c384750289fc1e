"""`slimtune compare` on a tiny random BERT: every row on the same split and steps, the lr probe chosen
on validation, the test split measured once, a worker process per row, a rerun that keeps finished
rows, a method that cannot run as a row with its message, and every bad input one message (exit 2)
before any row runs."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from conftest_train import sentiment_rows, tiny_bert, tiny_llama, chat_rows, write_jsonl  # noqa: F401


def _config(tmp_path: Path, model: Path, task: str = "classification", rows=None) -> Path:
    data = write_jsonl(tmp_path / "d.jsonl", rows if rows is not None else sentiment_rows(120))
    d = {"model": str(model), "task": task, "method": "lora", "data": {"train": str(data), "max_length": 32},
         "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "eval_every": 2, "log_every": 2, "cpu_threads": 1},
         "eval": {"batch_size": 32, "samples": 0}, "output_dir": str(tmp_path / "run")}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _cli(argv, capsys):
    from slimtune.cli.main import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_compare_runs_every_row_alike_and_a_rerun_keeps_them(tiny_bert, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_bert)
    out = tmp_path / "cmp"
    argv = ["compare", str(cfg), "--methods", "lora,ia3", "--steps", "4", "--probe-steps", "2", "--lr-grid", "2",
            "--lr", "ia3=3e-3", "--out", str(out)]
    rc, stdout, err = _cli(argv, capsys)
    assert rc == 0, err
    rows = {r["name"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    assert set(rows) == {"config", "lora", "ia3"} and all(r["status"] == "ok" for r in rows.values())
    assert {r["steps"] for r in rows.values()} == {"4"}
    assert rows["config"]["lr_source"] == "config" and float(rows["config"]["lr"]) == 1e-2
    assert rows["ia3"]["lr_source"] == "given" and float(rows["ia3"]["lr"]) == 3e-3 and not rows["ia3"]["probe"]
    # lora's lr came from its probe: two half-decade points around its centre, the winner on validation
    res = json.loads((out / "runs" / "lora" / "result.json").read_text())
    probed = [p["lr"] for p in res["probe"]]
    assert rows["lora"]["lr_source"] == "probe" and len(probed) >= 2 and res["lr"] in probed
    assert all((out / "runs" / "lora" / "probe" / f"lr-{lr:.3g}").is_dir() for lr in probed if lr != res["lr"])
    # the held-out number: the test split, 12 of 120 rows carved before validation, measured once
    assert res["test"]["n_test"] == 12 and 0 <= res["test"]["accuracy"] <= 1
    assert float(rows["lora"]["test_metric"]) == res["test"]["accuracy"]
    assert (out / "runs" / "lora" / "main" / "best").is_dir() and not (out / "runs" / "lora" / "main" / "checkpoints").exists()
    assert float(rows["ia3"]["trainable_pct"]) < float(rows["lora"]["trainable_pct"])
    assert all(float(r["peak_mem_mb"]) > 0 for r in rows.values())
    md = (out / "compare.md").read_text()
    assert "measured once, on the test split" in md and "| config as given: lora" in md
    assert (out / "compare.png").stat().st_size > 10_000
    # the same command again: every finished row kept, nothing retrained
    rc, stdout, err = _cli(argv, capsys)
    assert rc == 0 and stdout.count("kept from an earlier session") == 3
    # another lr for ia3: that row runs again, the others stay
    rc, stdout, err = _cli(argv[:-4] + ["--lr", "ia3=1e-3", "--out", str(out)], capsys)
    assert rc == 0 and stdout.count("kept from an earlier session") == 2
    assert float(next(r for r in csv.DictReader(open(out / "compare.csv")) if r["name"] == "ia3")["lr"]) == 1e-3


def test_a_method_that_cannot_run_is_a_row_with_its_message(tiny_llama, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_llama, task="causal_lm", rows=chat_rows(40))
    out = tmp_path / "cmp"
    rc, stdout, err = _cli(["compare", str(cfg), "--methods", "bitfit", "--steps", "2", "--no-probe",
                            "--no-config-row", "--out", str(out)], capsys)
    assert rc == 0, err
    (row,) = list(csv.DictReader(open(out / "compare.csv")))
    assert row["name"] == "bitfit" and row["status"] == "error" and "bias" in row["error"]
    assert "bitfit" in (out / "compare.md").read_text()


@pytest.mark.parametrize("extra, match", [
    (["--methods", "lorra"], "unknown method 'lorra'; did you mean 'lora'?"),
    (["--methods", "lora", "--lr", "ia3=1e-3"], "'ia3' is not among --methods"),
    (["--methods", "lora", "--lr", "ia3"], "write METHOD=LR"),
    (["--methods", "lora", "--lr-grid", "1"], "at least 2 learning rates"),
    (["--methods", "lora", "--steps", "3", "--budget-minutes", "2"], "not allowed with argument"),
    (["--methods", "lora", "--budget-minutes", "0.0001"], "too small for one run"),
    (["--methods", "lora", "--test-fraction", "0"], "give data.test"),
    (["--methods", "lora", "train.metric=gen_accuracy"], "metric 'gen_accuracy' is not produced"),
])
def test_bad_input_is_one_message_before_any_row(tiny_bert, tmp_path, capsys, extra, match):
    cfg = _config(tmp_path, tiny_bert)
    out = tmp_path / "bad"
    try:
        rc, _, err = _cli(["compare", str(cfg), "--out", str(out), *extra], capsys)
    except SystemExit as e:  # argparse's own mutually exclusive options
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert "Traceback" not in err
    assert not (out / "runs").exists()


def test_a_probe_that_cannot_separate_the_rates_halves_then_says_so(tiny_bert, tmp_path, capsys):
    """Two probe steps leave a tiny random classifier's rates tied on validation accuracy: the better
    half runs again at twice the steps (successive halving, never past the row's steps), and a tie
    still left is chosen by validation loss and named in compare.md."""
    cfg = _config(tmp_path, tiny_bert)
    out = tmp_path / "cmp"
    rc, stdout, err = _cli(["compare", str(cfg), "train.precision=fp32", "--methods", "lora", "--steps", "8",
                            "--probe-steps", "2", "--lr-grid", "3", "--no-config-row", "--out", str(out)], capsys)
    assert rc == 0, err
    probe = json.loads((out / "runs" / "lora" / "result.json").read_text())["probe"]
    first = [p for p in probe if p["steps"] == 2 and p["status"] == "ok"]
    assert len(first) >= 3
    top = sorted(p["value"] for p in first)
    later = [p for p in probe if p["steps"] > 2]
    if top[-1] == top[-2]:  # the first round left the top two level on the metric: halving ran
        assert later and {p["steps"] for p in later} <= {4, 8}
        assert len({p["lr"] for p in later if p["steps"] == 4}) == max(2, math.ceil(len(first) / 2))
    last_steps = max(p["steps"] for p in probe)
    last = [p for p in probe if p["steps"] == last_steps and p["status"] == "ok"]
    values = sorted(p["value"] for p in last)
    md = (out / "compare.md").read_text()
    if len(last) > 1 and values[-1] == values[-2]:
        assert all(p.get("undecided") for p in last) and "could not separate the rates" in md
    else:
        assert not any(p.get("undecided") for p in probe) and "could not separate" not in md


def test_the_winning_probe_is_continued_as_the_rows_run_not_trained_again(tiny_bert, tmp_path, capsys):
    """A probe is the row's own run stopped at an evaluation; the winner's checkpoint is where the row's
    run continues. So the row trains each step once: its run resumed at the probe's step, trained only the
    rest, and its loss curve is step for step the curve of the same lr trained from step 0 in one go."""
    from slimtune.train.config import JobConfig
    from slimtune.train.run import run_train

    cfg = _config(tmp_path, tiny_bert)
    out = tmp_path / "cmp"
    rc, stdout, err = _cli(["compare", str(cfg), "train.precision=fp32", "--methods", "lora", "--steps", "8",
                            "--probe-steps", "2", "--lr-grid", "2", "--no-config-row", "--out", str(out)], capsys)
    assert rc == 0, err
    res = json.loads((out / "runs" / "lora" / "result.json").read_text())
    won = [p for p in res["probe"] if p.get("continued")]
    assert len(won) == 1 and won[0]["lr"] == res["lr"]
    reached = won[0]["steps"]  # 2, or 4 / 8 when successive halving continued it
    assert 2 <= reached <= 8
    assert res["run"]["resumed_at"] == reached and res["run"]["session_steps"] == 8 - reached
    assert res["run"]["steps"] == 8 and not (out / "runs" / "lora" / "probe" / f"lr-{res['lr']:.3g}").exists()
    # the winner's 8 steps were each trained once: its probe rungs plus the row's own session
    assert sum(p["trained"] for p in res["probe"] if p["lr"] == res["lr"]) + res["run"]["session_steps"] == 8
    # every probe rung that was promoted continued too: its steps count only what it added
    for p in res["probe"]:
        if p["status"] == "ok" and p["steps"] > 2:
            assert p["trained"] == p["steps"] - max(q["steps"] for q in res["probe"]
                                                    if q["lr"] == p["lr"] and q["steps"] < p["steps"])
    spec = json.loads((out / "runs" / "lora" / "spec.json").read_text())
    scratch = JobConfig.model_validate({**spec["config"], "output_dir": str(tmp_path / "scratch"),
                                        "train": {**spec["config"]["train"], "lr": res["lr"], "max_steps": 8}})
    run_train(scratch, log=lambda m: None, progress=False)

    def losses(folder):
        recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return {r["step"]: r["loss"] for r in recs if "loss" in r}

    row, fresh = losses(out / "runs" / "lora" / "main"), losses(tmp_path / "scratch")
    assert sorted(row) == sorted(fresh) and max(row) == 8
    assert all(math.isclose(row[s], fresh[s], rel_tol=1e-5, abs_tol=1e-6) for s in row), (row, fresh)


def test_seeds_give_each_row_a_spread_and_methods_none_runs_the_config_row_alone(tiny_bert, tmp_path, capsys):
    """--seeds 2: the row's chosen config trained again under train.seed 43 (same splits), each run on
    the test split; the table gives mean ± sd. --methods none: the config row alone (a search's best.yaml
    under the same budget as the other rows)."""
    import statistics

    cfg = _config(tmp_path, tiny_bert)
    out = tmp_path / "cmp"
    rc, stdout, err = _cli(["compare", str(cfg), "--methods", "none", "--steps", "4", "--seeds", "2",
                            "--out", str(out)], capsys)
    assert rc == 0, err
    (row,) = list(csv.DictReader(open(out / "compare.csv")))
    assert row["name"] == "config" and row["seeds"] == "2"
    res = json.loads((out / "runs" / "config" / "result.json").read_text())
    runs = res["seed_runs"]
    assert [r["seed"] for r in runs] == [42, 43] and runs[0]["test"] == res["test"]
    assert (out / "runs" / "config" / "seed-43" / "best").is_dir()
    tests = [r["test"]["accuracy"] for r in runs]
    assert float(row["test_mean"]) == pytest.approx(statistics.fmean(tests))
    assert float(row["test_sd"]) == pytest.approx(statistics.stdev(tests))
    assert "Spread over training seeds" in (out / "compare.md").read_text()
    rc, _, err = _cli(["compare", str(cfg), "--methods", "none", "--no-config-row", "--out", str(tmp_path / "x")],
                      capsys)
    assert rc == 2 and "leaves no row" in err


def test_adalora_total_step_follows_each_runs_steps(tiny_bert, tmp_path, capsys):
    """AdaLoRA's rank budget needs total_step: compare leaves it out of the method block and the job
    fills it with the run's optimizer steps. A probe is the row's own run stopped early (and the winner
    continued as the row), so every probe and the main run share the row's schedule of 4 steps."""
    cfg = _config(tmp_path, tiny_bert)
    out = tmp_path / "cmp"
    rc, stdout, err = _cli(["compare", str(cfg), "--methods", "adalora", "--no-config-row", "--steps", "4",
                            "--probe-steps", "2", "--lr-grid", "2", "--out", str(out)], capsys)
    assert rc == 0, err
    row = next(csv.DictReader(open(out / "compare.csv")))
    assert row["status"] == "ok" and row["steps"] == "4"
    runs = {p.parent.parent: json.loads(p.read_text()) for p in (out / "runs" / "adalora").rglob("adapter_config.json")}
    assert any(d.name == "main" for d in runs) and any(d.parent.name == "probe" for d in runs)
    for d, c in runs.items():
        assert c["peft_type"] == "ADALORA" and c["total_step"] == 4, d
