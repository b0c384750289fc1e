"""audio_classification and speech_recognition through the whole job on tiny random-init models:
Wav2Vec2 (a classifier, and CTC with a character vocabulary) and Whisper (seq2seq with a byte-level
tokenizer), on WAV clips written with soundfile (some at 8 kHz, resampled by soxr). Train improves
the held-out metric / loss, predict equals the adapter, merge equals the adapter; a corrupt file, a
sample rate too low and a clip longer than Whisper's window are one message each, exit 2."""
import json

import numpy as np
import pytest
import torch

from conftest_train import job, write_jsonl  # noqa: F401
from slimtune.cli.main import main
from slimtune.train.run import run_train

WORDS = ["ab", "ba", "abba", "baab"]


def tone(path, hz, secs=0.4, rate=16000, seed=0):
    import soundfile as sf

    t = np.arange(int(secs * rate)) / rate
    rng = np.random.default_rng(seed)
    sf.write(path, (0.5 * np.sin(2 * np.pi * hz * t) + 0.05 * rng.normal(size=t.size)).astype("float32"), rate)


def make_tones(root, n=10):
    """root/<low|high>/<i>.wav: the class is the pitch; every third clip is at 8 kHz (resampled)."""
    for name, hz in (("low", 220), ("high", 1800)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            tone(root / name / f"{i}.wav", hz * (1 + 0.05 * (i % 3)), rate=8000 if i % 3 == 0 else 16000, seed=i)
    return root


def speech_rows(root, n=12):
    """Clips whose pitch pattern spells a word: 'a' a low tone, 'b' a high one."""
    import soundfile as sf

    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        t = np.arange(int(0.15 * 16000)) / 16000
        wave = np.concatenate([0.5 * np.sin(2 * np.pi * (300 if ch == "a" else 2000) * t) for ch in w])
        sf.write(root / f"s{i}.wav", wave.astype("float32"), 16000)
        rows.append({"audio": f"s{i}.wav", "text": w})
    return rows


@pytest.fixture(scope="module")
def tiny_w2v_cls(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, classifier_proj_size=16, num_labels=2)
    path = tmp_path_factory.mktemp("w2v_cls")
    Wav2Vec2ForSequenceClassification(cfg).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_w2v_ctc(tmp_path_factory):
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)

    path = tmp_path_factory.mktemp("w2v_ctc")
    (path / "vocab.json").write_text(json.dumps({"<pad>": 0, "<unk>": 1, "|": 2, "a": 3, "b": 4}))
    tok = Wav2Vec2CTCTokenizer(str(path / "vocab.json"), pad_token="<pad>", unk_token="<unk>", word_delimiter_token="|")
    proc = Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True),
                             tokenizer=tok)
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, vocab_size=5, pad_token_id=0)
    Wav2Vec2ForCTC(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = tmp_path_factory.mktemp("whisper")
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    for s in specials:
        vocab[s] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = WhisperTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), unk_token="<|endoftext|>",
                           bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    proc = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok)
    torch.manual_seed(0)
    sot, eot = tok.convert_tokens_to_ids("<|startoftranscript|>"), tok.eos_token_id
    cfg = WhisperConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=sot,
                        pad_token_id=eot, eos_token_id=eot, bos_token_id=eot)
    WhisperForConditionalGeneration(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


def _quiet(*_):
    pass


def test_audio_classification_folder_trains_predicts_merges(tiny_w2v_cls, tmp_path):
    make_tones(tmp_path / "clips")
    cfg = job(tiny_w2v_cls, tmp_path / "run", {"train": str(tmp_path / "clips"), "val_fraction": 0.3},
              train={"max_steps": 16, "lr": 2e-2, "eval_every": 8, "precision": "fp32"})
    res = run_train(cfg, log=_quiet, progress=False)
    assert res["task"] == "audio_classification" and res["format"] == "audio_files" and res["labels"] == ["high", "low"]
    assert res["after"]["accuracy"] > res["before"]["accuracy"] or res["after"]["eval_loss"] < res["before"]["eval_loss"]
    ac = json.loads((tmp_path / "run/best/adapter_config.json").read_text())
    assert sorted(ac["target_modules"]) == ["q_proj", "v_proj"] and sorted(ac["modules_to_save"]) == ["classifier", "projector"]
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "clips/low"), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {r["label"] for r in rows} <= {"high", "low"}
    from transformers import AutoModelForAudioClassification

    from slimtune import PeftModel
    from slimtune.train.tasks.audio_classification import audio_processor, waves

    proc = audio_processor(str(tiny_w2v_cls))
    feats = proc(waves(proc, rows[:3], 0), sampling_rate=16000, return_tensors="pt", padding=True,
                 return_attention_mask=True)
    base = AutoModelForAudioClassification.from_pretrained(tiny_w2v_cls, num_labels=2)
    pm = PeftModel.from_pretrained(base, tmp_path / "run/best").eval()
    with torch.no_grad():
        prob = pm(**feats).logits.softmax(-1)
    assert torch.allclose(torch.tensor([r["probability"] for r in rows[:3]]), prob.max(-1).values, atol=1e-4)
    assert main(["merge", "--adapter", str(tmp_path / "run/best"), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForAudioClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(merged(**feats).logits.softmax(-1), prob, atol=1e-5)


@pytest.mark.parametrize("which", ["ctc", "whisper"])
def test_speech_recognition_trains_with_wer(which, tiny_w2v_ctc, tiny_whisper, tmp_path):
    model = tiny_w2v_ctc if which == "ctc" else tiny_whisper
    write_jsonl(tmp_path / "s.jsonl", speech_rows(tmp_path))
    cfg = job(model, tmp_path / "run", {"train": str(tmp_path / "s.jsonl"), "val_fraction": 0.34},
              train={"max_steps": 12, "lr": 2e-2, "eval_every": 6, "precision": "fp32"},
              eval={"max_new_tokens": 6, "batch_size": 4})
    res = run_train(cfg, log=_quiet, progress=False)
    assert res["task"] == "speech_recognition" and res["metric"] == "wer"
    assert {"wer", "cer", "exact_match", "eval_loss"} <= set(res["after"])
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
    ac = json.loads((tmp_path / "run/best/adapter_config.json").read_text())
    assert sorted(ac["target_modules"]) == ["q_proj", "v_proj"]
    assert (ac["modules_to_save"] == ["lm_head"]) == (which == "ctc")
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "s0.wav"), "--out", str(tmp_path / "p.jsonl")]) == 0
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert isinstance(row["text"], str)


def test_audio_mistakes_are_one_message(tiny_w2v_cls, tiny_whisper, tmp_path, capsys):
    make_tones(tmp_path / "c", n=4)
    (tmp_path / "c/low/1.wav").write_bytes(b"RIFF....not audio")
    assert main(["train", f"model={tiny_w2v_cls}", f"data.train={tmp_path / 'c'}", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "low/1.wav" in err and "cannot be decoded" in err and "row" in err and "Traceback" not in err
    tone(tmp_path / "c/low/1.wav", 220, rate=2000)
    assert main(["train", f"model={tiny_w2v_cls}", f"data.train={tmp_path / 'c'}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "sample rate of 2000 Hz" in capsys.readouterr().err
    tone(tmp_path / "long.wav", 300, secs=31)
    write_jsonl(tmp_path / "l.jsonl", [{"audio": "long.wav", "text": "ab"}] * 3)
    assert main(["train", f"model={tiny_whisper}", f"data.train={tmp_path / 'l.jsonl'}", f"output_dir={tmp_path / 'o2'}"]) == 2
    err = capsys.readouterr().err
    assert "31.0 s long" in err and "30 s window" in err and "the last 1.0 s would be cut" in err


@pytest.mark.parametrize("which, cls", [("ctc", "Wav2Vec2ForCTC"), ("whisper", "WhisperForConditionalGeneration")])
def test_inspect_detects_speech(which, cls, tiny_w2v_ctc, tiny_whisper, capsys):
    assert main(["inspect", str(tiny_w2v_ctc if which == "ctc" else tiny_whisper)]) == 0
    out = capsys.readouterr().out
    assert f"{cls}, " in out and "task speech_recognition" in out and "target_modules=['q_proj', 'v_proj']" in out
