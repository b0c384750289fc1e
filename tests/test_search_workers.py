"""`slimtune search --storage URL --workers N` on tiny random models: two workers on one study in a
real PostgreSQL server (started here with initdb / pg_ctl on 127.0.0.1, a free port, a temp dir) and
in an Optuna journal file; the count is exact, a resumed search continues it, a SIGKILLed worker's
trial is failed by the heartbeat and run again once, and each bad storage input is one message."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest_train import sentiment_rows, tiny_bert, write_jsonl  # noqa: F401

optuna = pytest.importorskip("optuna")

from slimtune.search.study import SearchOptions, run_search  # noqa: E402
from slimtune.train.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


class PG(str):
    """The server's URL, with `ctl("stop" | "start")`."""

    def __new__(cls, url: str, ctl):
        self = super().__new__(cls, url)
        self.ctl = ctl
        return self


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server: initdb in a temp dir, trust auth on 127.0.0.1 only, a free port.
    As root the server runs as the `postgres` user (PostgreSQL refuses root), via runuser."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup.sh installs Debian's postgresql)")
    root = os.geteuid() == 0
    as_user = ["runuser", "-u", "postgres", "--"] if root else []
    d = Path(tempfile.mkdtemp(prefix="slimtune-pg-"))
    if root:
        shutil.chown(d, "postgres")
    port = _free_port()
    run = dict(check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=120)
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(d / "data"), "-U", "slimtune", "--auth=trust",
                    "-E", "UTF8"], **run)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(d / "data"), "-l", str(d / "server.log"), "-w",
                    "-t", "60", "-o", f"-p {port} -h 127.0.0.1 -k {d} -c fsync=off", "start"], **run)
    def ctl(action: str) -> None:  # stop / start the server (a test of a worker losing it)
        opts = ["-m", "immediate"] if action == "stop" else ["-l", str(d / "server.log"), "-o",
                                                               f"-p {port} -h 127.0.0.1 -k {d} -c fsync=off"]
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(d / "data"), "-w", "-t", "60", *opts, action], **run)

    try:
        yield PG(f"postgresql://slimtune@127.0.0.1:{port}/postgres", ctl)
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(d / "data"), "-m", "immediate", "-w", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def _config(tmp_path: Path, model: Path, steps: int = 6, **search) -> Path:
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(80))
    d = {"model": str(model), "task": "classification", "method": "lora",
         "data": {"train": str(data), "max_length": 24},
         "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, "eval_every": 3, "log_every": 3, "cpu_threads": 1,
                   "precision": "fp32"},
         "eval": {"batch_size": 32}, "output_dir": str(tmp_path / "run"),
         "search": {"methods": ["lora"], "r": [2, 4], "targets": ["attention", "all-linear"], "layers": ["all"],
                    "dropout": 0.0, "lr": {"low": 1e-3, "high": 3e-2, "log": True}, "pruner": "none", **search}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _states(storage, name: str = "slimtune-search") -> list[str]:
    return [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]


def _wait_for_the_worker(out: Path, monkeypatch) -> None:
    """This process starts its first trial once the worker it started has joined (its start-up, ~10-30 s
    on a loaded CI machine, would otherwise outlast these tiny trials)."""
    import slimtune.search.trial as S

    one_trial, waited = S.one_trial, []

    def after_the_worker_joined(*a, **kw):
        log = out / "workers" / "worker-1.log"
        deadline = time.time() + 180
        while not waited and time.time() < deadline and "joined the study" not in (log.read_text() if log.is_file() else ""):
            time.sleep(0.2)
        waited.append(True)
        return one_trial(*a, **kw)

    monkeypatch.setattr(S, "one_trial", after_the_worker_joined)


def _two_workers_complete_and_resume(cfg_path: Path, out: Path, url: str, storage, monkeypatch) -> None:
    _wait_for_the_worker(out, monkeypatch)
    lines: list[str] = []
    t0 = time.time()
    s = run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=3, workers=2, storage=url,
                                                              heartbeat_s=2), log=lines.append)
    print(f"2 workers, 3 trials: {time.time() - t0:.0f} s")
    st = optuna.load_study(study_name="slimtune-search", storage=storage)
    assert [t.state.name for t in st.trials].count("COMPLETE") == 3 and len(st.trials) <= 4, _states(storage)
    # both processes ran trials (the second's log names them), and every trial ran once: one folder each
    assert any("started 1 more worker" in x for x in lines)
    worker_log = (out / "workers" / "worker-1.log").read_text()
    assert "worker stopped: 3 trials done" in worker_log, worker_log
    assert len({t.user_attrs["worker"] for t in st.trials if t.state.name == "COMPLETE"}) == 2, worker_log
    ran = [t.number for t in st.trials if t.state.name == "COMPLETE"]
    # each process draws its own points (its own sampler seed): no two trials share a learning rate
    assert len({st.trials[n].params["lr"] for n in ran}) == len(ran)
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-{n:04d}" for n in sorted(ran)]
    assert s["best"].number in ran and (out / "best.yaml").is_file()
    assert f"storage {url.split('://')[0]}" in (out / "search.md").read_text()  # the shared store, not study.db
    # resume: the same command with a higher count continues the study
    run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=5, workers=2, storage=url, heartbeat_s=2),
               log=lines.append)
    states = _states(storage)
    assert states.count("COMPLETE") == 5 and "RUNNING" not in states and "WAITING" not in states, states


@pytest.mark.slow
def test_two_workers_on_postgresql_complete_and_resume(tiny_bert, tmp_path, postgres_url, monkeypatch):
    cfg_path = _config(tmp_path, tiny_bert, steps=12)
    _two_workers_complete_and_resume(cfg_path, tmp_path / "pg", str(postgres_url),
                                     postgres_url.replace("postgresql://", "postgresql+psycopg://"), monkeypatch)


@pytest.mark.slow
def test_two_workers_on_a_journal_file_and_a_killed_workers_trial_runs_again(tiny_bert, tmp_path):
    """A worker started alone (as on another machine) is SIGKILLed during its trial: the next search's
    workers find its heartbeat stale, fail the trial, and run its parameters again exactly once."""
    cfg_path = _config(tmp_path, tiny_bert, steps=24)
    journal = tmp_path / "shared" / "search.log"
    url = f"journal:{journal}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    other = tmp_path / "other-machine"
    p = subprocess.Popen([sys.executable, "-m", "slimtune", "search", str(cfg_path), "--out", str(other), "--trials",
                          "2", "--storage", url, "--heartbeat", "1"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    marker = other / "trials" / "trial-0000" / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and p.poll() is None and not marker.is_file():
            time.sleep(0.2)
        assert p.poll() is None and marker.is_file(), "the first trial never started"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    assert _states(storage) == ["RUNNING"]
    killed = optuna.load_study(study_name="slimtune-search", storage=storage).trials[0].params
    out = tmp_path / "here"
    run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=2, workers=2, storage=url, heartbeat_s=1),
               log=lambda m: None)
    st = optuna.load_study(study_name="slimtune-search", storage=storage)
    states = [t.state.name for t in st.trials]
    assert states[0] == "FAIL" and states.count("COMPLETE") == 2 and "RUNNING" not in states, states
    retries = [t for t in st.trials if t.user_attrs.get("retry_of") == 0]
    assert len(retries) == 1 and retries[0].params == killed and retries[0].state.name == "COMPLETE"


@pytest.mark.slow
def test_two_workers_under_a_cpu_clock_budget_rank_at_equal_time(tiny_bert, tmp_path, monkeypatch):
    """--workers 2 with --budget-minutes on a journal file: each trial's steps come from its own step
    time on the CPU clock, timed in whichever process runs it and re-planned by the run itself; the
    count is exact, both processes ran trials, and best.yaml trains the pick's own budget."""
    cfg_path = _config(tmp_path, tiny_bert, steps=6)
    url = f"journal:{tmp_path / 'shared' / 'search.log'}"
    out = tmp_path / "budget"
    _wait_for_the_worker(out, monkeypatch)
    run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=out, trials=4, workers=2, storage=url, heartbeat_s=2,
                                                          budget_min=0.5 / 60, clock="cpu"), log=lambda m: None)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "shared" / "search.log")))
    st = optuna.load_study(study_name="slimtune-search", storage=storage)
    done = [t for t in st.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and "RUNNING" not in _states(storage), _states(storage)
    for t in done:
        plan = t.user_attrs["budget_plan"]
        assert plan["clock"] == "cpu" and plan["steps"] >= 1
        # the run re-planned its length on its own steady steps (train/clock_budget.py): the budget's
        # 0.5 s of CPU clock at the step it ran, whatever the timing run guessed
        res = t.user_attrs["result"]
        steady = (res["session_cpu_s"] - res["first_step_cpu_s"]) / (res["steps"] - 1)
        assert res["steps"] == res["total_steps"] and res["steps"] * steady == pytest.approx(0.5, rel=0.1)
    assert len({t.user_attrs["worker"] for t in done}) == 2, "both processes ran trials"
    best = yaml.safe_load((out / "best.yaml").read_text())
    pick = (max if st.direction.name == "MAXIMIZE" else min)(done, key=lambda t: t.value)
    assert best["train"]["max_steps"] == pick.user_attrs["budget_plan"]["steps"]
    assert "trials ranked at equal training time" in (out / "search.md").read_text()


def _cli(argv, capsys):
    from slimtune.cli.main import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def test_bad_storage_input_is_one_message(tiny_bert, tmp_path, capsys):
    cfg_path = _config(tmp_path, tiny_bert)
    base = ["search", str(cfg_path), "--out", str(tmp_path / "bad"), "--trials", "2"]
    cases = [
        (["--storage", f"postgresql://u@127.0.0.1:{_free_port()}/db"], "cannot reach the server"),
        (["--storage", "postgres://u@127.0.0.1/db"], "write the scheme as postgresql://"),
        (["--storage", "mongodb://h/db"], "unknown storage; give postgresql://"),
        (["--storage", f"journal:{tmp_path}"], "is a folder; name a file"),
        (["--workers", "3"], "--workers 3 is more than the 2 trial(s) left"),
        (["--workers", "0"], "give 1 or more worker processes"),
    ]
    for extra, match in cases:
        rc, err = _cli([*base, *extra], capsys)
        assert rc == 2 and match in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "bad" / "trials").exists()


def test_a_study_of_another_config_in_a_shared_store_is_refused(tiny_bert, tmp_path, capsys):
    cfg_path = _config(tmp_path, tiny_bert, steps=3)
    url = f"journal:{tmp_path / 'j.log'}"
    run_search(load_config(str(cfg_path)), SearchOptions(seeds=1, out=tmp_path / "a", trials=1, storage=url), log=lambda m: None)
    rc, err = _cli(["search", str(cfg_path), "data.max_length=20", "--out", str(tmp_path / "b"), "--trials", "2",
                    "--storage", url], capsys)
    assert rc == 2 and "holds a search of another config" in err and "data.max_length: 24 -> 20" in err, err
    assert "--study NAME" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_worker_losing_the_database_stops_cleanly_and_its_trial_runs_again(tiny_bert, tmp_path, postgres_url):
    """The server stops (immediate shutdown) while a trial trains: the worker's heartbeat fails, the
    trial stops at its next evaluation and the search ends with one message, telling nothing. With
    the server back, the same command finds the trial stale, fails it and runs its parameters again,
    continuing the run from the checkpoint it stopped at."""
    import threading

    from slimtune.search.space import SearchError

    cfg_path = _config(tmp_path, tiny_bert, steps=60)
    out = tmp_path / "lost"
    opts = SearchOptions(seeds=1, out=out, trials=1, storage=str(postgres_url), heartbeat_s=1, study="lost-db")
    marker = out / "trials" / "trial-0000" / "metrics.jsonl"

    def stop_when_training() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not marker.is_file():
            time.sleep(0.1)
        postgres_url.ctl("stop")

    th = threading.Thread(target=stop_when_training)
    th.start()
    try:
        with pytest.raises(SearchError, match=r"trial 0 stopped: this worker lost the study storage .* runs again"):
            run_search(load_config(str(cfg_path)), opts, log=lambda m: None)
    finally:
        th.join()
        postgres_url.ctl("start")
    # the folder stays, with the checkpoint of the evaluation where the trial stopped, for the retry
    kept = sorted((out / "trials" / "trial-0000" / "checkpoints").glob("step-*"))
    assert kept
    at = int(kept[-1].name.split("-")[1])
    storage = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    assert _states(storage, "lost-db") == ["RUNNING"]  # nothing was told: the store fails it as stale
    killed = optuna.load_study(study_name="lost-db", storage=storage).trials[0].params
    run_search(load_config(str(cfg_path)), opts, log=lambda m: None)
    st = optuna.load_study(study_name="lost-db", storage=storage)
    assert [t.state.name for t in st.trials] == ["FAIL", "COMPLETE"]
    assert st.trials[1].user_attrs["retry_of"] == 0 and st.trials[1].params == killed
    # continued from that checkpoint, not trained again from step 0
    assert st.trials[1].user_attrs["continued_at"] == at and st.trials[1].user_attrs["result"]["resumed_at"] == at
    assert not (out / "trials" / "trial-0000").exists()
