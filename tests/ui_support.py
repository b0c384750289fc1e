"""Shared by the UI tests: a tiny finished run, the UI on a free loopback port in a thread, HTTP calls."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest_train import sentiment_rows, write_jsonl

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = None if CHROMIUM and DRIVER else ("needs Debian's chromium and chromium-driver (scripts/setup.sh installs "
                                              "them: apt-get install chromium chromium-driver)")
# the browser tests' screenshots: a temporary folder, so the suite leaves the work tree as it found it;
# `SLIMTUNE_SCREENSHOTS=docs pytest tests/test_ui_browser.py tests/test_ui_playground.py tests/test_ui_audio.py` remakes the
# README's (docs/ui_*.png)
DOCS = Path(os.environ["SLIMTUNE_SCREENSHOTS"]).resolve() if os.environ.get("SLIMTUNE_SCREENSHOTS") else \
    Path(tempfile.mkdtemp(prefix="slimtune-ui-shots-"))


def run_yaml(model: Path, data: Path, out: str, steps: int = 4, extra: str = "") -> str:
    """A tiny classification job (fp32 pinned: the same numbers on any CPU)."""
    return (f"model: {model}\ndata: {{train: {data}, max_length: 32}}\n"
            f"train: {{max_steps: {steps}, batch_size: 4, lr: 1.0e-2, eval_every: 2, log_every: 1, cpu_threads: 1, "
            f"precision: fp32{extra}}}\neval: {{max_examples: 8}}\noutput_dir: {out}\n")


def broken_run(root: Path) -> Path:
    """A run folder caught being written or corrupt: a cut metrics line, half a summary, a junk lock."""
    bad = root / "broken"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    (bad / "summary.json").write_text('{"status": "fini')
    (bad / ".slimtune.lock").write_text("not json")
    return bad


def finished_run(root: Path, model: Path, name: str = "done") -> Path:
    from slimtune.train.config import load_config
    from slimtune.train.run import run_train

    data = write_jsonl(root.parent / "d.jsonl", sentiment_rows(40))
    cfg_path = root.parent / f"{name}.yaml"
    cfg_path.write_text(run_yaml(model, data, str(root / name)))
    run_train(load_config(str(cfg_path)), log=lambda m: None, progress=False)
    return root / name


@contextlib.contextmanager
def ui_server(root: Path, token: str | None = None, serve_url: str | None = None):
    """The UI app under uvicorn on 127.0.0.1:<free port>, in a thread; stops (and stops its runs) on exit."""
    import uvicorn

    from slimtune.ui.app import build_app

    app = build_app(root, token, serve_url)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        app.state.jobs.close()
        server.should_exit = True
        t.join(10)
        sock.close()


def call(base: str, path: str, body=None, headers=None, raw: bool = False):
    """(status, JSON or bytes) of a GET, or a JSON POST when body is given."""
    h = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(base + path, data=data, headers=h, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            b = r.read()
            return r.status, (b if raw else json.loads(b))
    except urllib.error.HTTPError as e:
        b = e.read()
        return e.code, (b if raw else json.loads(b or b"{}"))


def wait_for(fn, timeout: float, what: str, every: float = 0.3):
    """Poll fn() until it returns something truthy (bounded)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def serve_process(tmp: Path):
    """A real slimtune server (make_server + its FastAPI app under uvicorn, in a thread, on a free
    loopback port): the tiny Llama base, adapters `lora-a` / `lora-b` and an A/B route `ab` over them;
    yields its URL. In-process: a second interpreter loading torch costs the suite ~30 s on 2 cores."""
    import uvicorn

    from serve_support import build, load_base
    from slimtune.serve import ServeConfig, build_app, make_server

    base, ads = build(tmp, ["lora-a", "lora-b"])
    model, tok = load_base(base)
    srv = make_server(model, tok, ServeConfig(), {n: str(p) for n, p in ads.items()},
                      routes={"ab": {"lora-a": 0.5, "lora-b": 0.5}})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(srv), log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        wait_for(lambda: server.started, 30, "slimtune serve to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(30)
        sock.close()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Debian chromium under Selenium, a fresh profile, no network of its own."""
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1400,1000"):
        o.add_argument(a)
    d = webdriver.Chrome(options=o, service=Service(DRIVER))
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()
