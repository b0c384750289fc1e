"""Speech recognition: rows with an `audio` column of paths (relative to the data file) and a `text`
transcript. Two model families, told apart by the model's config:

  CTC      (Wav2Vec2 / HuBERT `...ForCTC`): labels = the transcript's characters, -100 on padding;
           the output head (`lm_head`) trains in full with the adapter; greedy CTC decoding.
  seq2seq  (Whisper): labels = the decoder's prompt tokens (<|en|><|transcribe|><|notimestamps|>)
           + transcript + <|endoftext|>, -100 on padding (the model shifts them right behind
           <|startoftranscript|>); greedy decoding from the same prompt.

Held-out metrics: WER and CER (jiwer), exact match of the normalised transcript, and the loss;
the default selection metric is WER (lower is better). Audio reading: audio_io.py.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from ..datafiles import DataError
from . import hf_config, register_task
from .audio_classification import AUDIO_TYPES, audio_processor, read_audio_inputs, waves
from .audio_io import IGNORE, collate_audio, encode_audio, features, window_seconds
from .base import Task

LOWER_IS_BETTER = ("wer", "cer")


def is_ctc(hf_cfg: Any) -> bool:
    archs = getattr(hf_cfg, "architectures", None) or []
    return any(a.endswith("ForCTC") for a in archs) or (hf_cfg is not None and hf_cfg.model_type != "whisper"
                                                         and not getattr(hf_cfg, "is_encoder_decoder", False))


@register_task
class SpeechRecognition(Task):
    name = "speech_recognition"
    kind = "speech recognizer"
    formats = ("speech",)

    data_hint = "rows with an 'audio' column of paths and a 'text' transcript"

    def check_format(self, fmt, keys, cfg, source) -> None:
        if fmt not in self.formats:
            raise DataError(f"{source}: task {self.name} needs {self.data_hint}; the rows have {sorted(keys)}"
                            + (f" ({fmt} data)" if fmt else ""))

    def owns_model(self, model_name: str, hf_cfg: Any) -> bool:
        archs = getattr(hf_cfg, "architectures", None) or []
        return hf_cfg is not None and any(a.endswith(("ForCTC", "ForSpeechSeq2Seq")) or a == "WhisperForConditionalGeneration"
                                          for a in archs)

    def accepts_model(self, model_name: str, hf_cfg: Any) -> bool:
        return hf_cfg is not None and hf_cfg.model_type in AUDIO_TYPES

    def load_processor(self, cfg: Any, path: str | None) -> Any:
        from ..config import JobConfigError

        proc = audio_processor(path)
        if getattr(proc, "tokenizer", None) is None:
            raise JobConfigError(f"model '{cfg.model_name()}': speech recognition needs the model's processor with its "
                                 f"tokenizer in {path} (save_pretrained of the Wav2Vec2Processor / WhisperProcessor)")
        secs = cfg.data.audio_window_s
        if secs is not None:
            full = window_seconds(proc)
            if full is None:
                raise JobConfigError(f"data.audio_window_s={secs}: model '{cfg.model_name()}' has no fixed audio window "
                                     "(only Whisper pads every clip to one); remove data.audio_window_s")
            if secs > full:
                raise JobConfigError(f"data.audio_window_s={secs} is longer than the model's {full:g} s window; give "
                                     f"at most {full:g}")
            set_window(proc, secs)
        return proc

    def model_class(self, hf_cfg: Any = None):
        from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq

        return AutoModelForCTC if is_ctc(hf_cfg) else AutoModelForSpeechSeq2Seq

    def load_model(self, cfg, path, num_labels, dtype, kw, labels=None, log=print) -> nn.Module:
        from ..config import JobConfigError
        from ..job import hf_quiet

        conf = hf_config(path)
        extra = {"ctc_loss_reduction": "mean"} if is_ctc(conf) else {}
        try:
            with hf_quiet():
                model = self.model_class(conf).from_pretrained(path, dtype=dtype, **extra, **kw)
        except (OSError, ValueError, KeyError) as e:
            raise JobConfigError(f"model '{cfg.model_name()}' cannot be loaded as a speech recognizer from {path}: "
                                 f"{str(e)[:300]}") from None
        if cfg.data.audio_window_s is not None:
            shorten_encoder(model, cfg.data.audio_window_s)
            log(f"audio window: {cfg.data.audio_window_s} s (data.audio_window_s), the encoder's first "
                f"{model.config.max_source_positions} of its positions")
        return model

    def skeleton(self, hf_cfg: Any, num_labels: int | None) -> nn.Module:
        with torch.device("meta"):
            return self.model_class(hf_cfg).from_config(hf_cfg)

    def adapter_defaults(self, model: nn.Module, kw: dict[str, Any], fields: set[str], why: list[str]) -> None:
        if "target_modules" not in kw and getattr(model.config, "model_type", None) in AUDIO_TYPES:
            kw["target_modules"] = ["q_proj", "v_proj"]
            why.append("target_modules=['q_proj', 'v_proj']: attention query/value of the speech model")
        if is_ctc(model.config) and "modules_to_save" in fields and "modules_to_save" not in kw:
            kw["modules_to_save"] = ["lm_head"]
            why.append("modules_to_save=['lm_head']: the CTC output head trains in full (its vocabulary is the data's)")

    def describe(self, data: Any) -> str | None:
        return None

    # ---- evaluation --------------------------------------------------------------------------------
    def measured_metrics(self, ev: Any) -> list[str]:
        return ["eval_loss", "wer", "cer", "exact_match"]

    def default_metric(self, ev: Any) -> str:
        return "wer"

    @torch.no_grad()
    def evaluate(self, ev: Any) -> dict[str, float]:
        """Loss over the validation batches, then greedy transcripts against the references."""
        import jiwer

        model = ev._eval_model()
        base = ev.model_unwrapped.get_base_model()
        tot, n = 0.0, 0
        hyps: list[str] = []
        refs: list[str] = []
        bs = ev.cfg.eval.batch_size
        for i in range(0, len(ev.data.eval), bs):
            chunk = ev.data.eval[i:i + bs]
            batch = {k: v.to(ev.device) for k, v in collate_audio(chunk).items()}
            with ev.acc.autocast():
                out = model(**batch)
            tot += float(out["loss"]) * len(chunk)
            n += len(chunk)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            hyps += transcribe_batch(base, ev.tok, inputs, out["logits"], ev.cfg.eval.max_new_tokens)
            refs += [e["reference"] for e in chunk]
        res = {"eval_loss": tot / max(n, 1)}
        res.update(speech_metrics(hyps, refs))
        ev.last_samples = [{"prompt": "(audio)", "reference": r, "generated": h} for r, h in zip(refs[:5], hyps[:5])]
        return res

    # ---- predict -----------------------------------------------------------------------------------
    def read_inputs(self, source: str) -> list[dict[str, Any]]:
        return read_audio_inputs(source)

    @torch.no_grad()
    def predict(self, model, processor, rows, opts):
        model.eval()
        base = model.get_base_model()
        dev = next(model.parameters()).device
        out = []
        for s in range(0, len(rows), opts["batch_size"]):
            chunk = rows[s:s + opts["batch_size"]]
            inputs = {k: v.to(dev) for k, v in features(processor, waves(processor, chunk, s)).items()}
            logits = model(**inputs)["logits"] if is_ctc(base.config) else None
            texts = transcribe_batch(base, processor, inputs, logits, opts["max_new_tokens"])
            out += [{**r, "text": t} for r, t in zip(chunk, texts)]
        return out

    def load_for_adapter(self, path: str, adapter: str | None, load_kwargs: dict | None) -> tuple[nn.Module, Any]:
        from ..job import hf_quiet

        conf = hf_config(path)
        with hf_quiet():
            model = self.model_class(conf).from_pretrained(path, dtype=torch.float32, **(load_kwargs or {}))
        proc = audio_processor(path)
        secs = saved_window(adapter)
        if secs is not None:  # the adapter was trained on a shorter window: feed it the same
            set_window(proc, secs)
            shorten_encoder(model, secs)
        return model, proc


# ---- Whisper's audio window (data.audio_window_s) ------------------------------------------------------

def set_window(proc: Any, seconds: int) -> None:
    """Pad (and cap) every clip's features to `seconds` instead of the feature extractor's chunk."""
    fe = getattr(proc, "feature_extractor", proc)
    fe.chunk_length = int(seconds)
    fe.n_samples = int(seconds) * fe.sampling_rate
    fe.nb_max_frames = fe.n_samples // fe.hop_length


def shorten_encoder(model: nn.Module, seconds: int) -> None:
    """Whisper's encoder on a `seconds` window: its first 50 * seconds positional embeddings (the
    two convolutions halve the 100 mel frames per second), the rest of the model unchanged."""
    enc = model.get_encoder()
    n = int(seconds) * 100 // (enc.conv1.stride[0] * enc.conv2.stride[0])
    if n > enc.embed_positions.num_embeddings:
        raise ValueError(f"a {seconds} s window needs {n} encoder positions; the model has "
                         f"{enc.embed_positions.num_embeddings}")
    table = enc.embed_positions.weight.data[:n].clone()
    enc.embed_positions = nn.Embedding(n, table.shape[1], dtype=table.dtype, device=table.device)
    enc.embed_positions.weight.data.copy_(table)
    enc.embed_positions.requires_grad_(False)
    enc.max_source_positions = n
    model.config.max_source_positions = n
    enc.config.max_source_positions = n


def saved_window(adapter: str | None) -> int | None:
    """The audio window an adapter was trained on: the chunk length of the Whisper feature extractor
    its run saved (<run>/adapter/, beside <run>/best/), when shorter than 30 s; else None."""
    import json
    from pathlib import Path

    if not adapter:
        return None
    for d in (Path(adapter), Path(adapter).parent / "adapter"):
        for name, key in (("processor_config.json", "feature_extractor"), ("preprocessor_config.json", None)):
            f = d / name
            if not f.is_file():
                continue
            try:
                fe = json.loads(f.read_text())
            except ValueError:
                continue
            fe = fe.get(key) if key else fe
            if isinstance(fe, dict) and fe.get("feature_extractor_type") == "WhisperFeatureExtractor":
                n = fe.get("chunk_length")
                return int(n) if n and n < 30 else None
    return None


# ---- labels and decoding -----------------------------------------------------------------------------

def prompt_ids(proc: Any, model_cfg: Any = None) -> list[int]:
    """Whisper's decoder prompt after <|startoftranscript|>: language, task, no timestamps (English
    transcription); [] for CTC."""
    tok = proc.tokenizer
    if not hasattr(tok, "set_prefix_tokens"):
        return []
    tok.set_prefix_tokens(language="english", task="transcribe", predict_timestamps=False)
    return list(tok.prefix_tokens)


def label_ids(proc: Any, text: str) -> list[int]:
    """The training labels of a transcript: CTC characters, or Whisper's prompt + text + <|endoftext|>
    without <|startoftranscript|> (the model prepends it when shifting the labels right)."""
    tok = proc.tokenizer
    prefix = prompt_ids(proc)
    if not prefix:
        return tok(text).input_ids
    ids = prefix + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return ids[1:]  # prefix[0] is <|startoftranscript|>, the decoder's start token


def transcribe_batch(base: nn.Module, proc: Any, inputs: dict[str, torch.Tensor], logits: torch.Tensor | None,
                     max_new_tokens: int) -> list[str]:
    """Greedy transcripts: CTC argmax (repeats merged, blanks dropped by the tokenizer), or the
    seq2seq model's greedy continuation of its prompt (transformers' plain generate loop)."""
    if is_ctc(base.config):
        return [t.strip() for t in proc.batch_decode(logits.argmax(-1))]
    from transformers import GenerationMixin

    prefix = prompt_ids(proc)
    start = torch.tensor([prefix], device=next(iter(inputs.values())).device).repeat(len(next(iter(inputs.values()))), 1)
    room = getattr(base.config, "max_target_positions", 448) - len(prefix)  # the decoder's position table
    ids = GenerationMixin.generate(base, **inputs, decoder_input_ids=start, max_new_tokens=min(max(max_new_tokens, 8), room),
                                   do_sample=False, eos_token_id=proc.tokenizer.eos_token_id,
                                   pad_token_id=proc.tokenizer.eos_token_id)
    return [t.strip() for t in proc.tokenizer.batch_decode(ids[:, len(prefix):], skip_special_tokens=True)]


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", s.lower()).split())


def speech_metrics(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """WER and CER (jiwer) of the normalised transcripts (lower case, punctuation dropped), and exact match."""
    import jiwer

    h, r = [_norm(x) for x in hyps], [_norm(x) for x in refs]
    keep = [i for i, x in enumerate(r) if x]
    if not keep:
        return {"wer": 0.0, "cer": 0.0, "exact_match": 0.0}
    h, r = [h[i] for i in keep], [r[i] for i in keep]
    return {"wer": float(jiwer.wer(r, h)), "cer": float(jiwer.cer(r, h)),
            "exact_match": sum(a == b for a, b in zip(h, r)) / len(r)}


def prepare_speech(cfg, proc, rows, val_rows, test_rows, source, val_source, out, lengths) -> None:
    """Rows of audio + transcript -> examples {input_values | input_features, labels, reference}."""
    col = cfg.text_column
    for split_rows, src, dst in ((rows, source, out.train), (val_rows, val_source, out.eval),
                                 (list(test_rows), cfg.test or source, out.test)):
        for i, r in enumerate(split_rows, 1):
            if col not in r or r[col] is None or not str(r[col]).strip():
                raise DataError(f"{src}: row {i} has no transcript in {col!r} (speech recognition needs audio + "
                                f"{col}); fill it in, drop the row, or set data.text_column")
            ex = encode_audio(proc, r, "audio", src, i)
            text = str(r[col]).strip()
            ex["labels"] = label_ids(proc, text)[:cfg.max_length]
            ex["reference"] = text
            lengths.append(len(ex["labels"]))
            dst.append(ex)
