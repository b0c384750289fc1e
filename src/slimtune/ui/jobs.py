"""The new-run form and the processes the page starts and stops.

A new run is a YAML text (the form writes it; the page shows it and lets it be edited). Before
anything starts it goes through the job's own loader (`train.config.load_config`: the messages the
CLI prints), then the run-folder rules (its output_dir must lie under the runs folder; a folder that
holds a run is refused as `slimtune train` refuses it). It then starts as
`python -m slimtune train FILE --no-progress`: an argument list, never a shell, so nothing typed in
the form is ever interpreted as a command. Stop = SIGINT to the process holding the run's lock
(Ctrl-C: it checkpoints, writes its report and exits); resume = `slimtune train RUN --resume`.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..train.config import JobConfig, JobConfigError, load_config, yaml_error, yaml_load
from ..train.rundir import describe, is_run
from . import runs

UI_DIR = ".ui"  # under the runs folder: the configs the form wrote and the output of the processes it started
SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class FormError(ValueError):
    """A new-run config that cannot start; the message is the job's own (or says which key to change)."""


def slug(name: str) -> str:
    """A file name for a run's name: readable, and distinct for distinct names (a hash of the whole
    name: two names alike in their first 60 characters, or differing only in symbols, get two files)."""
    return f"{SAFE.sub('_', name)[:60]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def form_yaml(form: dict[str, Any]) -> str:
    """The YAML of the form's fields (model, task, data, method and its main keys, steps, lr, output)."""
    def num(k: str, cast=float):
        v = form.get(k)
        if v in (None, ""):
            return None
        try:
            return cast(v)
        except (TypeError, ValueError):
            raise FormError(f"{k}: '{v}' is not a number") from None

    cfg: dict[str, Any] = {"model": form.get("model") or "smollm2-135m", "task": form.get("task") or "auto"}
    method: dict[str, Any] = {"name": form.get("method") or "lora"}
    for k in ("r", "alpha"):
        v = num(f"method.{k}", int)
        if v is not None:
            method[k] = v
    cfg["method"] = method if len(method) > 1 else method["name"]
    data = form.get("data") or ""
    cfg["data"] = {"train": data} if ("/" in data or "." in data) else {"builtin": data or "rotten_tomatoes_plot"}
    train: dict[str, Any] = {}
    for k, cast in (("max_steps", int), ("lr", float), ("batch_size", int)):
        v = num(f"train.{k}", cast)
        if v is not None:
            train[k] = v
    if form.get("train.precision"):
        train["precision"] = form["train.precision"]
    if train:
        cfg["train"] = train
    cfg["output_dir"] = form.get("output_dir") or "new-run"
    return yaml.safe_dump(cfg, sort_keys=False)


def check(root: Path, text: str) -> tuple[JobConfig, Path, Path]:
    """Validate a new run's YAML: (config, its run folder, the config file written for it)."""
    try:
        data = yaml_load(text)
    except yaml.YAMLError as e:
        raise FormError(f"the YAML does not parse: {yaml_error(e)}") from None
    if not isinstance(data, dict):
        raise FormError("the top level must be a mapping of keys (model:, method:, data:, ...)")
    rel = str(data.get("output_dir") or "")
    try:
        out = runs.inside(root, rel)
    except runs.OutsideRoot as e:
        raise FormError(f"output_dir: {e}; give a folder name under {root} (e.g. output_dir: my-run)") from None
    if out == root.resolve():
        raise FormError("output_dir: give a sub-folder of the runs folder, not the runs folder itself")
    data["output_dir"] = str(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg_dir = root / UI_DIR / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    path = cfg_dir / f"{slug(rel)}-{stamp}-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        cfg = load_config(str(path))  # the job's own checks: the same messages as `slimtune train`
    except JobConfigError as e:
        path.unlink(missing_ok=True)
        raise FormError(str(e).replace(str(path), "the config")) from None
    if runs.holder(out) is not None:
        path.unlink(missing_ok=True)
        raise FormError(f"output_dir '{rel}' is in use by a running run; stop it first or choose another output_dir")
    if is_run(out) and not cfg.overwrite and not cfg.resume:
        path.unlink(missing_ok=True)
        raise FormError(f"output_dir '{rel}' already holds a run ({describe(out)}); choose another output_dir, or "
                        "add overwrite: true to replace it (resume: true to continue it)")
    return cfg, out, path


class Jobs:
    """The processes this page started (so their start-up output and exit codes can be shown)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[Path, tuple[subprocess.Popen, Path]] = {}

    def _spawn(self, out: Path, args: list[str]) -> dict[str, Any]:
        logs = self.root / UI_DIR / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{slug(runs.name(self.root, out))}.log"
        # Stop is this run's Ctrl-C even when the page itself ignores SIGINT (nohup, a script's & job),
        # which the child would inherit through exec (cli/main.answer_ctrl_c)
        env = dict(os.environ, PYTHONUNBUFFERED="1", SLIMTUNE_ANSWER_CTRL_C="1")
        with open(log, "ab") as f:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen([sys.executable, "-m", "slimtune", "train", *args, "--no-progress"],
                                 stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)  # its own session: the page's Ctrl-C is not the run's
        self.procs[out.resolve()] = (p, log)
        return {"pid": p.pid, "name": runs.name(self.root, out)}

    def start(self, text: str) -> dict[str, Any]:
        _, out, path = check(self.root, text)
        if self._alive(out):  # started a moment ago, before its process took the folder's lock
            path.unlink(missing_ok=True)
            raise FormError(f"'{runs.name(self.root, out)}' was just started from this page; it is loading")
        return self._spawn(out, [str(path)])

    def resume(self, out: Path) -> dict[str, Any]:
        e = self.procs.get(out.resolve())
        if e is not None and runs.holder(out) is None:  # stopped: it released the lock and is exiting
            try:
                e[0].wait(15)
            except subprocess.TimeoutExpired:
                pass
        if runs.holder(out) is not None or self._alive(out):
            raise FormError(f"'{runs.name(self.root, out)}' is running; nothing to resume")
        if not (out / "config.yaml").is_file():
            raise FormError(f"'{runs.name(self.root, out)}' has no config.yaml (it stopped before training began); "
                            "start it again from the New run form")
        return self._spawn(out, [str(out), "--resume"])

    def stop(self, out: Path) -> dict[str, Any]:
        """Ctrl-C for the run's process: it finishes the step, checkpoints, writes its report, exits."""
        h = runs.holder(out)
        pid = h["pid"] if h else (self.procs[out.resolve()][0].pid if self._alive(out) else None)
        if pid is None:
            raise FormError(f"'{runs.name(self.root, out)}' is not running")
        os.kill(pid, signal.SIGINT)
        return {"pid": pid, "signal": "SIGINT"}

    def _alive(self, out: Path) -> bool:
        p = self.procs.get(out.resolve())
        return p is not None and p[0].poll() is None

    def reap(self) -> None:
        """Collect exit codes (no zombies)."""
        for p, _ in self.procs.values():
            p.poll()

    def launched(self, out: Path) -> dict[str, Any] | None:
        """What the page knows about a process it started for this folder: exit code and output tail."""
        e = self.procs.get(out.resolve())
        if e is None:
            return None
        p, log = e
        try:
            tail = log.read_text(errors="replace")[-3000:]
        except OSError:
            tail = ""
        return {"pid": p.pid, "returncode": p.poll(), "output": tail}

    def pending(self) -> list[Path]:
        """Folders of processes still starting (no run files yet), so the table shows them at once."""
        self.reap()
        return [o for o, (p, _) in self.procs.items() if p.returncode is None or not is_run(o)]

    def close(self, timeout: float = 30.0) -> None:
        """Stop what this page started (tests, and a page run inside another program)."""
        for p, _ in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        t = time.time() + timeout
        for p, _ in self.procs.values():
            try:
                p.wait(max(0.1, t - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
