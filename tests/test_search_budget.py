"""Training-time budgets that do not depend on the machine's load, and a search that ranks trials at
equal time (issue 28): the trainer's CPU step clock, compare's and search's `--budget-clock`, each
trial's steps from its own step time, the pruner's rungs in clock time, a cut trial continued on its
own schedule. Clocks are faked wherever a number is asserted, so nothing here is a timed test."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest_train import sentiment_rows, tiny_bert, write_jsonl  # noqa: F401

optuna = pytest.importorskip("optuna")

from slimtune.search import budget as BU  # noqa: E402
from slimtune.search import prepare as P  # noqa: E402
from slimtune.search.space import SearchError  # noqa: E402
from slimtune.search.study import SearchOptions, run_search  # noqa: E402
from slimtune.train.config import load_config  # noqa: E402


def _config(tmp_path: Path, model: Path) -> Path:
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(120))
    d = {"model": str(model), "task": "classification", "method": "lora",
         "data": {"train": str(data), "max_length": 32},
         "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "eval_every": 2, "log_every": 2, "cpu_threads": 1},
         "eval": {"batch_size": 32}, "output_dir": str(tmp_path / "run"),
         "search": {"methods": ["lora"], "r": [2, 4], "targets": ["attention", "all-linear"], "layers": ["all"],
                    "dropout": 0.0, "lr": {"low": 1e-3, "high": 3e-2, "log": True}, "rungs": 3}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


class FakeClock:
    """A CPU step clock that advances `tick` seconds a reading: a step (two readings) costs `tick`."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_the_cpu_step_clock_counts_this_process_over_its_threads():
    import torch

    from slimtune.train.resources import cpu_step_clock

    a, p0, w = cpu_step_clock(), time.process_time(), time.monotonic()
    x = 0
    while time.process_time() - p0 < 0.05 and time.monotonic() - w < 20:  # busy: 50 ms of this process's CPU
        x += 1
    busy, used = cpu_step_clock() - a, time.process_time() - p0
    b = cpu_step_clock()
    time.sleep(0.2)  # asleep: wall time passes, this process's CPU time does not
    asleep = cpu_step_clock() - b
    assert used >= 0.05 and busy == pytest.approx(used / torch.get_num_threads(), rel=0.2)
    assert asleep < 0.02


class WarmClock:
    """A CPU step clock whose first step costs `first` and every later one `tick` (readings come in
    pairs, before and after a step)."""

    def __init__(self, first: float, tick: float) -> None:
        self.now, self.first, self.tick, self.n = 0.0, first, tick, 0

    def __call__(self) -> float:
        self.n += 1
        if self.n % 2 == 0:  # the reading after a step
            self.now += self.first if self.n == 2 else self.tick
        return self.now


def test_a_runs_cpu_step_time_comes_from_the_step_clock_not_the_wall(tiny_bert, tmp_path, monkeypatch):
    from slimtune.train import trainer

    monkeypatch.setattr(trainer, "cpu_step_clock", WarmClock(first=1.0, tick=0.25))
    cfg = P.derive(load_config(str(_config(tmp_path, tiny_bert))), {"eval": {"samples": 0}})
    t = P.time_run(cfg, tmp_path / "timing")
    # the steady step: the first (its warm-up, 4x here) left out of a 3-step timing run
    assert t.cpu_step_s == pytest.approx(0.25) and t.budget_step_s("cpu") == pytest.approx(0.25)
    monkeypatch.setattr(trainer, "cpu_step_clock", WarmClock(first=1.0, tick=0.25))  # a fresh process's clock
    res = P.run_once(P.derive(cfg, {"train": {"max_steps": 3, "eval_every": 3}, "output_dir": str(tmp_path / "r")}))
    assert res["first_step_cpu_s"] == pytest.approx(1.0) and res["step_cpu_s"] == pytest.approx(1.5 / 3)
    assert t.budget_step_s("wall") == t.step_s and t.step_s != pytest.approx(0.25)
    assert P.resolve_clock("auto") == "cpu"  # no GPU here: the budget is compute, whatever the load
    assert P.resolve_clock("wall") == "wall"
    with pytest.raises(SearchError, match="--budget-clock 'sundial': choose auto, cpu, wall"):
        P.resolve_clock("sundial")


def test_a_budget_gives_each_step_time_its_steps_and_an_evaluation_grid_at_equal_time():
    b = BU.Budget(seconds=60.0, clock="cpu", rungs=4)
    fast, slow = b.plan(0.5), b.plan(1.5)
    assert (fast["steps"], fast["eval_every"]) == (120, 30) and (slow["steps"], slow["eval_every"]) == (40, 10)
    # the pruner sees clock time trained: both reach the rung at 15 s, 30 s, ... at their own steps
    assert [BU.resource(s, fast) for s in (30, 60)] == [BU.resource(s, slow) for s in (10, 20)] == [15000, 30000]
    assert BU.resource(7, None) == 7
    # the first rung a little before the interval: whole steps put a 1.6 s/step trial's first evaluation
    # at 9 steps, 14.4 s; a rung at exactly 15 s would judge it only at its second (28.8 s)
    lo, hi = b.pruner_range()
    odd = b.plan(1.6)
    assert odd["eval_every"] == 9 and lo <= BU.resource(9, odd) == 14400 < 15000 and (lo, hi) == (13500, 60000)
    assert b.plan(61.0)["steps"] == 0  # one step longer than the budget: the trial cannot run
    with pytest.raises(SearchError, match="--budget-minutes 0: give the training time per trial in minutes"):
        BU.make(0, "auto", 4)


def _fake_timing(calls: list[str]):
    """prepare.time_run, deterministic: a step on every linear layer costs 2x one on attention only."""
    def time_run(cfg, out, steps=2):
        t = cfg.method.get("target_modules", "") if isinstance(cfg.method, dict) else ""
        slow = t == "all-linear"  # the space's other set: attention's linears by path
        calls.append("all-linear" if slow else "attention")
        cpu = 0.2 if slow else 0.1
        return P.Timing(setup_s=0.0, step_s=cpu * 7, eval_s=0.0, cpu_step_s=cpu)  # wall: a loaded machine
    return time_run


def _fake_step_clock(monkeypatch):
    """The trainer's CPU step clock as _fake_timing has it, per run: the runs re-plan their length on
    their own steady steps (train/clock_budget.py), which then agree with the timing."""
    from slimtune.train import trainer

    real = P.run_once

    def run_once(cfg, *a, **kw):
        t = cfg.method.get("target_modules", "") if isinstance(cfg.method, dict) else ""
        monkeypatch.setattr(trainer, "cpu_step_clock", FakeClock(0.2 if t == "all-linear" else 0.1))
        return real(cfg, *a, **kw)

    monkeypatch.setattr(P, "run_once", run_once)


def test_search_under_a_budget_ranks_trials_at_equal_time(tiny_bert, tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(P, "time_run", _fake_timing(calls))
    _fake_step_clock(monkeypatch)
    out = tmp_path / "search"
    lines: list[str] = []
    s = run_search(load_config(str(_config(tmp_path, tiny_bert))),
                   SearchOptions(seeds=1, out=out, trials=5, budget_min=1.2 / 60), log=lines.append)
    st = optuna.load_study(study_name="slimtune-search", storage=f"sqlite:///{out / 'study.db'}")
    ran = [t for t in st.trials if t.user_attrs.get("budget_plan")]
    assert len(ran) == 5
    kinds = set()
    for t in ran:
        plan, slow = t.user_attrs["budget_plan"], t.params["targets"] == "all-linear"
        kinds.add(slow)
        # 1.2 s of cpu clock, 3 rungs: 12 steps at 0.1 s, 6 at 0.2 s (the wall step time, 7x, plays no part)
        assert plan == {"steps": 6 if slow else 12, "eval_every": 2 if slow else 4, "step_s": 0.2 if slow else 0.1,
                        "clock": "cpu", "seconds": 1.2}
        if t.state.name == "COMPLETE":
            assert t.user_attrs["result"]["steps"] == plan["steps"]
            # the rungs in clock ms: the same for both step times (0.4 s of training apart)
            assert sorted(t.intermediate_values) == [400, 800, 1200]
    assert kinds == {True, False}, "the space's two target sets both drawn"
    # one timing run per structure (rank, targets, MLP rank factor), not per trial: lr, alpha and rsLoRA
    # do not change a step's cost
    structures = {(t.params["r"], t.params["targets"], t.params.get("mlp_r_factor")) for t in ran}
    assert len(calls) == len(structures)
    # best.yaml trains the pick's own steps, and search.md says how trials were ranked
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["max_steps"] == s["best"].user_attrs["budget_plan"]["steps"]
    assert (best["train"]["budget_s"], best["train"]["budget_clock"]) == (1.2, "cpu")  # re-planned where it runs
    md = (out / "search.md").read_text()
    assert "trials ranked at equal training time" in md and "CPU clock" in md and "0 s of training" in md
    assert any("6 steps at 0.20 s/step, cpu clock" in x for x in lines) or not any(kinds - {False})
    # the same command with another budget is another search: refused, naming the difference
    with pytest.raises(SearchError, match="budget"):
        run_search(load_config(str(_config(tmp_path, tiny_bert))),
                   SearchOptions(seeds=1, out=out, trials=6, budget_min=2.4 / 60), log=lambda m: None)


def test_a_cut_trial_continues_on_its_own_schedule_not_a_new_timing(tiny_bert, tmp_path, monkeypatch):
    """A trial cut by --timeout under a budget keeps its plan: the retry resumes its checkpoint with the
    same steps even when the machine's step time has changed since (no new timing run for it)."""
    import types

    from slimtune.search import study as study_mod
    from slimtune.search import trial as trial_mod

    calls: list[str] = []
    monkeypatch.setattr(P, "time_run", _fake_timing(calls))
    _fake_step_clock(monkeypatch)
    skew = [0.0]
    late = types.SimpleNamespace(time=lambda: time.time() + skew[0])
    monkeypatch.setattr(study_mod, "time", late)
    monkeypatch.setattr(trial_mod, "time", late)
    real = P.run_once

    def an_hour_late(cfg, on_evaluate=None, **kw):
        def cb(step, metrics):
            skew[0] = 3600.0
            return on_evaluate(step, metrics)
        return real(cfg, on_evaluate=cb if on_evaluate is not None else None, **kw)

    monkeypatch.setattr(P, "run_once", an_hour_late)
    cfg_path = _config(tmp_path, tiny_bert)
    out = tmp_path / "cut"
    opts = dict(seeds=1, out=out, budget_min=1.2 / 60)
    with pytest.raises(SearchError, match="no trial of the search"):
        run_search(load_config(str(cfg_path)), SearchOptions(trials=2, timeout_min=10, **opts), log=lambda m: None)
    monkeypatch.undo()
    _fake_step_clock(monkeypatch)
    slower = []
    monkeypatch.setattr(P, "time_run", lambda *a, **k: slower.append(1) or P.Timing(0.0, 1.0, 0.0, 1.0))
    run_search(load_config(str(cfg_path)), SearchOptions(trials=1, **opts), log=lambda m: None)
    st = optuna.load_study(study_name="slimtune-search", storage=f"sqlite:///{out / 'study.db'}")
    cut, again = st.trials[0], st.trials[1]
    assert cut.user_attrs["interrupted"].startswith("cut by the time budget")
    assert again.state.name == "COMPLETE" and again.user_attrs["retry_of"] == 0 and not slower
    assert again.user_attrs["budget_plan"] == cut.user_attrs["budget_plan"]
    res = again.user_attrs["result"]
    assert res["resumed_at"] == again.user_attrs["continued_at"] and res["steps"] == cut.user_attrs["budget_plan"]["steps"]


def test_compare_counts_its_budget_on_the_cpu_clock_and_says_so(tiny_bert, tmp_path, capsys):
    from slimtune.cli.main import main

    cfg = _config(tmp_path, tiny_bert)
    out = tmp_path / "cmp"
    rc = main(["compare", str(cfg), "--methods", "none", "--budget-minutes", "0.05", "--budget-clock", "cpu",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "runs" / "config" / "result.json").read_text())
    assert res["budget_clock"] == "cpu" and res["budget_step_s"] > 0
    assert res["budget_steps"] == max(1, int(3.0 // res["budget_step_s"]))  # the timing run's guess: where it starts
    # the row re-planned its length on its own steady steps (train/clock_budget.py): it trained 3.0 s of
    # CPU clock at the steady step it ran, to within the drift of that step's mean over its last step
    run = res["run"]
    steps, steady = run["steps"], (run["session_cpu_s"] - run["first_step_cpu_s"]) / (run["steps"] - 1)
    assert run["total_steps"] == steps and steps * steady == pytest.approx(3.0, rel=0.05)
    md = (out / "compare.md").read_text()
    assert "CPU clock" in md and "1 thread(s)" in md and "Load average" in md
    with pytest.raises(SystemExit) as e:  # argparse's own exit 2, one usage line
        main(["compare", str(cfg), "--budget-clock", "sundial", "--out", str(out)])
    assert e.value.code == 2
    assert "invalid choice: 'sundial'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--budget-minutes", "0"], "--budget-minutes 0: give the training time per trial in minutes, above 0"),
    (["--budget-minutes", "5", "--timeout", "1"], "--timeout of 1.0 min is too small for one run: one trial "
                                                   "(5 min of training on the cpu clock"),
])
def test_search_budget_mistakes_are_one_message_before_any_trial(tiny_bert, tmp_path, capsys, extra, match):
    from slimtune.cli.main import main

    out = tmp_path / "s"
    rc = main(["search", str(_config(tmp_path, tiny_bert)), "--trials", "2", "--out", str(out)] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err
    assert not (out / "trials").exists()
