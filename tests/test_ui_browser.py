"""The UI in a real browser: Debian's headless chromium driven by Selenium (no browser download).

The runs page lists a finished run with its loss curve; a run started from the New run form appears,
its curve grows while it trains, Stop interrupts it with a checkpoint kept and Resume continues it
from there; a bad config shows the
job's own message in the page; a search folder's study plots. Screenshots of each page go to docs/.
"""
from __future__ import annotations

import pytest
from conftest_train import tiny_bert  # noqa: F401
from ui_support import DOCS, NO_BROWSER, broken_run, browser, call, finished_run, run_yaml, ui_server, wait_for  # noqa: F401

pytestmark = pytest.mark.skipif(bool(NO_BROWSER), reason=str(NO_BROWSER))


# read and click through JS in one step: the page rebuilds the table every 2 s (no stale elements)
def _points(d, chart: str) -> int:
    return int(d.execute_script("const e = document.querySelector(arguments[0]); return e && e.dataset.points", chart)
               or 0)


def _row_status(d, name: str) -> str | None:
    return d.execute_script("const r = document.querySelector(`#runs-table tr[data-name=\"${arguments[0]}\"]`);"
                            " return r && r.dataset.status", name)


def _step(base: str, name: str) -> int:
    return next(r["step"] or 0 for r in call(base, "/api/runs")[1]["runs"] if r["name"] == name)


def _click(d, css: str) -> bool:
    return d.execute_script("const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e", css)


def _wait_stopped(d, folder, what):
    """Stop = Ctrl-C: the run ends its step, checkpoints and writes its report before the page shows it
    interrupted, which on a loaded 2-core machine (the suite's other worker busy) can take a while;
    a failure shows the run's own log, so it says where the run was."""
    try:
        wait_for(lambda: _row_status(d, folder.name) == "interrupted", 150, what)
    except AssertionError as e:
        tail = (folder / "train.log").read_text(errors="replace")[-1500:] if (folder / "train.log").exists() else ""
        raise AssertionError(f"{e}; status {_row_status(d, folder.name)!r}; train.log ends:\n{tail}") from None


def test_runs_form_live_curve_stop_in_chromium(tmp_path, tiny_bert, browser):  # noqa: F811
    import optuna

    root = tmp_path / "runs"
    root.mkdir()
    finished_run(root, tiny_bert)
    # folders being written or corrupt: a cut metrics line, half a summary, a junk lock; binary garbage
    broken_run(root)
    junk = root / "junk"
    junk.mkdir()
    (junk / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage\n" * 50)
    (junk / "config.yaml").write_bytes(b"model: [\xff\n")
    (junk / "report.md").write_bytes(b"\xff<script>document.title='owned'</script>")
    (root / "search-lr").mkdir()
    s = optuna.create_study(storage=f"sqlite:///{root / 'search-lr' / 'study.db'}", study_name="lr", direction="maximize")
    s.optimize(lambda t: -(t.suggest_float("lr", 1e-4, 1e-2, log=True) - 3e-3) ** 2, n_trials=5)
    d = browser
    with ui_server(root) as (base, app):
        d.get(base + "/")
        wait_for(lambda: _row_status(d, "done") == "finished", 20, "the finished run in the table")
        # the corrupt folders are rows like any other, and opening them shows what they hold
        assert _row_status(d, "broken") == "interrupted" and _row_status(d, "junk") in ("interrupted", "unreadable")
        assert _click(d, '#runs-table tr[data-name="broken"]')
        wait_for(lambda: _points(d, "#chart-loss") == 1 and d.find_element("id", "run-name").text == "broken", 20,
                 "the broken run's one readable loss point")
        assert _click(d, '#runs-table tr[data-name="junk"]')
        wait_for(lambda: d.find_element("id", "run-name").text == "junk", 20, "the junk folder's page")
        assert d.title == "slimtune ui" and "<script>" in d.find_element("id", "run-report").text  # shown, not run
        assert _click(d, '#runs-table tr[data-name="done"]')
        wait_for(lambda: _points(d, "#chart-loss") >= 6, 20, "its loss curve (4 train + 2 eval points)")
        assert _points(d, "#chart-lr") == 4
        assert "accuracy" in d.find_element("id", "run-report").text
        d.save_screenshot(str(DOCS / "ui_runs.png"))

        d.find_element("css selector", 'nav button[data-tab="new"]').click()
        yaml_box = d.find_element("id", "yaml")
        wait_for(lambda: "output_dir" in yaml_box.get_attribute("value"), 10, "the form's YAML")
        data = root.parent / "d.jsonl"
        bad = run_yaml(tiny_bert, data, "live").replace("lr: 1.0e-2", "lr: -1")
        d.execute_script("arguments[0].value = arguments[1]", yaml_box, bad)
        d.find_element("id", "validate").click()
        msg = d.find_element("id", "message")
        wait_for(lambda: "train.lr" in msg.text, 10, "the job's message for a bad lr")
        assert msg.get_attribute("class") == "err"
        good = run_yaml(tiny_bert, data, "live", steps=200000,  # minutes at ~250 steps/s: never finishes before Stop
                        extra=", save_every: 200000, eval_every: 200000, warmup_steps: 1")
        d.execute_script("arguments[0].value = arguments[1]", yaml_box, good)
        d.find_element("id", "validate").click()
        wait_for(lambda: msg.text.startswith("ok:"), 10, "the config to pass the checks")
        d.save_screenshot(str(DOCS / "ui_new_run.png"))
        d.find_element("id", "start").click()

        wait_for(lambda: _row_status(d, "live") == "running" and _points(d, "#chart-loss") >= 2, 120,
                 "the started run to train (and the page to select it)")
        n1 = _points(d, "#chart-loss")
        wait_for(lambda: _points(d, "#chart-loss") > n1 + 2, 60, "its curve to grow")
        d.save_screenshot(str(DOCS / "ui_live_run.png"))
        wait_for(lambda: _click(d, "#stop"), 10, "the Stop button")
        _wait_stopped(d, root / "live", "the run to stop")
        assert (root / "live" / "checkpoints").is_dir() and list((root / "live" / "checkpoints").glob("step-*"))
        stopped_at = _step(base, "live")
        wait_for(lambda: _click(d, "#resume"), 10, "the Resume button")
        wait_for(lambda: _row_status(d, "live") == "running" and _step(base, "live") > stopped_at, 120,
                 "the resumed run to train past its checkpoint")
        assert "resumed from" in (root / "live" / "train.log").read_text()
        wait_for(lambda: _click(d, "#stop"), 10, "the Stop button")
        _wait_stopped(d, root / "live", "the resumed run to stop")

        d.find_element("css selector", 'nav button[data-tab="studies"]').click()
        d.find_element("css selector", '#studies-list a[data-name="search-lr"]').click()
        wait_for(lambda: d.find_elements("css selector", '#study-figs div[data-figure="history"] .main-svg'), 20,
                 "the study's optimization history")
        d.save_screenshot(str(DOCS / "ui_search.png"))
