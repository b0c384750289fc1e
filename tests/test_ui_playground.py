"""The Try it tab's API against a real slimtune server over HTTP (its app under uvicorn on loopback): its models, an adapter's answer beside
the base's (each equal to what the server itself answers), an A/B route's arm, and the messages when
no server is given or it cannot be reached."""
from __future__ import annotations

import pytest
from ui_support import DOCS, NO_BROWSER, browser, call, serve_process, ui_server, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve_process(tmp_path_factory.mktemp("served")) as url:
        yield url


def test_adapter_beside_base_equals_the_servers_own_answers(served, tmp_path):
    with ui_server(tmp_path, serve_url=served) as (base, _):
        st, d = call(base, "/api/try/models")
        assert st == 200 and d["server"] == served
        kinds = {m["id"]: m["kind"] for m in d["models"]}
        assert kinds == {"base": "base", "lora-a": "adapter", "lora-b": "adapter", "ab": "route"}
        st, d = call(base, "/api/try", {"model": "lora-a", "base": "base", "prompt": "the movie was", "max_tokens": 6})
        assert st == 200, d
        got = {a["model"]: a for a in d["answers"]}
        for m in ("lora-a", "base"):
            st, direct = call(served, "/v1/completions", {"model": m, "prompt": "the movie was", "max_tokens": 6,
                                                          "temperature": 0})
            assert got[m]["text"] == direct["choices"][0]["text"] and got[m]["usage"]["completion_tokens"] == 6
        assert got["lora-a"]["text"] != got["base"]["text"]  # the adapter changes the answer
        st, d = call(base, "/api/try", {"model": "ab", "prompt": "hi", "max_tokens": 2, "user": "u1"})
        [a] = d["answers"]
        assert st == 200 and a["route"] == "ab" and a["adapter"] in ("lora-a", "lora-b")
        st, d = call(base, "/api/try", {"model": "ghost", "prompt": "hi"})
        assert st == 400 and "answered 404" in d["error"]
        st, d = call(base, "/api/try", {"model": "lora-a", "prompt": "hi", "max_tokens": 10_000})
        assert st == 400 and "max_tokens" in d["error"]


def test_no_server_and_unreachable_server_say_what_to_do(tmp_path):
    with ui_server(tmp_path) as (base, _):
        assert call(base, "/api/try/models") == (200, {"server": None, "models": []})
        st, d = call(base, "/api/try", {"model": "x", "prompt": "hi"})
        assert st == 400 and "slimtune ui --serve" in d["error"]
    with ui_server(tmp_path, serve_url="http://127.0.0.1:9") as (base, _):
        st, d = call(base, "/api/try/models")
        assert st == 400 and "cannot reach the server" in d["error"]


@pytest.mark.skipif(bool(NO_BROWSER), reason=str(NO_BROWSER))
def test_playground_in_chromium(served, tmp_path, browser):  # noqa: F811
    d = browser
    with ui_server(tmp_path, serve_url=served) as (base, _):
        d.get(base + "/")
        d.find_element("css selector", 'nav button[data-tab="try"]').click()
        wait_for(lambda: d.execute_script("return document.querySelector('#try-model').value") == "lora-a", 20,
                 "the server's models in the list")
        d.find_element("id", "try-prompt").send_keys("the movie was")
        d.find_element("id", "try-max").clear()
        d.find_element("id", "try-max").send_keys("6")
        d.find_element("id", "try-send").click()
        boxes = wait_for(lambda: len(d.find_elements("css selector", "#try-out .answer")) == 2 and
                         d.find_elements("css selector", "#try-out .answer"), 60, "two answers side by side")
        shown = {b.get_attribute("data-model"): b.find_element("tag name", "pre").text for b in boxes}
        for m in ("lora-a", "base"):
            st, direct = call(served, "/v1/completions", {"model": m, "prompt": "the movie was", "max_tokens": 6,
                                                          "temperature": 0})
            assert shown[m] == direct["choices"][0]["text"].strip()
        d.save_screenshot(str(DOCS / "ui_try.png"))
