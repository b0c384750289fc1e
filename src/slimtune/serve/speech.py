"""Speech bases: `POST /v1/audio/transcriptions` (OpenAI's shape) for a server whose base model is
a speech recognizer (the `speech_recognition` task: Whisper seq2seq, or Wav2Vec2 / HuBERT CTC).

    multipart body ─► decode (soundfile) ─► mono, resample (soxr) to the processor's rate ─► length check
                   ─► a Job on the pending list ─► engine thread: jobs grouped by (adapter, language,
                      prompt, temperature), one batch per group with that adapter active
                   ─► text (+ language, duration) ─► json / text / verbose_json

Decoding is the task's own (what `slimtune predict` gives for the same adapter): CTC takes the
argmax per frame (repeats merged, blanks dropped by the tokenizer); Whisper continues its decoder
prompt (<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>, after <|startofprev|> and the
request's `prompt` when one is given) with transformers' plain generate loop, greedy at
temperature 0, sampled above. Without `language`, Whisper's language is the most likely language
token after <|startoftranscript|> (one decoder step), as Whisper itself detects it.

Adapters come from the same registry as text adapters (doors, LRU, load/unload); each runs as its
own batch (a CTC adapter carries its own output head). Everything touching the model runs on the
engine thread (`Engine.call`).
"""
from __future__ import annotations

import io
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from ..methods.lora_layers import BASE_ADAPTER

FORMATS = ("json", "text", "verbose_json")
TIMESTAMP_FORMATS = ("srt", "vtt")
MIN_RATE = 4000  # below this a file is not speech-rate audio


class AudioError(ValueError):
    """Audio the server cannot transcribe; `code` is the API error code, the message names the fix."""

    def __init__(self, message: str, code: str = "invalid_audio", param: str = "file") -> None:
        super().__init__(message)
        self.code, self.param = code, param


class SpeechBaseError(ValueError):
    """A speech base the server cannot transcribe with (no tokenizer to decode a transcript)."""


def is_speech_base(model) -> bool:
    """Whether the speech_recognition task owns this model (the task decides, not a name test here)."""
    from ..train.tasks import get_task

    return get_task("speech_recognition").owns_model("", getattr(model, "config", None))


@dataclass
class Job:
    adapter: str  # registry name or BASE_ADAPTER
    wave: np.ndarray  # mono float32 at the processor's rate
    language: str | None  # a language code ("en"), None: detect (Whisper) / the model's own (CTC)
    prompt: str | None
    temperature: float
    future: Future = field(default_factory=Future)  # (text, language code or None)


class Transcriber:
    """The speech base's processor and decoding; jobs queued from any thread, run on the engine's."""

    def __init__(self, registry, processor, max_tokens: int, max_audio_seconds: float) -> None:
        from ..train.tasks.audio_io import sampling_rate, window_seconds
        from ..train.tasks.speech_recognition import is_ctc

        self.registry, self.proc = registry, processor
        self.tok = getattr(processor, "tokenizer", None)
        if self.tok is None:
            raise SpeechBaseError("the speech base's folder has no tokenizer in its processor (save_pretrained of the "
                             "WhisperProcessor / Wav2Vec2Processor); a transcript cannot be decoded without it")
        cfg = registry.base.config
        self.ctc = is_ctc(cfg)
        self.rate = sampling_rate(processor)
        window = window_seconds(processor) if not self.ctc else None
        self.window = window  # Whisper: 30 s, its encoder's input (a longer clip would be cut)
        self.max_seconds = min(window, max_audio_seconds) if window else max_audio_seconds
        self.max_tokens = max_tokens
        self.max_target = int(getattr(cfg, "max_target_positions", 448) or 448)
        self.languages = self._languages()  # code -> token id (Whisper's language tokens in this vocabulary)
        self._pending: list[Job] = []
        self._lock = threading.Lock()

    # ---- any thread ---------------------------------------------------------------------------
    def _languages(self) -> dict[str, int]:
        if self.ctc:
            return {}
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        unk = self.tok.unk_token_id
        ids = {c: self.tok.convert_tokens_to_ids(f"<|{c}|>") for c in LANGUAGES}
        return {c: i for c, i in ids.items() if i is not None and i != unk}

    def language_code(self, language: str | None) -> str | None:
        """The request's `language` (ISO-639-1 code or English name) as a code this model knows."""
        if language is None or language == "":
            return None
        if self.ctc:
            return language  # a CTC model reads one language; the hint changes nothing
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        code = language.lower()
        code = TO_LANGUAGE_CODE.get(code, code)
        if code not in self.languages:
            known = ", ".join(sorted(self.languages)[:20]) + (" ..." if len(self.languages) > 20 else "")
            raise AudioError(f"language '{language}' is not one this model transcribes (it knows: {known}); "
                             "send one of those ISO-639-1 codes, or leave language out to detect it",
                             "invalid_value", "language")
        return code

    def check_options(self, prompt: str | None, temperature: float) -> None:
        """What a CTC model cannot honour is a 400 naming the field (it would change the output)."""
        if self.ctc and prompt:
            raise AudioError("prompt is not supported by this model: a CTC recognizer has no decoder to condition on "
                             "earlier text; leave prompt out", "unsupported_parameter", "prompt")
        if self.ctc and temperature > 0:
            raise AudioError("temperature > 0 is not supported by this model: a CTC recognizer decodes each frame "
                             "greedily; send temperature 0 or leave it out", "unsupported_parameter",
                             "temperature")
        if prompt and not self.ctc:
            n = len(self.tok.get_prompt_ids(prompt))
            room = self.max_target // 2 - 1
            if n > room:
                raise AudioError(f"prompt is {n} tokens; this model takes at most {room} (half its decoder's "
                                 f"{self.max_target} positions); shorten the prompt", "invalid_value", "prompt")

    def decode(self, data: bytes, filename: str) -> np.ndarray:
        """The uploaded file as mono float32 at the model's rate, or an AudioError naming the fix."""
        import soundfile as sf
        import soxr

        if not data:
            raise AudioError(f"the file '{filename}' is empty; send an audio file (WAV, FLAC, OGG or MP3)")
        try:
            wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
            raise AudioError(f"the file '{filename}' cannot be decoded as audio ({str(e)[:120]}); send WAV, FLAC, OGG "
                             "or MP3") from None
        if sr < MIN_RATE:
            raise AudioError(f"the file '{filename}' has a sample rate of {sr} Hz, below the {MIN_RATE} Hz speech "
                             f"needs (this model takes {self.rate} Hz); re-export it at {self.rate} Hz")
        if wave.shape[0] == 0:
            raise AudioError(f"the file '{filename}' holds no samples; send a clip with speech in it")
        secs = wave.shape[0] / sr
        if secs > self.max_seconds:
            why = (f"this model's {self.window:g} s window (Whisper's encoder input)" if self.window
                   and self.max_seconds == self.window else f"this server's limit of {self.max_seconds:g} s "
                   "(--max-audio-seconds)")
            raise AudioError(f"the file '{filename}' is {secs:.1f} s long, past {why}: the last "
                             f"{secs - self.max_seconds:.1f} s would be cut; split it into clips of at most "
                             f"{self.max_seconds:g} s", "audio_too_long")
        wave = wave.mean(1)
        if sr != self.rate:
            wave = soxr.resample(wave, sr, self.rate).astype(np.float32)
        return wave

    def submit(self, engine, job: Job) -> Future:
        """Queue a job and ask the engine thread to run what is pending (jobs that arrive together
        share batches)."""
        with self._lock:
            self._pending.append(job)
        engine.call(self._drain)
        return job.future

    # ---- the engine thread --------------------------------------------------------------------
    def _drain(self) -> None:
        with self._lock:
            jobs, self._pending = self._pending, []
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            if j.future.set_running_or_notify_cancel():
                groups.setdefault((j.adapter, j.language, j.prompt or "", j.temperature), []).append(j)
        for (adapter, *_), group in groups.items():
            try:
                pl = self.registry.acquire(adapter)
                if pl is None:
                    raise RuntimeError("every adapter slot is pinned")
                try:
                    if pl.solo is not None:
                        pl.lane.activate(pl.solo)
                    results = self._run(pl.model, group)
                finally:
                    self.registry.release(adapter, pl)
            except BaseException as e:  # noqa: BLE001 - handed to each waiting request
                for j in group:
                    j.future.set_exception(e)
                continue
            for j, r in zip(group, results):
                j.future.set_result(r)

    @torch.no_grad()
    def _run(self, model, jobs: list[Job]) -> list[tuple[str, str | None]]:
        from ..train.tasks.audio_io import features

        dev = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        feats = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev))
                 for k, v in features(self.proc, [j.wave for j in jobs]).items()}
        if self.ctc:
            logits = model(**feats).logits
            return [(t.strip(), jobs[0].language) for t in self.proc.batch_decode(logits.argmax(-1))]
        return self._seq2seq(model, feats, jobs)

    def _seq2seq(self, model, feats: dict[str, torch.Tensor], jobs: list[Job]) -> list[tuple[str, str | None]]:
        from transformers import GenerationMixin
        from transformers.modeling_outputs import BaseModelOutput

        tok, first = self.tok, jobs[0]
        sot = tok.convert_tokens_to_ids("<|startoftranscript|>")
        enc = BaseModelOutput(last_hidden_state=model.get_encoder()(feats["input_features"]).last_hidden_state)
        if first.language is not None or not self.languages:
            langs = [first.language] * len(jobs)
        else:  # detect: the most likely language token after <|startoftranscript|>
            codes = list(self.languages)
            start = torch.full((len(jobs), 1), sot, dtype=torch.long, device=enc.last_hidden_state.device)
            logits = model(encoder_outputs=enc, decoder_input_ids=start).logits[:, -1]
            pick = logits[:, [self.languages[c] for c in codes]].argmax(-1).tolist()
            langs = [codes[i] for i in pick]
        prev = [int(t) for t in tok.get_prompt_ids(first.prompt)] if first.prompt else []
        rows = []
        for code in langs:
            tok.set_prefix_tokens(language=code, task="transcribe", predict_timestamps=False)
            rows.append(prev + list(tok.prefix_tokens))
        start = torch.tensor(rows, dtype=torch.long, device=enc.last_hidden_state.device)
        room = min(self.max_target - start.shape[1], self.max_tokens)
        sample = first.temperature > 0
        ids = GenerationMixin.generate(model, encoder_outputs=enc, decoder_input_ids=start, max_new_tokens=max(room, 1),
                                       do_sample=sample, temperature=first.temperature if sample else None,
                                       top_p=None, top_k=None, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.eos_token_id)
        texts = tok.batch_decode(ids[:, start.shape[1]:], skip_special_tokens=True)
        return [(t.strip(), code) for t, code in zip(texts, langs)]


def language_name(code: str | None) -> str:
    """OpenAI's verbose_json writes the language's English name ("english")."""
    if code is None:
        return "unknown"
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code, code)
