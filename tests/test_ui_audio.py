"""The Try it tab with a speech server: a real `slimtune serve` (its app under uvicorn on loopback) on a
tiny random-init Whisper with a LoRA adapter. A WAV uploaded through the page (the API, and the file
input in headless chromium) comes back as the server's transcripts, the adapter's beside the base's,
each equal to the same request made with the official openai client; bad uploads are one message."""
from __future__ import annotations

import base64

import openai
import pytest
from test_serve_audio import clip, lora_adapter, serve
from test_task_audio import tiny_whisper  # noqa: F401 - fixture
from ui_support import DOCS, NO_BROWSER, browser, call, ui_server, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def speech(tiny_whisper, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("ui_speech")
    ad = lora_adapter(tiny_whisper, tmp / "wlora")
    with serve(tiny_whisper, {"wlora": ad}) as server:
        yield f"http://127.0.0.1:{server.port}", server.url, clip(tmp / "hello.wav", seed=3)


def _openai(v1: str, model: str, path) -> str:
    c = openai.OpenAI(base_url=v1, api_key="none", max_retries=0, timeout=120)
    with open(path, "rb") as f:
        return c.audio.transcriptions.create(model=model, file=f).text


def test_audio_upload_equals_the_servers_own_transcripts(speech, tmp_path):
    url, v1, wav = speech
    with ui_server(tmp_path, serve_url=url) as (base, _):
        st, d = call(base, "/api/try/models")
        assert st == 200 and {m["id"]: (m["kind"], m["audio"]) for m in d["models"]} == {
            "speech": ("base", True), "wlora": ("adapter", True)}
        body = {"model": "wlora", "base": "speech", "name": wav.name, "audio": base64.b64encode(wav.read_bytes()).decode()}
        st, d = call(base, "/api/try/audio", body)
        assert st == 200, d
        got = {a["model"]: a["text"] for a in d["answers"]}
        assert got == {m: _openai(v1, m, wav) for m in ("wlora", "speech")}
        assert got["wlora"]  # random weights still write something
        # one message each: not base64, not audio (the server's own words), no file, a text request
        st, d = call(base, "/api/try/audio", {**body, "audio": "%%%"})
        assert st == 400 and "base64" in d["error"]
        st, d = call(base, "/api/try/audio", {**body, "audio": base64.b64encode(b"not a sound").decode()})
        assert st == 400 and "answered 400" in d["error"] and wav.name in d["error"], d
        st, d = call(base, "/api/try/audio", {"model": "wlora"})
        assert st == 400 and "audio file" in d["error"]
        st, d = call(base, "/api/try", {"model": "wlora", "prompt": "hi"})
        assert st == 400 and "/v1/audio/transcriptions" in d["error"]
    with ui_server(tmp_path) as (base, _):
        st, d = call(base, "/api/try/audio", body)
        assert st == 400 and "slimtune ui --serve" in d["error"]


@pytest.mark.skipif(bool(NO_BROWSER), reason=str(NO_BROWSER))
def test_audio_upload_in_chromium(speech, tmp_path, browser):  # noqa: F811
    url, v1, wav = speech
    d = browser
    with ui_server(tmp_path, serve_url=url) as (base, _):
        d.get(base + "/")
        d.find_element("css selector", 'nav button[data-tab="try"]').click()
        wait_for(lambda: d.execute_script("return document.querySelector('#try-model').value") == "wlora", 20,
                 "the server's models in the list")
        # a speech model takes a file: the prompt and the text options are hidden
        assert d.find_element("id", "try-speech").is_displayed()
        assert not any(d.find_element("id", x).is_displayed() for x in ("try-prompt", "try-mode", "try-max", "try-user"))
        d.find_element("id", "try-audio").send_keys(str(wav))  # the file input, as a person picks a file
        d.find_element("id", "try-transcribe").click()
        boxes = wait_for(lambda: len(d.find_elements("css selector", "#try-out .answer")) == 2 and
                         d.find_elements("css selector", "#try-out .answer"), 60, "two transcripts side by side")
        shown = {b.get_attribute("data-model"): d.execute_script("return arguments[0].querySelector('pre').textContent", b)
                 for b in boxes}
        assert shown == {m: _openai(v1, m, wav) for m in ("wlora", "speech")}
        assert d.find_element("id", "try-message").text == ""
        d.save_screenshot(str(DOCS / "ui_try_audio.png"))
