"""A run owns its folder: the lock (real processes), refusing another run's folder, --overwrite,
resume with a changed config, --resume-weights-only, and cleaning up what a killed run left."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest_train import instruction_rows, sentiment_rows, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from slimtune.cli.main import main
from slimtune.train.rundir import LOCK_NAME, RunFolderError, RunLock


def _cfg(tmp_path, model, rows=None, name="c.yaml", out="run", extra=""):
    data = write_jsonl(tmp_path / "d.jsonl", rows or sentiment_rows(40))
    p = tmp_path / name
    p.write_text(f"model: {model}\ndata: {{train: {data}, max_length: 32}}\n"
                 "train: {max_steps: 4, batch_size: 4, lr: 1.0e-2, eval_every: 2, cpu_threads: 1}\n"
                 f"eval: {{max_new_tokens: 2, max_examples: 4}}\noutput_dir: {tmp_path / out}\n{extra}")
    return p


def _cli(args, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in args] + ["--no-progress"])
    err = capsys.readouterr().err
    return rc, err


def _one_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path):
    a = RunLock(tmp_path)
    assert a.acquire() is None
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"]
    with pytest.raises(RunFolderError, match=rf"in use by another slimtune run: pid {os.getpid()}"):
        RunLock(tmp_path).acquire()  # a second open file description: flock refuses it
    a.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # a lock file whose process is gone (SIGKILL leaves the file; the kernel drops the flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "x"}))
    b = RunLock(tmp_path)
    prev = b.acquire()
    assert prev["pid"] == dead.pid
    b.release()


@pytest.mark.slow
@contextlib.contextmanager
def _ctrl_c_as_from_a_terminal():
    """Children started inside this block get Ctrl-C's default disposition, as from a terminal.

    The suite itself may run with SIGINT ignored (`nohup`, or `make test &` in a script: a shell
    ignores SIGINT for its background jobs), and an ignored SIGINT is inherited, which slimtune
    deliberately keeps (interrupt.StopRequest). A Python handler is not inherited: exec resets
    it to SIG_DFL, so installing Python's default one around Popen gives the child a live Ctrl-C."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def test_two_real_processes_one_folder(tiny_llama, tmp_path, capsys):
    """Run A trains in a real process; run B (this process) refuses the folder naming A's pid and the
    fix; Ctrl-C stops A with a checkpoint and its report; the folder then refuses a fresh run."""
    cfg = _cfg(tmp_path, tiny_llama, instruction_rows(40))
    text = cfg.read_text().replace("max_steps: 4", "max_steps: 100000, warmup_steps: 0").replace("eval_every: 2", "eval_every: 50")
    cfg.write_text(text)
    run = tmp_path / "run"
    with _ctrl_c_as_from_a_terminal():
        a = subprocess.Popen([sys.executable, "-m", "slimtune", "train", str(cfg), "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoints").is_dir():  # A is training
            assert a.poll() is None, a.communicate()
            time.sleep(0.1)
        rc, err = _cli(["train", cfg], capsys)
        msg = _one_error(err)
        assert rc == 2 and f"in use by another slimtune run: pid {a.pid}" in msg and "another output_dir" in msg
        assert f"kill {a.pid}" in msg
        a.send_signal(signal.SIGINT)
        out, err_a = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 130, err_a
    assert "checkpoint" in err_a and "--resume` continues" in err_a and "Traceback" not in err_a
    report = (run / "report.md").read_text()
    assert "**Interrupted** (Ctrl-C) at step" in report
    steps = {json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert steps and not (run / LOCK_NAME).exists()
    rc, err = _cli(["train", cfg], capsys)
    msg = _one_error(err)
    assert rc == 2 and "already holds a run (interrupted at step" in msg and "--resume" in msg and "--overwrite" in msg


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_report(tiny_llama, tmp_path):
    cfg = _cfg(tmp_path, tiny_llama, instruction_rows(40))
    cfg.write_text(cfg.read_text().replace("max_steps: 4", "max_steps: 100000, warmup_steps: 0").replace("eval_every: 2", "eval_every: 20"))
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "slimtune", "train", str(cfg), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoints").is_dir():
            assert p.poll() is None, p.communicate()
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143 and "interrupted (SIGTERM) at step" in err, err
    summary = json.loads((run / "summary.json").read_text())
    ck = Path(summary["last_checkpoint"])
    assert summary["status"] == "interrupted" and ck.name == f"step-{summary['steps']:06d}" and ck.is_dir()


def test_finished_run_refuses_then_overwrite_and_resume(tiny_bert, tmp_path, capsys):
    cfg = _cfg(tmp_path, tiny_bert)
    assert _cli(["train", cfg], capsys)[0] == 0
    rc, err = _cli(["train", cfg], capsys)
    assert rc == 2 and "already holds a run (finished at step 4 of 4" in _one_error(err)
    rc, err = _cli(["train", cfg, "--resume"], capsys)  # same config, finished: nothing to do, no error
    assert rc == 0
    rc, err = _cli(["train", cfg, "--overwrite"], capsys)
    assert rc == 0
    log = (tmp_path / "run/train.log").read_text()
    assert "overwrite: removed the earlier run" in log


def test_resume_with_changed_config_names_keys_and_weights_only(tiny_bert, tmp_path, capsys):
    cfg = _cfg(tmp_path, tiny_bert)
    assert _cli(["train", cfg], capsys)[0] == 0
    run = tmp_path / "run"
    rc, err = _cli(["train", cfg, "--resume", "train.lr=1e-3", "method.r=4"], capsys)
    msg = _one_error(err)
    assert rc == 2 and "train.lr: 0.01 -> 0.001" in msg and "method.r: '(not set)' -> 4" in msg
    assert "--resume-weights-only" in msg and "fresh output_dir" in msg
    # the tensors do not fit (rank 8 -> 4): refused, and the folder stays as it was
    before = sorted(p.name for p in run.iterdir())
    rc, err = _cli(["train", cfg, "--resume-weights-only", "method.r=4"], capsys)
    assert rc == 2 and "is (8, 32) there but (4, 32) here" in _one_error(err)
    assert sorted(p.name for p in run.iterdir()) == before
    # same shapes, new schedule: the old run moves to previous/, the new one starts from its weights
    rc, err = _cli(["train", cfg, "--resume-weights-only", "train.max_steps=6", "train.lr=1e-3"], capsys)
    assert rc == 0
    assert (run / "previous/checkpoints/step-000004").is_dir() and (run / "previous/report.md").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["status"] == "finished"
    assert "trained weights from" in (run / "train.log").read_text()


def test_resume_by_run_folder_and_bad_checkpoint_paths(tiny_bert, tmp_path, capsys):
    cfg = _cfg(tmp_path, tiny_bert)
    assert _cli(["train", cfg], capsys)[0] == 0
    run = tmp_path / "run"
    rc, err = _cli(["train", run, "--resume"], capsys)  # a run folder as CONFIG: its own config.yaml
    assert rc == 0
    rc, err = _cli(["train", cfg, f"resume={tmp_path}"], capsys)
    assert rc == 2 and "is not a slimtune checkpoint" in _one_error(err)
    rc, err = _cli(["train", cfg, f"resume={tmp_path / 'nope'}"], capsys)
    assert rc == 2 and "does not exist" in _one_error(err)
    (tmp_path / "plain").mkdir()
    rc, err = _cli(["train", tmp_path / "plain"], capsys)
    assert rc == 2 and "is a folder but not a slimtune run" in _one_error(err)


def test_killed_leftovers_are_cleaned_at_next_start(tiny_bert, tmp_path, capsys):
    cfg = _cfg(tmp_path, tiny_bert, extra="")
    assert _cli(["train", cfg], capsys)[0] == 0
    run = tmp_path / "run"
    ck = run / "checkpoints"
    (ck / ".tmp-step-000006-abc").mkdir()
    (ck / ".tmp-step-000006-abc/adapter_model.safetensors").write_bytes(b"half")
    (ck / "step-000009").mkdir()  # a prune cut short: no trainer_state.pt
    (run / ".tmp-best-xyz").mkdir()
    os.replace(run / "best", run / ".tmp-old-best-123")  # killed between moving best aside and the new in
    rc, err = _cli(["train", cfg, "--resume"], capsys)
    assert rc == 0
    log = (run / "train.log").read_text()
    assert "removed 3 unfinished checkpoint folder(s)" in log and "restored best/" in log
    assert (run / "best/adapter_model.safetensors").is_file()
    assert not list(ck.glob(".tmp*")) and not (ck / "step-000009").exists() and not list(run.glob(".tmp*"))


def test_a_run_that_saved_nothing_is_replaced(tiny_bert, tmp_path, capsys):
    cfg = _cfg(tmp_path, tiny_bert)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    (run / "metrics.jsonl").write_text("")
    rc, _ = _cli(["train", cfg], capsys)
    assert rc == 0 and "replaced an earlier run" in (run / "train.log").read_text()


@pytest.mark.parametrize("where,msg", [
    ("file", "is a file, not a folder"),
    ("file/sub", "'{tmp}/file' is a file, not a folder"),
    ("/sys/slimtune-x", "cannot create output_dir '/sys/slimtune-x'"),
])
def test_output_dir_that_cannot_be_used(tiny_bert, tmp_path, capsys, where, msg):
    (tmp_path / "file").write_text("x")
    out = where if where.startswith("/") else tmp_path / where
    cfg = _cfg(tmp_path, tiny_bert)
    rc, err = _cli(["train", cfg, f"output_dir={out}"], capsys)
    assert rc == 2 and msg.format(tmp=tmp_path) in _one_error(err)
