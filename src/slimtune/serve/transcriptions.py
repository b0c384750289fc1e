"""POST /v1/audio/transcriptions: OpenAI's multipart form, answered by the speech base (speech.py).

    file             the audio (WAV, FLAC, OGG, MP3: what libsndfile reads); at most --max-audio-bytes (413)
    model            the base model's name, an adapter's, or an A/B route's (the key's scope applies)
    language         ISO-639-1 code (or English name); Whisper detects it when absent
    prompt           Whisper: earlier text the transcript continues (<|startofprev|>); CTC: a 400
    response_format  json (default) | text | verbose_json; srt / vtt are a 400 (no timestamps here)
    temperature      0 (default): greedy; above: sampled (Whisper only)
    timestamp_granularities[]  "segment" only; stream: false only; chunking_strategy: "auto" only
    (anything else is `unknown_parameter`, as on the JSON endpoints)
"""
from __future__ import annotations

import asyncio
import math
import time

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .engine import EngineStopped
from .errors import APIError
from .generation import resolve
from .registry import AdapterLoadError, AdapterNotFound
from .speech import FORMATS, TIMESTAMP_FORMATS, AudioError, Job, language_name

FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
          "timestamp_granularities", "stream", "chunking_strategy", "include[]", "include")

# the OpenAPI description of the form (FastAPI cannot derive it: the form is read by hand, so each
# field's refusal is OpenAI's error body rather than a validation message)
OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "model"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "audio: WAV, FLAC, OGG or MP3"},
        "model": {"type": "string", "description": "the base model, an adapter or an A/B route"},
        "language": {"type": "string", "description": "ISO-639-1 code; detected when absent (Whisper)"},
        "prompt": {"type": "string", "description": "text the transcript continues (Whisper only)"},
        "response_format": {"type": "string", "enum": list(FORMATS), "default": "json"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
    }}}}}}


def _field(form, name: str) -> str | None:
    v = form.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise APIError(400, f"'{name}' must be a form field, not a file.", name, "invalid_value")
    return v


async def transcribe(srv, request: Request, tenant) -> Response:
    t0 = time.perf_counter()
    label = ""
    try:
        resp, label = await _transcribe(srv, request, tenant)
    except APIError as e:
        srv.metrics.request_done("transcriptions", label, e.status)
        raise
    srv.metrics.request_done("transcriptions", label, 200, latency=time.perf_counter() - t0)
    return resp


async def _transcribe(srv, request: Request, tenant) -> tuple[Response, str]:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise APIError(400, "Send the audio as multipart/form-data with a `file` part and a `model` field (what "
                       "the openai client's audio.transcriptions.create does).", "file", "invalid_content_type")
    try:
        form = await request.form(max_files=1, max_fields=len(FIELDS))
    except Exception as e:  # noqa: BLE001 - python-multipart's parse errors, too many parts: the client's body
        raise APIError(400, f"The multipart body could not be read ({str(e)[:120]}); send one `file` part and the "
                       "form fields of OpenAI's transcription request.", "file", "invalid_body") from None
    try:
        return await _answer(srv, form, tenant)
    finally:
        await form.close()


async def _answer(srv, form, tenant) -> tuple[Response, str]:
    for key in form.keys():
        if key not in FIELDS:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
    upload = form.get("file")
    if upload is None:
        raise APIError(400, "Missing required parameter: 'file'.", "file", "missing_required_parameter")
    if isinstance(upload, str):
        raise APIError(400, "'file' must be a file part (an audio file), not a text field.", "file", "invalid_value")
    model = _field(form, "model")
    if not model:
        raise APIError(400, "Missing required parameter: 'model'.", "model", "missing_required_parameter")
    fmt = _field(form, "response_format") or "json"
    if fmt in TIMESTAMP_FORMATS:
        raise APIError(400, f"response_format '{fmt}' needs timestamps, which this server does not produce; use "
                       "json, text or verbose_json.", "response_format", "unsupported_parameter")
    if fmt not in FORMATS:
        raise APIError(400, f"Invalid value for 'response_format': '{fmt}'; use one of {', '.join(FORMATS)}.",
                       "response_format", "invalid_value")
    try:
        temperature = float(_field(form, "temperature") or 0)
    except ValueError:
        raise APIError(400, "Invalid value for 'temperature': a number from 0 to 1.", "temperature",
                       "invalid_value") from None
    if not (0 <= temperature <= 1):
        raise APIError(400, f"Invalid value for 'temperature': {temperature}; it must be from 0 to 1.", "temperature",
                       "invalid_value")
    grains = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    if any(g != "segment" for g in grains):
        raise APIError(400, "timestamp_granularities other than 'segment' (word timestamps) are not supported; "
                       "leave the field out.", "timestamp_granularities", "unsupported_parameter")
    if (_field(form, "stream") or "false").lower() not in ("false", "0"):
        raise APIError(400, "stream is not supported for transcriptions (the whole transcript comes at once); "
                       "leave it out or send false.", "stream", "unsupported_parameter")
    if (_field(form, "chunking_strategy") or "auto") != "auto":
        raise APIError(400, "chunking_strategy other than 'auto' is not supported (clips longer than the model's "
                       "window are refused, not chunked); leave it out.", "chunking_strategy", "unsupported_parameter")
    if form.getlist("include[]") + form.getlist("include"):
        raise APIError(400, "include (e.g. logprobs) is not supported for transcriptions; leave it out.", "include",
                       "unsupported_parameter")
    sp = srv.speech
    if sp is None:
        raise APIError(400, f"This server's base model '{srv.base_name}' generates text; it is not a speech "
                       "recognizer. Start `slimtune serve` with a speech base (Whisper, Wav2Vec2-CTC, HuBERT-CTC) "
                       "or one of its adapters to transcribe audio.", "model", "not_a_speech_model")
    target = resolve(srv, tenant, model, None)
    prompt = _field(form, "prompt")
    try:
        language = sp.language_code(_field(form, "language"))
        sp.check_options(prompt, temperature)
        data = await upload.read()
        wave = sp.decode(data, upload.filename or "file")
    except AudioError as e:
        raise APIError(400, str(e), e.param, e.code) from None
    job = Job(target.adapter, wave, language, prompt, temperature)
    try:
        fut = sp.submit(srv.engine, job)
        text, code = await asyncio.wait_for(asyncio.wrap_future(fut), srv.cfg.request_timeout_s)
    except EngineStopped:
        raise APIError(503, "The server is shutting down; retry on another instance.", code="shutting_down") from None
    except asyncio.TimeoutError:
        job.future.cancel()
        raise APIError(408, "The transcription ran past the server's timeout (--request-timeout); retry when the "
                       "server is less busy.", code="timeout") from None
    except AdapterNotFound as e:
        raise APIError(404, f"{e} (it was unloaded while the request waited)", "model", "model_not_found") from None
    except AdapterLoadError as e:
        raise APIError(400, f"{e}. Ask the server's admin to fix or unload it.", "model", "adapter_load_failed") from None
    seconds = len(wave) / sp.rate
    if fmt == "text":
        return PlainTextResponse(text + "\n"), target.label
    body = {"text": text, "usage": {"type": "duration", "seconds": max(math.ceil(seconds), 1)}}
    if fmt == "verbose_json":
        body = {"task": "transcribe", "language": language_name(code), "duration": round(seconds, 3), **body}
    return JSONResponse(body), target.label
