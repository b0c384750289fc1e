"""`slimtune search` on tiny random models: the study in OUT/study.db, trial folders kept or removed,
best.yaml rerunning to the trial's value, resume (also after a real SIGKILL of a real process),
pruning only after warm-up, Pareto, and every bad input one message before any trial."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest_train import sentiment_rows, tiny_bert, write_jsonl  # noqa: F401

optuna = pytest.importorskip("optuna")

from slimtune.search.space import SearchError  # noqa: E402
from slimtune.search.study import SearchOptions, run_search  # noqa: E402
from slimtune.train.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, model: Path, steps: int = 6, **search) -> Path:
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(120))
    d = {"model": str(model), "task": "classification", "method": "lora",
         "data": {"train": str(data), "max_length": 32},
         "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, "eval_every": 2, "log_every": 2, "cpu_threads": 1},
         "eval": {"batch_size": 32}, "output_dir": str(tmp_path / "run"),
         "search": {"methods": ["lora"], "r": [2, 4], "targets": ["attention", "all-linear"], "layers": ["all"],
                    "dropout": 0.0, "lr": {"low": 1e-3, "high": 3e-2, "log": True}, **search}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _study(out: Path):
    return optuna.load_study(study_name="slimtune-search", storage=f"sqlite:///{out / 'study.db'}")


def test_search_runs_reports_and_best_yaml_reruns_to_the_same_metric(tiny_bert, tmp_path):
    from slimtune.train.run import run_train

    cfg_path = _config(tmp_path, tiny_bert)
    out = tmp_path / "search"
    s = run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=4), log=lambda m: None)
    st = _study(out)
    assert len(st.trials) == 4
    # warm start: trial 0 is the config's own choice (lora, lr 1e-2, the job's r 8 snapped to the space's 4)
    assert st.trials[0].user_attrs["warm_start"] and st.trials[0].params["lr"] == pytest.approx(1e-2)
    assert st.trials[0].params["r"] == 4 and st.trials[0].params["targets"] == "attention"
    for t in st.trials:
        folder = out / "trials" / f"trial-{t.number:04d}"
        if t.state.name == "COMPLETE":
            assert (folder / "best" / "adapter_config.json").is_file() and not (folder / "checkpoints").exists()
        else:
            assert not folder.exists()  # pruned / failed: removed whole, the curve and reason stay in study.db
    md = (out / "search.md").read_text()
    assert "measured once" in md and "Selection used only the validation split" in md
    assert (out / "search.csv").read_text().count("\n") == 5
    assert (out / "plots" / "history.png").is_file() and (out / "plots" / "rungs.png").is_file()
    test = s["tests"][str(s["best"].number)]
    assert 0 <= test["accuracy"] <= 1 and test["n_test"] == 12
    best = load_config(str(out / "best.yaml"))
    assert best.search is None and best.output_dir == str(out / "best-run")
    assert best.data.test_fraction == 0.1  # the same rows train as in the trial
    res = run_train(best, log=lambda m: None, progress=False)
    assert res["best"] == pytest.approx(st.best_value, abs=1e-12)
    assert res["trainable"] == st.best_trial.user_attrs["result"]["trainable"]


def test_resume_continues_the_count_and_refuses_another_config(tiny_bert, tmp_path):
    from slimtune.search.space import SearchError

    cfg_path = _config(tmp_path, tiny_bert)
    out = tmp_path / "search"
    run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=2), log=lambda m: None)
    first = [(t.number, t.params, t.values) for t in _study(out).trials]
    lines: list[str] = []
    run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=3), log=lines.append)
    st = _study(out)
    assert len(st.trials) == 3 and [(t.number, t.params, t.values) for t in st.trials[:2]] == first
    assert any("resuming the search" in x for x in lines)
    with pytest.raises(SearchError, match=r"another config or space.*data.max_length: 32 -> 40"):
        run_search(load_config(str(cfg_path), ["data.max_length=40"]), SearchOptions(seeds=1, out=out, trials=4),
                   log=lambda m: None)
    run_search(load_config(str(cfg_path), ["data.max_length=40"]), SearchOptions(seeds=1, out=out, trials=1, overwrite=True),
               log=lambda m: None)
    assert len(_study(out).trials) == 1


def test_pruning_waits_for_warmup_trials_then_halves():
    from slimtune.search.space import parse_section
    from slimtune.search.study import _pruner

    pruner = _pruner(optuna, parse_section({"warmup_trials": 2}), every=1, total=9, pareto=False)
    study = optuna.create_study(direction="maximize", pruner=pruner)

    def trial(v: float) -> bool:
        t = study.ask()
        t.report(v, 1)
        p = t.should_prune()
        study.tell(t, state=optuna.trial.TrialState.PRUNED) if p else study.tell(t, v)
        return p

    assert trial(0.9) is False  # the first at the rung
    assert trial(0.5) is False  # worse, but only 1 trial reached the rung before it: warm-up
    assert trial(0.1) is True  # 2 before it: successive halving prunes the bottom
    assert trial(0.95) is False  # the best so far goes on
    nop = _pruner(optuna, parse_section({"pruner": "none"}), every=1, total=9, pareto=False)
    assert isinstance(nop, optuna.pruners.NopPruner)
    assert isinstance(_pruner(optuna, parse_section({}), 1, 9, pareto=True), optuna.pruners.NopPruner)


def test_pareto_reports_the_front_and_a_trainable_limit_skips_before_training(tiny_bert, tmp_path):
    cfg_path = _config(tmp_path, tiny_bert, r=[2, 16])
    out = tmp_path / "pareto"
    s = run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=3, objective="pareto"), log=lambda m: None)
    st = _study(out)
    assert len(st.directions) == 2 and all(t.state.name == "COMPLETE" for t in st.trials)
    assert {t.number for t in s["chosen"]} == {t.number for t in st.best_trials}
    assert "Pareto" in (out / "search.md").read_text() and (out / "plots" / "pareto.png").is_file()
    lines: list[str] = []
    out2 = tmp_path / "limited"
    run_search(load_config(str(cfg_path), ["search.targets=[all-linear]"]),
               SearchOptions(seeds=1, out=out2, trials=4, max_trainable_pct=0.5), log=lines.append)
    st2 = _study(out2)
    skipped = [t for t in st2.trials if t.user_attrs.get("skipped")]
    assert skipped and all(t.state.name == "PRUNED" and "above max_trainable_pct" in t.user_attrs["reason"]
                           for t in skipped)
    assert all(t.params["r"] == 16 for t in skipped)  # r=2 on all linears is ~0.2 %, r=16 ~1.5 %
    assert all(t.user_attrs["result"]["trainable_pct"] <= 0.5 for t in st2.trials if t.state.name == "COMPLETE")
    assert all(not (out2 / "trials" / f"trial-{t.number:04d}").exists() for t in skipped)
    # a skip trains nothing, so it does not count: --trials 4 trained 4
    assert len(st2.trials) - len(skipped) == 4
    assert any("not counted toward --trials" in x for x in lines)
    md = (out2 / "search.md").read_text()
    assert f"{len(skipped)} skipped above the trainable limit, not counted) of --trials 4" in md
    assert "| skipped |" in md


def test_a_trial_past_the_time_budget_is_cut_at_an_evaluation_and_runs_first_on_resume(tiny_bert, tmp_path,
                                                                                       monkeypatch):
    """--timeout: a trial still running at an evaluation past the budget stops there (not at its
    end), is not counted, and its settings run first when the search resumes. The search's clock is
    moved an hour on at the trial's first evaluation, so the test does not depend on the machine."""
    import types

    from slimtune.search import study as study_mod
    from slimtune.search import trial as trial_mod

    skew = [0.0]
    late_clock = types.SimpleNamespace(time=lambda: time.time() + skew[0])
    monkeypatch.setattr(study_mod, "time", late_clock)  # the loop's budget check
    monkeypatch.setattr(trial_mod, "time", late_clock)  # the trial's cut at an evaluation
    real_run_once = study_mod.P.run_once

    def an_hour_late(cfg, on_evaluate=None, **kw):  # a trial's run (the others pass no callback)
        def late(step, metrics):
            skew[0] = 3600.0
            return on_evaluate(step, metrics)
        return real_run_once(cfg, on_evaluate=late if on_evaluate is not None else None, **kw)

    monkeypatch.setattr(study_mod.P, "run_once", an_hour_late)
    cfg_path = _config(tmp_path, tiny_bert)
    out = tmp_path / "budget"
    lines: list[str] = []
    with pytest.raises(SearchError, match="no trial of the search"):
        run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=3, timeout_min=10), log=lines.append)
    st = _study(out)
    cut = [t for t in st.trials if t.state.name == "FAIL"]
    assert len(cut) == 1 and cut[0].user_attrs["interrupted"] == "cut by the time budget at step 2"
    assert [t.state.name for t in st.trials] == ["FAIL", "WAITING"]  # queued with the same settings
    assert any("cut at step 2 by the time budget" in x for x in lines)
    assert any("search stopped: time budget" in x for x in lines)
    assert (out / "trials" / "trial-0000" / "checkpoints" / "step-000002").is_dir()  # kept for the retry

    monkeypatch.undo()
    run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=1), log=lambda m: None)
    st = _study(out)
    again = st.trials[1]
    assert again.state.name == "COMPLETE" and again.params == cut[0].params and again.user_attrs["retry_of"] == 0
    # continued from the cut, not trained again: the run resumed at step 2 and trained the 4 steps left,
    # and the pruner saw the whole curve (step 2's value reported again from the cut trial)
    res = again.user_attrs["result"]
    assert again.user_attrs["continued_at"] == 2 and res["resumed_at"] == 2 and res["session_steps"] == 4
    assert sorted(again.intermediate_values) == [2, 4, 6] and again.intermediate_values[2] == cut[0].intermediate_values[2]
    assert not (out / "trials" / "trial-0000").exists() and (out / "trials" / "trial-0001" / "best").is_dir()


def test_a_space_entirely_above_the_trainable_limit_stops_with_the_fix(tiny_bert, tmp_path, monkeypatch):
    """Every draw above --max-trainable-pct: the search stops after MAX_SKIPS_IN_A_ROW skips (not
    --trials, which skips do not reach) and says what to change."""
    from slimtune.search import study as study_mod

    monkeypatch.setattr(study_mod, "MAX_SKIPS_IN_A_ROW", 3)
    out = tmp_path / "all_over"
    with pytest.raises(SearchError, match="no trial of the search") as e:
        run_search(load_config(str(_config(tmp_path, tiny_bert, r=[8, 16]))),
                   SearchOptions(seeds=1, out=out, trials=2, max_trainable_pct=0.001), log=lambda m: None)
    st = _study(out)
    assert len(st.trials) == 3 and all(t.user_attrs.get("skipped") for t in st.trials)
    assert "3 draws in a row were above max_trainable_pct 0.001%" in (out / "search.md").read_text()
    assert "search.md" in str(e.value)


def _cli(argv, capsys):
    from slimtune.cli.main import main

    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--objective", "gen_accuracy"], "metric 'gen_accuracy' is not produced by this task"),
    (["search.methods=[]"], "search.methods is an empty list"),
    (["search.methods=[ia3]"], "search.r applies to lora / dora / loha / lokr only"),
    (["search.pruner=median"], "search.pruner"),
    (["--timeout", "0.001"], "too small for one run"),
    (["--trials", "0"], "at least 1 trial"),
    (["--pareto-with", "memory"], "invalid choice"),
])
def test_bad_input_is_one_message_before_any_trial(tiny_bert, tmp_path, capsys, extra, match):
    cfg_path = _config(tmp_path, tiny_bert)
    out = tmp_path / "bad"
    try:
        rc, err = _cli(["search", str(cfg_path), "--out", str(out), "--trials", "2", *extra], capsys)
    except SystemExit as e:  # argparse's own choices
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert "Traceback" not in err
    assert not (out / "trials").exists()


@pytest.mark.slow
def test_a_killed_search_continues_where_it_stopped(tiny_bert, tmp_path):
    """A real `slimtune search` process, SIGKILLed during its second trial: the next run marks that
    trial interrupted, runs its settings again first, continuing its run from the checkpoint the kill
    left (not from step 0), and finishes the count."""
    cfg_path = _config(tmp_path, tiny_bert, steps=40, lr=1e-2, r=[2, 4, 8], pruner="none")
    out = tmp_path / "search"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-m", "slimtune", "search", str(cfg_path), "--out", str(out), "--trials", "3"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "trials" / "trial-0001" / "metrics.jsonl"
    ckpts = out / "trials" / "trial-0001" / "checkpoints"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and p.poll() is None:
            if ckpts.is_dir() and any(c.name.startswith("step-") for c in ckpts.iterdir()):  # trial 1 has a checkpoint
                break
            time.sleep(0.2)
        assert p.poll() is None, "the search ended before it could be killed"
        assert marker.is_file(), "trial 1 never started"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    st = _study(out)
    assert [t.state.name for t in st.trials] == ["COMPLETE", "RUNNING"]
    killed_params = st.trials[1].params
    lines: list[str] = []
    run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=3), log=lines.append)
    st = _study(out)
    states = [t.state.name for t in st.trials]
    assert states[:2] == ["COMPLETE", "FAIL"] and "RUNNING" not in states
    assert st.trials[1].user_attrs["interrupted"]
    retry = st.trials[2]
    assert retry.user_attrs["retry_of"] == 1 and retry.params == killed_params and retry.state.name == "COMPLETE"
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 3
    assert not (out / "trials" / "trial-0001").exists()
    assert any("cut off" in x for x in lines)
    at = retry.user_attrs["continued_at"]
    assert at >= 2 and retry.user_attrs["result"]["resumed_at"] == at
    assert retry.user_attrs["result"]["session_steps"] == 40 - at


def test_the_top_configs_run_under_other_seeds_and_the_pick_is_the_best_mean(tiny_bert, tmp_path):
    """--seeds 3 --seed-top 2: the two best configs train again under train.seed 43 and 44 on the same
    splits (data.split_seed pinned); the pick is the best mean, the report gives each config's values,
    mean ± sd and range, and only the pick's runs (one per seed) are measured on the test split. A rerun
    of the same command trains and measures nothing again."""
    import statistics

    from slimtune.train.run import run_train

    cfg_path = _config(tmp_path, tiny_bert, pruner="none")
    out = tmp_path / "seeds"
    lines: list[str] = []
    s = run_search(load_config(str(cfg_path)), SearchOptions(out=out, trials=3, seeds=3, top=2), log=lines.append)
    st = _study(out)
    spread = s["spread"]
    assert len(spread) == 2 and all(list(r["values"]) == [42, 43, 44] for r in spread)
    for r in spread:
        t = st.trials[r["trial"]]
        assert r["values"][42] == t.values[0]  # the trial itself is the first seed
        assert r["mean"] == pytest.approx(statistics.fmean(r["values"].values()))
        assert r["std"] == pytest.approx(statistics.stdev(r["values"].values()))
    means = [r["mean"] for r in spread]
    assert means[0] >= means[1] and s["best"].number == spread[0]["trial"]  # accuracy: higher is better
    # a seed run is the trial's config with another train.seed: retrained by hand, the same value
    pick = s["best"].number
    seed_run = out / "trials" / f"trial-{pick:04d}" / "seed-43"
    assert (seed_run / "best").is_dir()
    cfg = load_config(str(seed_run / "config.yaml"))
    assert cfg.train.seed == 43 and cfg.data.split_seed == 42
    again = run_train(cfg.model_copy(update={"output_dir": str(tmp_path / "again")}), log=lambda m: None, progress=False)
    assert again["best"] == pytest.approx(spread[0]["values"][43], abs=1e-12)
    # the test split: the pick's three runs, nobody else's
    assert set(s["seed_tests"]) == {"42", "43", "44"} and all(t["n_test"] == 12 for t in s["seed_tests"].values())
    assert set(st.user_attrs["seed_tests"]) == {str(pick)}
    md = (out / "search.md").read_text()
    assert "How sure: the top 2 configs under 3 training seeds" in md and "measured once per seed run" in md
    assert f"trial {pick}" in (out / "best.yaml").read_text().splitlines()[1]
    # the same command again: the trials and the seed runs are kept, nothing retrained or remeasured
    shutil_marker = (seed_run / "best" / "adapter_model.safetensors").stat().st_mtime
    s2 = run_search(load_config(str(cfg_path)), SearchOptions(out=out, trials=3, seeds=3, top=2), log=lambda m: None)
    assert s2["spread"] == [{**r, "values": dict(r["values"])} for r in spread]
    assert (seed_run / "best" / "adapter_model.safetensors").stat().st_mtime == shutil_marker


def test_a_warm_start_queued_twice_by_two_processes_runs_once():
    """Two processes that queue the same warm start at one moment (Optuna's skip_if_exists checks, then
    writes) leave two waiting copies: the later copy is recognised (trial.earlier_copy) and not run."""
    from optuna.trial import TrialState

    from slimtune.search.trial import earlier_copy

    st = optuna.create_study()
    for _ in range(2):
        st.enqueue_trial({"lr": 1e-3}, user_attrs={"warm_start": "every linear"})
    st.enqueue_trial({"lr": 2e-3}, user_attrs={"warm_start": "every linear"})  # another start: not a copy
    first, second, other = (st.ask() for _ in range(3))
    frozen = [st._storage.get_trial(t._trial_id) for t in (first, second, other)]
    assert earlier_copy(st, frozen[0]) is None and earlier_copy(st, frozen[1]) == 0 and earlier_copy(st, frozen[2]) is None
    # a failed copy does not count (a killed warm start runs again through its own retry, which
    # carries the warm start's attributes, as Optuna's RetryFailedTrialCallback copies them)
    st.tell(first, state=TrialState.FAIL)
    assert earlier_copy(st, st._storage.get_trial(second._trial_id)) is None
