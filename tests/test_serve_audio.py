"""POST /v1/audio/transcriptions with the official `openai` client against real uvicorn servers on
127.0.0.1 (free ports): a tiny random-init Whisper (seq2seq) and a tiny Wav2Vec2-CTC, each with a
LoRA adapter (the CTC one with its own `lm_head`). Transcripts equal what the library gives offline
for the same adapter (the speech task's predict), for the base and the adapter, one by one and many
at once; the formats (json, text, verbose_json), language, prompt, resampling; and one clear error
each: not a speech base, unreadable audio, too long, too large (413), options a CTC model cannot
honour, and non-text chat parts on a text base."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch

from serve_support import build, load_base
from test_serve_openai import LiveServer
from test_task_audio import tiny_w2v_cls, tiny_w2v_ctc, tiny_whisper  # noqa: F401 - fixtures
from slimtune.serve import ServeConfig, build_app, make_server


def clip(path, secs=0.6, rate=16000, seed=0):
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(secs * rate)) / rate
    hz = rng.uniform(200, 2000, size=3)
    wave = sum(0.3 * np.sin(2 * np.pi * h * t) for h in hz) + 0.05 * rng.normal(size=t.size)
    sf.write(path, wave.astype("float32"), rate)
    return path


def lora_adapter(base_path, out, modules_to_save=None, seed=1):
    """A LoRA adapter on the speech base with random (not identity) weights."""
    from slimtune import LoraConfig, get_peft_model
    from slimtune.train.tasks import get_task

    task = get_task("speech_recognition")
    from slimtune.train.tasks import hf_config

    model = task.model_class(hf_config(str(base_path))).from_pretrained(base_path)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=modules_to_save))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.base_model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 2.0 * (p.abs().mean() + 0.1))
    pm.save_pretrained(out)
    return out


def offline(base_path, adapter, paths) -> list[str]:
    """The speech task's own predict (what `slimtune predict` writes) for these files."""
    from slimtune import PeftModel
    from slimtune.train.tasks import get_task

    task = get_task("speech_recognition")
    model, proc = task.load_for_adapter(str(base_path), None, None)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    else:
        from slimtune import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=1, target_modules=["q_proj"]))  # zero B: the base's output
    rows = task.predict(model.eval(), proc, [{"audio": str(p)} for p in paths], {"batch_size": 1, "max_new_tokens": 4096})
    return [r["text"] for r in rows]


def serve(base_path, adapters, **cfg):
    from slimtune.train.tasks import get_task

    model, proc = get_task("speech_recognition").load_for_adapter(str(base_path), None, None)
    srv = make_server(model.eval(), proc, ServeConfig(served_model_name="speech", **cfg),
                      {n: str(p) for n, p in adapters.items()})
    return LiveServer(build_app(srv))


def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def whisper_live(tiny_whisper, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("serve_whisper")
    ad = lora_adapter(tiny_whisper, tmp / "wlora")
    clips = [clip(tmp / f"c{i}.wav", seed=i) for i in range(3)] + [clip(tmp / "c8k.wav", rate=8000, seed=9)]
    with serve(tiny_whisper, {"wlora": ad}, max_audio_bytes=400_000) as server:
        yield server, tiny_whisper, ad, clips, tmp


def test_whisper_transcripts_equal_the_library_for_base_and_adapter(whisper_live):
    server, base, ad, clips, _ = whisper_live
    c = client(server)
    want_base, want_ad = offline(base, None, clips), offline(base, ad, clips)
    assert want_base != want_ad  # the adapter changes the transcripts
    for p, wb, wa in zip(clips, want_base, want_ad):
        with open(p, "rb") as f:
            got = c.audio.transcriptions.create(model="speech", file=f)
        assert got.text == wb
        with open(p, "rb") as f:
            got = c.audio.transcriptions.create(model="wlora", file=f, language="en")
        assert got.text == wa
    # text and verbose_json (the 8 kHz clip is resampled with soxr, as the task reads it)
    with open(clips[-1], "rb") as f:
        text = c.audio.transcriptions.create(model="wlora", file=f, response_format="text")
    assert text.strip() == want_ad[-1]
    with open(clips[0], "rb") as f:
        v = c.audio.transcriptions.create(model="wlora", file=f, response_format="verbose_json")
    assert v.text == want_ad[0] and v.language == "english" and abs(v.duration - 0.6) < 1e-3
    # a prompt conditions the decoder (<|startofprev|> ...): a valid request, answered
    with open(clips[0], "rb") as f:
        assert isinstance(c.audio.transcriptions.create(model="wlora", file=f, prompt="ab ba").text, str)


def test_whisper_many_clients_at_once_get_their_own_adapter(whisper_live):
    server, base, ad, clips, _ = whisper_live
    want = {"speech": offline(base, None, clips), "wlora": offline(base, ad, clips)}
    jobs = [(m, i) for i in range(len(clips)) for m in ("speech", "wlora")]

    def one(job):
        m, i = job
        with open(clips[i], "rb") as f:
            return client(server).audio.transcriptions.create(model=m, file=f).text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    assert got == [want[m][i] for m, i in jobs]


def test_transcription_errors_are_one_clear_message_each(whisper_live):
    server, base, ad, clips, tmp = whisper_live
    c = client(server)

    def err(call):
        with pytest.raises(openai.APIStatusError) as ei:
            call()
        return ei.value.status_code, ei.value.body

    status, body = err(lambda: c.audio.transcriptions.create(model="speech", file=("x.wav", b"not audio at all")))
    assert status == 400 and body["code"] == "invalid_audio" and "x.wav" in body["message"]
    assert "WAV, FLAC, OGG or MP3" in body["message"]
    long = clip(tmp / "long.wav", secs=31, rate=4000)  # 31 s at 4 kHz: under the byte limit, past Whisper's window
    with open(long, "rb") as f:
        status, body = err(lambda: c.audio.transcriptions.create(model="speech", file=f))
    assert status == 400 and body["code"] == "audio_too_long" and "30 s" in body["message"]
    big = clip(tmp / "big.wav", secs=20, rate=16000)  # 1.3 MB > --max-audio-bytes 400000 here
    with open(big, "rb") as f:
        status, body = err(lambda: c.audio.transcriptions.create(model="speech", file=f))
    assert status == 413 and body["code"] == "request_too_large" and "--max-audio-bytes" in body["message"]
    with open(clips[0], "rb") as f:
        status, body = err(lambda: c.audio.transcriptions.create(model="speech", file=f, language="xx"))
    assert status == 400 and body["param"] == "language" and "en" in body["message"]
    with open(clips[0], "rb") as f:
        status, body = err(lambda: c.audio.transcriptions.create(model="speech", file=f, response_format="srt"))
    assert status == 400 and body["code"] == "unsupported_parameter"
    with open(clips[0], "rb") as f:
        status, body = err(lambda: c.audio.transcriptions.create(model="nope", file=f))
    assert status == 404 and body["code"] == "model_not_found"
    with open(clips[0], "rb") as f:
        status, body = err(lambda: c.audio.transcriptions.create(model="speech", file=f,
                                                                 timestamp_granularities=["word"]))
    assert status == 400 and body["code"] == "unsupported_parameter"
    status, body = err(lambda: c.chat.completions.create(model="speech", messages=[{"role": "user", "content": "hi"}]))
    assert status == 400 and body["code"] == "not_a_text_model" and "/v1/audio/transcriptions" in body["message"]
    import httpx

    r = httpx.post(server.url + "/audio/transcriptions", data={"model": "speech", "speaker": "x"},
                   files={"file": ("a.wav", open(clips[0], "rb").read())}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"
    r = httpx.post(server.url + "/audio/transcriptions", json={"model": "speech"}, timeout=60)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    m = httpx.get(server.url.replace("/v1", "") + "/metrics", timeout=30).text
    assert 'route="/v1/audio/transcriptions",status="413"' in m and 'reason="audio_too_long"' in m
    card = {x.id: x for x in c.models.list()}["speech"]
    assert card.model_extra["max_audio_seconds"] == 30.0


def test_ctc_base_and_adapter_with_its_own_head(tiny_w2v_ctc, tmp_path):  # noqa: F811
    ad = lora_adapter(tiny_w2v_ctc, tmp_path / "ctc", modules_to_save=["lm_head"], seed=3)
    clips = [clip(tmp_path / f"c{i}.wav", secs=0.5 + 0.2 * i, seed=20 + i) for i in range(3)]
    want_base, want_ad = offline(tiny_w2v_ctc, None, clips), offline(tiny_w2v_ctc, ad, clips)
    assert want_base != want_ad
    with serve(tiny_w2v_ctc, {"ctc": ad}) as server:
        c = client(server)
        for p, wb, wa in zip(clips, want_base, want_ad):
            with open(p, "rb") as f:
                assert c.audio.transcriptions.create(model="speech", file=f).text == wb
            with open(p, "rb") as f:
                assert c.audio.transcriptions.create(model="ctc", file=f, language="en").text == wa
        for kw, param in (({"prompt": "ab"}, "prompt"), ({"temperature": 0.5}, "temperature")):
            with open(clips[0], "rb") as f, pytest.raises(openai.BadRequestError) as ei:
                c.audio.transcriptions.create(model="ctc", file=f, **kw)
            assert ei.value.body["code"] == "unsupported_parameter" and ei.value.body["param"] == param


def test_text_base_refuses_audio_with_the_fix(tmp_path):
    base, _ = build(tmp_path, [])
    model, tok = load_base(base)
    srv = make_server(model, tok, ServeConfig(served_model_name="tiny"))
    buf = io.BytesIO()
    import soundfile as sf

    sf.write(buf, np.zeros(1600, dtype="float32"), 16000, format="WAV")
    with LiveServer(build_app(srv)) as server:
        c = client(server)
        with pytest.raises(openai.BadRequestError) as ei:
            c.audio.transcriptions.create(model="tiny", file=("a.wav", buf.getvalue()))
        assert ei.value.body["code"] == "not_a_speech_model" and "Whisper" in ei.value.body["message"]
        parts = [{"type": "text", "text": "what is said?"},
                 {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]
        with pytest.raises(openai.BadRequestError) as ei:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}])
        assert ei.value.body["code"] == "unsupported_content" and "/v1/audio/transcriptions" in ei.value.body["message"]
        parts[1] = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        with pytest.raises(openai.BadRequestError) as ei:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}])
        assert "image_text_to_text" in ei.value.body["message"]


def test_cli_serves_a_speech_adapter_and_refuses_a_classifier(whisper_live, tiny_w2v_cls, capsys):  # noqa: F811
    """`slimtune serve --adapter NAME=FOLDER` on a Whisper adapter (the base from its config) as a real
    process; an audio classifier base is one line, exit 2."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from slimtune.cli.main import main

    _, base, ad, clips, _ = whisper_live
    assert main(["serve", "--model", str(tiny_w2v_cls)]) == 2
    err = capsys.readouterr().err
    assert "causal LM or a speech recognizer" in err and "Traceback" not in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "slimtune", "serve", "--adapter", f"digits={ad}", "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        end = time.monotonic() + 90
        while True:
            try:
                ids = sorted(m.id for m in c.models.list())
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.poll() else "timeout"
                time.sleep(0.2)
        assert "digits" in ids
        with open(clips[1], "rb") as f:
            assert c.audio.transcriptions.create(model="digits", file=f).text == offline(base, ad, clips[1:2])[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
