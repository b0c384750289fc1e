"""Whisper's shorter audio window (data.audio_window_s) and the shipped spoken-digit clips.

The window: the job pads clips to N seconds and keeps the encoder's first 50*N positional embeddings;
the run saves that window with its processor, so predict / merge of the adapter feed the same
features (the encoder would refuse any other length); a clip longer than the window, and a window on
a model that has none (CTC), are one message each, exit 2."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest_train import job, write_jsonl  # noqa: F401
from slimtune.cli.main import main
from slimtune.train.run import run_train
from test_task_audio import speech_rows, tiny_w2v_ctc, tiny_whisper, tone  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples/data/spoken_digits"


def test_shorten_encoder_keeps_the_first_positions(tiny_whisper):  # noqa: F811
    from transformers import WhisperForConditionalGeneration

    from slimtune.train.tasks.audio_classification import audio_processor
    from slimtune.train.tasks.speech_recognition import set_window, shorten_encoder

    m = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    full = m.model.encoder.embed_positions.weight.detach().clone()
    shorten_encoder(m, 3)
    assert m.config.max_source_positions == 150 and m.model.encoder.embed_positions.num_embeddings == 150
    assert torch.equal(m.model.encoder.embed_positions.weight, full[:150])
    assert not m.model.encoder.embed_positions.weight.requires_grad
    proc = audio_processor(str(tiny_whisper))
    set_window(proc, 3)
    feats = proc.feature_extractor([np.zeros(8000, np.float32)], sampling_rate=16000, return_tensors="pt").input_features
    assert feats.shape[-1] == 300  # 100 mel frames per second
    with torch.no_grad():
        out = m(input_features=feats, decoder_input_ids=torch.tensor([[m.config.decoder_start_token_id]]))
    assert out.encoder_last_hidden_state.shape[1] == 150


def test_window_trains_and_travels_with_the_adapter(tiny_whisper, tmp_path):  # noqa: F811
    write_jsonl(tmp_path / "s.jsonl", speech_rows(tmp_path))
    cfg = job(tiny_whisper, tmp_path / "run", {"train": str(tmp_path / "s.jsonl"), "val_fraction": 0.34,
                                                "audio_window_s": 2},
              train={"max_steps": 6, "lr": 2e-2, "eval_every": 6, "precision": "fp32"},
              eval={"max_new_tokens": 4, "batch_size": 4})
    lines = []
    res = run_train(cfg, log=lines.append, progress=False)
    assert any("audio window: 2 s" in x and "first 100" in x for x in lines)
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
    fe = json.loads((tmp_path / "run/adapter/processor_config.json").read_text())["feature_extractor"]
    assert fe["chunk_length"] == 2 and fe["n_samples"] == 32000
    # predict on the run's best adapter: the base's encoder takes only 2 s of features if the window is applied
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "s0.wav"), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert isinstance(json.loads((tmp_path / "p.jsonl").read_text())["text"], str)
    from slimtune.train.tasks import get_task

    model, proc = get_task("speech_recognition").load_for_adapter(str(tiny_whisper), str(tmp_path / "run/best"), None)
    assert model.config.max_source_positions == 100 and proc.feature_extractor.n_samples == 32000
    # merged: the model and its processor keep the window together
    assert main(["merge", "--adapter", str(tmp_path / "run/best"), "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m/config.json").read_text())["max_source_positions"] == 100
    assert json.loads((tmp_path / "m/processor_config.json").read_text())["feature_extractor"]["chunk_length"] == 2


def test_window_mistakes_are_one_message(tiny_whisper, tiny_w2v_ctc, tmp_path, capsys):  # noqa: F811
    tone(tmp_path / "long.wav", 300, secs=2.5)
    write_jsonl(tmp_path / "l.jsonl", [{"audio": "long.wav", "text": "ab"}] * 3)
    args = ["train", f"model={tiny_whisper}", f"data.train={tmp_path / 'l.jsonl'}", f"output_dir={tmp_path / 'o'}",
            "task=speech_recognition"]
    assert main(args + ["data.audio_window_s=2"]) == 2
    err = capsys.readouterr().err
    assert "2.5 s long" in err and "2 s window" in err and "the last 0.5 s would be cut" in err \
        and "data.audio_window_s" in err and "row 1" in err and "Traceback" not in err
    assert main(args + ["data.audio_window_s=31"]) == 2
    assert "audio_window_s" in capsys.readouterr().err
    write_jsonl(tmp_path / "c.jsonl", speech_rows(tmp_path, n=3))
    assert main(["train", f"model={tiny_w2v_ctc}", f"data.train={tmp_path / 'c.jsonl'}", f"output_dir={tmp_path / 'o2'}",
                 "data.audio_window_s=2"]) == 2
    err = capsys.readouterr().err
    assert "no fixed audio window" in err and "remove data.audio_window_s" in err and "Traceback" not in err


def test_empty_audio_file_is_one_message(tiny_whisper, tmp_path, capsys):  # noqa: F811
    import soundfile as sf

    rows = speech_rows(tmp_path, n=4)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    rows[1]["audio"] = "empty.wav"
    write_jsonl(tmp_path / "e.jsonl", rows[:3])
    write_jsonl(tmp_path / "v.jsonl", rows[3:])  # a validation file: train rows keep the file's numbering
    assert main(["train", f"model={tiny_whisper}", f"data.train={tmp_path / 'e.jsonl'}",
                 f"data.validation={tmp_path / 'v.jsonl'}", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "empty.wav" in err and "holds no samples" in err and "Traceback" not in err


def test_spoken_digit_clips_are_split_by_voice():
    import soundfile as sf

    splits = {s: list(csv.DictReader(open(DIGITS / f"{s}.csv"))) for s in ("train", "heldout")}
    assert len(splits["train"]) == 80 and len(splits["heldout"]) == 30
    voices = {s: {r["voice"].split("+")[0] for r in rows} for s, rows in splits.items()}
    assert not voices["train"] & voices["heldout"]  # no held-out voice speaks in training
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for rows in splits.values():
        assert sorted({r["text"] for r in rows}) == sorted(words)
        for r in rows:
            info = sf.info(str(DIGITS / r["audio"]))
            assert info.samplerate == 16000 and info.channels == 1 and 0.3 < info.duration < 2.0, r
