"""Audio classification: a transformers audio classifier (Wav2Vec2, HuBERT, AST, ...;
`AutoModelForAudioClassification` with num_labels and the label names) from a folder with a
subfolder per class of audio files, or rows with an `audio` column of paths (relative to the data
file) and a `label`. Audio is decoded with soundfile and resampled with soxr to the feature
extractor's rate (audio_io.py); a model folder without a feature extractor gets Wav2Vec2's
(16 kHz, normalised), said in the log. Metrics as for images: accuracy, macro-F1, top-k.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..datafiles import DataError
from . import register_task
from .audio_io import encode_audio, features, read_audio, sampling_rate
from .base import label_kwargs, saved_labels, saved_num_labels
from .image_classification import ImageClassification, top_k
from .media import AUDIO_EXT, media_path

AUDIO_TYPES = {"wav2vec2", "hubert", "wavlm", "audio-spectrogram-transformer", "data2vec-audio", "unispeech",
               "unispeech-sat", "wav2vec2-conformer", "sew", "sew-d", "whisper"}
# the speech encoders' attention projections (families.LORA_TARGETS has no entry for them)
TARGETS = {"wav2vec2": ["q_proj", "v_proj"], "hubert": ["q_proj", "v_proj"], "wavlm": ["q_proj", "v_proj"],
           "data2vec-audio": ["q_proj", "v_proj"], "audio-spectrogram-transformer": ["query", "value"]}


@register_task
class AudioClassification(ImageClassification):
    name = "audio_classification"
    kind = "audio classifier"
    formats = ("audio_files",)
    heads = ("classifier",)  # Wav2Vec2 / HuBERT: projector + classifier; AST: classifier (a head module)

    data_hint = "audio: a folder with a subfolder per class of audio files, or rows with an 'audio' column of paths and a 'label'"

    def owns_model(self, model_name: str, hf_cfg: Any) -> bool:
        archs = getattr(hf_cfg, "architectures", None) or []
        return hf_cfg is not None and any(a.endswith("ForAudioClassification") or (
            a.endswith("ForSequenceClassification") and hf_cfg.model_type in AUDIO_TYPES) for a in archs)

    def accepts_model(self, model_name: str, hf_cfg: Any) -> bool:
        return hf_cfg is not None and hf_cfg.model_type in AUDIO_TYPES

    def model_class(self, hf_cfg: Any = None):
        from transformers import AutoModelForAudioClassification

        return AutoModelForAudioClassification

    def model_kwargs(self, num_labels: int | None, labels: list[str] | None) -> dict[str, Any]:
        return {**label_kwargs(num_labels, labels), "ignore_mismatched_sizes": True}

    def load_processor(self, cfg: Any, path: str | None) -> Any:
        return audio_processor(path)

    def load_model(self, cfg, path, num_labels, dtype, kw, labels=None, log=print) -> nn.Module:
        return super(ImageClassification, self).load_model(cfg, path, num_labels, dtype, kw, labels, log)

    def adapter_defaults(self, model: nn.Module, kw: dict[str, Any], fields: set[str], why: list[str]) -> None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if "target_modules" not in kw and mt in TARGETS:
            kw["target_modules"] = list(TARGETS[mt])
            why.append(f"target_modules={TARGETS[mt]}: the encoder's attention query/value ({mt})")
        if "modules_to_save" in fields and "modules_to_save" not in kw:
            found = sorted({n.split(".")[-1] for n, m in model.named_modules()
                            if n.split(".")[-1] in ("projector", "classifier") and n.count(".") <= 1})
            if found:
                kw["modules_to_save"] = found
                why.append(f"modules_to_save={found}: the new classifier head trains in full")

    def describe(self, data: Any) -> str | None:
        return f"classifier head: {len(data.labels or [])} classes {data.labels} (a new head trains in full with the adapter)"

    def measured_metrics(self, ev: Any) -> list[str]:
        k = top_k(len(ev.data.labels or []))
        return ["eval_loss", "accuracy", "f1"] + ([f"top{k}_accuracy"] if k else [])

    def read_inputs(self, source: str) -> list[dict[str, Any]]:
        return read_audio_inputs(source)

    def predict(self, model, processor, rows, opts):
        return classify_audio(model, processor, rows, saved_labels(opts["adapter"]), opts["batch_size"])

    def load_for_adapter(self, path: str, adapter: str | None, load_kwargs: dict | None) -> tuple[nn.Module, Any]:
        from ..job import hf_quiet

        with hf_quiet():
            model = self.model_class().from_pretrained(path, dtype=torch.float32, **self.adapter_model_kwargs(adapter),
                                                       **(load_kwargs or {}))
        return model, audio_processor(path)

    def adapter_model_kwargs(self, adapter: str | None) -> dict[str, Any]:
        return {**label_kwargs(saved_num_labels(adapter), saved_labels(adapter)), "ignore_mismatched_sizes": True}


def audio_processor(path: str | None, log=print):
    """The folder's processor (feature extractor, + tokenizer for speech), else Wav2Vec2's feature
    extractor at 16 kHz (a hand-saved model often ships none)."""
    from transformers import AutoFeatureExtractor, AutoProcessor, Wav2Vec2FeatureExtractor

    from ..job import hf_quiet

    for cls in (AutoProcessor, AutoFeatureExtractor):
        try:
            with hf_quiet():
                proc = cls.from_pretrained(path)
            if hasattr(getattr(proc, "feature_extractor", proc), "sampling_rate"):
                return proc
        except (OSError, ValueError, KeyError, TypeError):
            continue
    log(f"feature extractor: none in {path}; 16 kHz raw audio, zero mean / unit variance (Wav2Vec2's)")
    return Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True)


def read_audio_inputs(source: str) -> list[dict[str, Any]]:
    """`slimtune predict` inputs: an audio file, a folder of them, or a data file with an `audio` column."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXT)
        if not files:
            raise DataError(f"{source}: no audio files ({', '.join(AUDIO_EXT)}) in this folder")
        return [{"audio": str(f)} for f in files]
    if p.suffix.lower() in AUDIO_EXT:
        return [{"audio": str(p)}]
    from ..datafiles import read_rows

    rows = read_rows(source)
    if "audio" not in rows[0]:
        raise DataError(f"{source}: pass an audio file, a folder of them, or a data file with an 'audio' column "
                        f"(this one has {sorted(map(str, rows[0]))})")
    return [{**r, "audio": str(media_path(r["audio"], source))} for r in rows]


def waves(proc, rows, start: int) -> list:
    from .audio_io import window_seconds

    return [read_audio(Path(r["audio"]), sampling_rate(proc), f"input row {start + j + 1}", window_seconds(proc))
            for j, r in enumerate(rows)]


@torch.no_grad()
def classify_audio(model, proc, rows: list[dict[str, Any]], labels: list[str] | None,
                   batch_size: int = 16) -> list[dict[str, Any]]:
    """Each row plus `label` (the most probable class) and `probability` (its softmax probability)."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        logits = model(**{k: v.to(dev) for k, v in features(proc, waves(proc, chunk, s)).items()})["logits"].float()
        p, idx = logits.softmax(-1).max(-1)
        for r, i, q in zip(chunk, idx.tolist(), p.tolist()):
            out.append({**r, "label": labels[i] if labels and i < len(labels) else str(i), "probability": round(q, 6)})
    return out


__all__ = ["AudioClassification", "audio_processor", "classify_audio", "encode_audio", "AUDIO_TYPES"]
