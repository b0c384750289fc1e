"""Audio files for the speech tasks: decoded with `soundfile` (libsndfile: WAV, FLAC, OGG, MP3),
mixed to mono, resampled with `soxr` to the processor's rate, checked against the model's window.
Not a task (registers nothing).

    wave = read_audio(path, 16000, where="data.csv: row 3", max_seconds=30.0)   # float32 (T,)
    batch = collate_audio(examples)   # padded input_values + attention_mask, or stacked features; -100 label padding
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datafiles import DataError

IGNORE = -100
MIN_RATE = 4000  # below this a file is not speech-rate audio (a header error, or a wrong file)


def read_audio(path: Path, rate: int, where: str, max_seconds: float | None = None) -> np.ndarray:
    """The file's samples as mono float32 at `rate`, or one DataError naming the file and the row."""
    import soundfile as sf
    import soxr

    if not path.is_file():
        raise DataError(f"{where}: audio file {str(path)!r} does not exist; audio paths are relative to the data "
                        "file's folder (or absolute)")
    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{where}: audio file {str(path)!r} cannot be decoded ({str(e)[:120]}); replace the file "
                        "(WAV / FLAC / OGG / MP3) or drop the row") from None
    if sr < MIN_RATE:
        raise DataError(f"{where}: audio file {str(path)!r} has a sample rate of {sr} Hz, below {MIN_RATE} Hz that "
                        f"speech needs (the model takes {rate} Hz); re-export it at {rate} Hz (sox in.wav -r {rate} "
                        "out.wav)")
    if len(wave) == 0:
        raise DataError(f"{where}: audio file {str(path)!r} holds no samples (0 s of audio); replace the file or "
                        "drop the row")
    wave = wave.mean(1)  # (T,) mono
    if sr != rate:
        wave = soxr.resample(wave, sr, rate).astype(np.float32)
    if max_seconds is not None and len(wave) > max_seconds * rate:
        secs = len(wave) / rate
        raise DataError(f"{where}: audio file {str(path)!r} is {secs:.1f} s long, past the model's {max_seconds:g} s "
                        f"window: the last {secs - max_seconds:.1f} s would be cut; split the clip or drop the row (a Whisper "
                       "window set shorter than 30 s by data.audio_window_s can be raised)")
    return wave


def sampling_rate(proc: Any) -> int:
    fe = getattr(proc, "feature_extractor", proc)
    return int(getattr(fe, "sampling_rate", 16000))


def window_seconds(proc: Any) -> float | None:
    """The longest clip the model takes whole (Whisper: 30 s), else None (no fixed window)."""
    fe = getattr(proc, "feature_extractor", proc)
    n = getattr(fe, "n_samples", None)
    return n / sampling_rate(proc) if n else None


def features(proc: Any, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The feature extractor's tensors for a list of waves (input_values or input_features)."""
    fe = getattr(proc, "feature_extractor", proc)
    raw = "input_values" in fe.model_input_names  # raw waves: pad to the longest; Whisper pads to its window itself
    out = fe(waves, sampling_rate=sampling_rate(proc), return_tensors="pt",
             **({"padding": True, "return_attention_mask": True} if raw else {}))
    return {k: v for k, v in out.items() if k in ("input_values", "input_features", "attention_mask")}


def encode_audio(proc: Any, row: dict[str, Any], column: str, source: str, i: int) -> dict[str, Any]:
    """One audio row -> {"input_values": (T,)} or {"input_features": (n_mels, frames)}."""
    from .media import media_path

    if proc is None or not hasattr(getattr(proc, "feature_extractor", proc), "sampling_rate"):
        raise DataError(f"{source}: the rows hold audio files (column {column!r}), but the model is not an audio "
                        "model; use an audio model folder (Wav2Vec2, HuBERT, AST, Whisper) with task: "
                        "audio_classification or speech_recognition")
    wave = read_audio(media_path(row[column], source), sampling_rate(proc), f"{source}: row {i}", window_seconds(proc))
    feats = features(proc, [wave])
    return {k: v[0] for k, v in feats.items() if k != "attention_mask"}


def collate_audio(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A batch: raw waves right-padded with zeros plus their attention mask, or fixed-size features
    stacked; class labels as a tensor, token labels right-padded with -100 (ignored by the loss)."""
    out: dict[str, torch.Tensor] = {}
    if "input_values" in examples[0] and examples[0]["input_values"].dim() == 1:
        n = max(len(e["input_values"]) for e in examples)
        vals = torch.zeros(len(examples), n)
        mask = torch.zeros(len(examples), n, dtype=torch.long)
        for j, e in enumerate(examples):
            vals[j, :len(e["input_values"])] = e["input_values"]
            mask[j, :len(e["input_values"])] = 1
        out.update(input_values=vals, attention_mask=mask)
    else:
        key = "input_values" if "input_values" in examples[0] else "input_features"
        out[key] = torch.stack([e[key] for e in examples])
    if "labels" in examples[0]:
        if isinstance(examples[0]["labels"], list):
            n = max(len(e["labels"]) for e in examples)
            lab = torch.full((len(examples), n), IGNORE, dtype=torch.long)
            for j, e in enumerate(examples):
                lab[j, :len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
            out["labels"] = lab
        else:
            out["labels"] = torch.tensor([e["labels"] for e in examples])
    return out
