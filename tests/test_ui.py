"""slimtune ui: the runs page's API over real run folders, the new-run form's checks, the security
rules, an Optuna study read back, the command as a process. Starting, watching, stopping and resuming
a real `slimtune train` from the page: tests/test_ui_browser.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest_train import sentiment_rows, tiny_bert, write_jsonl  # noqa: F401
from ui_support import broken_run, call, finished_run, run_yaml, ui_server, wait_for

from slimtune.cli.main import main


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_bert):  # noqa: F811
    base = tmp_path_factory.mktemp("ui")
    root = base / "runs"
    root.mkdir()
    finished_run(root, tiny_bert)
    # a folder being written / corrupt: a cut metrics line, half a summary, a lock of a dead process
    broken_run(root)
    failed = root / "failed"
    failed.mkdir()
    (failed / "config.yaml").write_text("model: x\n")
    (failed / "train.log").write_text("\n=== 2026 slimtune train\nerror: Traceback (most recent call last):\n"
                                      "  File x\nValueError: the data file has no rows\n")
    (base / "secret.md").write_text("the secret 7f3a9c")
    os.symlink(base / "secret.md", root / "done" / "link.md")
    return root


def test_runs_page_lists_states_and_survives_corrupt_folders(root):
    from slimtune.train.lock import RunLock

    busy = root / "busy"
    busy.mkdir()
    (busy / "metrics.jsonl").write_text('{"step": 1, "loss": 1.5, "lr": 0.001}\n')
    (busy / "train.log").write_text("\n=== 2026 slimtune train\nstep 1/50: loss 1.5000, lr 1.00e-03\n")
    lock = RunLock(busy)  # held by a live process (this one): the run is training
    lock.acquire()
    try:
        with ui_server(root) as (base, _):
            st, d = call(base, "/api/runs")
            b = {r["name"]: r for r in d["runs"]}["busy"]
            assert b["status"] == "running" and (b["step"], b["total_steps"]) == (1, 50) and b["wall_s"] >= 0
    finally:
        lock.release()
    with ui_server(root) as (base, _):
        st, d = call(base, "/api/runs")
        assert {r["name"]: r for r in d["runs"]}["busy"]["status"] == "interrupted"  # lock gone, no summary
        assert st == 200
        rows = {r["name"]: r for r in d["runs"]}
        done = rows["done"]
        assert done["status"] == "finished" and done["total_steps"] == 4 and done["step"] == 4
        assert done["metric"] == "accuracy" and 0 <= done["best"] <= 1 and 0 < done["trainable_pct"] < 100
        assert done["peak_mem_mb"] > 0 and done["wall_s"] > 0
        assert rows["broken"]["status"] == "interrupted" and rows["broken"]["loss"] == 2.5
        assert rows["failed"]["status"] == "failed" and "no rows" in rows["failed"]["why"]
        st, r = call(base, "/api/run?name=done")
        assert st == 200 and [x["step"] for x in r["records"] if "loss" in x] == [1, 2, 3, 4]
        assert "<table>" in r["report_html"] and r["plot"] == "done/plot.png"
        st, png = call(base, "/api/file?path=done/plot.png", raw=True)
        assert st == 200 and png[:4] == b"\x89PNG"
        st, page = call(base, "/", raw=True)
        assert st == 200 and b"/static/plotly.min.js" in page
        st, js = call(base, "/static/plotly.min.js", raw=True)
        assert st == 200 and len(js) > 1_000_000  # served from the plotly package, not a CDN


@pytest.mark.parametrize("path", ["../secret.md", "/etc/passwd", "done/link.md", "done/.slimtune.lock",
                                  "done/../../secret.md", "done/adapter/adapter_model.safetensors",
                                  "outlink/secret.md", "..%2Fsecret.md", "done/%00/../../secret.md",
                                  ".ui/logs/x.log"])
def test_no_file_outside_the_runs_folder(root, path):
    if not (root / "outlink").is_symlink():
        os.symlink(root.parent, root / "outlink")  # a folder link that leads out of the runs folder
    with ui_server(root) as (base, _):
        st, d = call(base, f"/api/file?path={path}")
        assert st == 404 and "error" in d
        assert b"7f3a9c" not in call(base, f"/api/file?path={path}", raw=True)[1]  # secret.md's content
        for q in ("/api/run?name=../", "/api/run?name=outlink", "/api/study?name=..", "/api/study?name=/etc",
                  "/static/..%2F..%2Fui%2Fapp.py", "/static/index.html"):
            st, d = call(base, q)
            assert st == 404, q
        st, d = call(base, "/api/resume", {"name": "../"})
        assert st == 404


def test_folder_links_out_of_the_runs_folder_are_not_followed(tmp_path):
    """A link in the runs folder to a run elsewhere (or to a folder above) lists nothing outside, and the
    page still answers (it once failed whole with a 500)."""
    root = tmp_path / "runs"
    root.mkdir()
    out = tmp_path / "outside" / "run1"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.99}\n')
    (out / "config.yaml").write_text("model: secret-model\n")
    (out / "train.log").write_text("=== x\n")
    (tmp_path / "outside" / "study.db").write_bytes(b"")  # a search folder elsewhere
    (tmp_path / "outside" / "compare.md").write_text("secret-model")
    inside = root / "mine"
    inside.mkdir()
    (inside / "metrics.jsonl").write_text('{"step": 1, "loss": 1.5}\n')
    os.symlink(tmp_path / "outside", root / "outlink")
    os.symlink(out, root / "direct")
    os.symlink(tmp_path, root / "up")  # above the runs folder: leads back to runs/ and to outside/
    os.symlink(inside, root / "again")  # a second name for a run inside: listed once
    with ui_server(root) as (base, _):
        st, d = call(base, "/api/runs")
        assert st == 200 and [r["name"] for r in d["runs"]] == ["mine"] and d["studies"] == [], d
        for q in ("/api/run?name=direct", "/api/run?name=outlink/run1", "/api/run?name=up/outside/run1",
                  "/api/file?path=direct/config.yaml"):
            st, d = call(base, q)
            assert st == 404 and "secret-model" not in json.dumps(d), q


def test_posts_need_json_from_the_same_origin_and_token_guards_everything(root):
    with ui_server(root) as (base, _):
        st, d = call(base, "/api/stop", {"name": "done"}, headers={"Origin": "http://evil.example"})
        assert st == 403
        st, d = call(base, "/api/stop", {"name": "done"}, headers={"Content-Type": "text/plain"})
        assert st == 403
        st, d = call(base, "/api/stop", {"name": "done"})
        assert st == 400 and "is not running" in d["error"]
    with ui_server(root, token="s3cret") as (base, _):
        assert call(base, "/api/runs")[0] == 401
        assert call(base, "/api/runs", headers={"X-Slimtune-Token": "wrong"})[0] == 401
        assert call(base, "/api/runs", headers={"X-Slimtune-Token": "s3cret"})[0] == 200


def test_form_validates_with_the_jobs_own_messages(root, tiny_bert):  # noqa: F811
    from slimtune.train.config import JobConfigError, load_config

    data = root.parent / "d.jsonl"
    with ui_server(root) as (base, _):
        st, d = call(base, "/api/form", {"model": str(tiny_bert), "data": str(data), "method": "lora", "method.r": "4",
                                         "train.max_steps": "3", "train.lr": "1e-3", "output_dir": "x"})
        assert st == 200 and "r: 4" in d["yaml"] and "max_steps: 3" in d["yaml"]
        st, d = call(base, "/api/validate", {"yaml": d["yaml"]})
        assert st == 200 and d["output_dir"] == "x" and d["method"] == "lora"
        bad = run_yaml(tiny_bert, data, "y").replace("lr: 1.0e-2", "lr: -1")
        st, d = call(base, "/api/validate", {"yaml": bad})
        p = root.parent / "bad.yaml"
        p.write_text(bad)
        with pytest.raises(JobConfigError) as e:
            load_config(str(p))
        assert st == 400 and "train.lr" in d["error"]
        assert d["error"] == str(e.value).replace(str(p), "the config")  # the CLI's message, word for word
        for out, why in (("../elsewhere", "outside the runs folder"), ("/tmp/x", "not a folder under"),
                         ("done", "already holds a run")):
            st, d = call(base, "/api/validate", {"yaml": run_yaml(tiny_bert, data, out)})
            assert st == 400 and why in d["error"], d
        st, d = call(base, "/api/start", {"yaml": "model: [unclosed"})
        assert st == 400 and "does not parse" in d["error"]
        assert not (root / "x").exists() and not (root / "y").exists()  # checks never start anything


def test_search_folder_read_through_optuna(root):
    import optuna

    folder = root / "search-x"
    folder.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name="s", direction="maximize")
    study.optimize(lambda t: -(t.suggest_float("lr", 1e-4, 1e-2, log=True) - 3e-3) ** 2, n_trials=4)
    (root / "search-bad").mkdir()
    (root / "search-bad" / "study.db").write_bytes(b"this is not sqlite")
    with ui_server(root) as (base, _):
        st, d = call(base, "/api/runs")
        assert {"name": "search-x", "kind": "search"} in d["studies"]
        st, d = call(base, "/api/study?name=search-x")
        s = d["studies"][0]
        assert st == 200 and len(s["trials"]) == 4 and s["directions"] == ["MAXIMIZE"]
        assert json.loads(s["figures"]["history"])["data"]
        st, d = call(base, "/api/study?name=search-bad")
        assert st == 200 and d["studies"] == [] and "error" in d


def test_cli_refuses_a_public_bind_without_token(tmp_path, capsys):
    assert main(["ui", "--runs", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert main(["ui", "--runs", str(tmp_path / "f")]) == 2


def test_cli_serves_the_page_as_a_process(tmp_path):
    """`slimtune ui --port 0` as a real process: it prints its address, answers, stops on Ctrl-C."""
    import signal
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "slimtune", "ui", "--runs", str(tmp_path / "r"), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # the address, printed once the socket is bound
        assert line.startswith("slimtune ui: http://127.0.0.1:"), (line, p.stderr.read() if p.poll() else "")
        url = line.split()[2].rstrip("/")
        st, d = wait_for(lambda: _try(url), 30, "the page to answer")
        assert st == 200 and d["runs"] == [] and d["root"] == str((tmp_path / "r").resolve())
    finally:
        p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
    assert rc == 0, p.stderr.read()


def _try(url):
    try:
        return call(url, "/api/runs")
    except OSError:
        return None


def test_form_input_never_reaches_a_shell(tmp_path, tiny_bert, monkeypatch):  # noqa: F811
    """Shell syntax in every field the page sends is only text: the job starts as an argument list
    (never shell=True), runs with the literal folder name, and nothing the syntax asks for happens."""
    import sys

    from slimtune.ui import jobs as jobs_mod

    monkeypatch.chdir(tmp_path)  # where a shell would `touch` (the job's working folder too)
    root = tmp_path / "runs"
    root.mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    seen = []
    real = jobs_mod.subprocess.Popen

    def spy(args, **kw):
        seen.append((args, kw))
        return real(args, **kw)

    monkeypatch.setattr(jobs_mod.subprocess, "Popen", spy)
    evil = "r;touch PWNED1 && $(touch PWNED2) `touch PWNED3` | touch PWNED4 > PWNED8"
    runs_of = lambda base: {r["name"]: r for r in call(base, "/api/runs")[1]["runs"]}  # noqa: E731
    with ui_server(root) as (base, _):
        st, d = call(base, "/api/form", {"model": f"{tiny_bert}; touch PWNED5", "data": f"$(touch PWNED6){data}",
                                         "method": "lora", "train.max_steps": "2", "output_dir": evil + "-form"})
        assert st == 200 and "touch PWNED5" in d["yaml"]
        st, started = call(base, "/api/start", {"yaml": d["yaml"]})  # loads nothing: that model path does not exist
        assert st == 200 and started["name"] == evil + "-form", started
        st, d = call(base, "/api/start", {"yaml": run_yaml(tiny_bert, data, evil, steps=2)})
        assert st == 200 and d["name"] == evil, d
        wait_for(lambda: all(runs_of(base).get(n, {}).get("status") in ("finished", "failed")
                             for n in (evil, evil + "-form")), 180, "both started runs to end")
        rows = runs_of(base)
    form_row, row = rows[evil + "-form"], rows[evil]
    assert form_row["status"] == "failed" and "touch PWNED5" in form_row["why"], form_row  # the text, as a path
    assert row["status"] == "finished", row
    assert len(seen) == 2
    for args, kw in seen:
        assert isinstance(args, list) and not kw.get("shell") and args[:4] == [sys.executable, "-m", "slimtune", "train"]
        assert Path(args[4]).is_file() and Path(args[4]).is_relative_to(root) and args[5:] == ["--no-progress"]
    assert (root / evil / "summary.json").is_file()
    assert not [p for p in tmp_path.rglob("PWNED*")] and not list(Path.cwd().glob("PWNED*"))


def test_readme_shows_every_page_the_browser_tests_capture():
    """Each screenshot a browser test saves is in docs/ and in the README (the tests remake them with
    SLIMTUNE_SCREENSHOTS=docs)."""
    import re

    here = Path(__file__).parent
    shots = {m for f in here.glob("test_ui*.py") for m in re.findall(r'DOCS / "(ui_[a-z_]+\.png)"', f.read_text())}
    readme = (here.parent / "README.md").read_text()
    assert {"ui_runs.png", "ui_new_run.png", "ui_live_run.png", "ui_search.png", "ui_try.png", "ui_try_audio.png"} <= shots
    for s in sorted(shots):
        assert (here.parent / "docs" / s).stat().st_size > 10_000, s
        assert f"(docs/{s})" in readme, s
