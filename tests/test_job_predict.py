"""`slimtune predict`: a classifier's label + probability for a file or stdin (CSV / JSONL out), the
same probabilities the adapter gives when loaded by hand; an LM's batched generation equals its
one-row-at-a-time generation."""
import io
import json
import sys

import pytest
import torch

from conftest_train import instruction_rows, job, sentiment_rows, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from slimtune.cli.main import main
from slimtune.train.run import run_train


@pytest.fixture(scope="module")
def cls_run(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    write_jsonl(d / "s.jsonl", sentiment_rows(40))
    run_train(job(tiny_bert, d / "run", {"train": str(d / "s.jsonl")}, train={"max_steps": 6, "lr": 5e-2}),
              log=lambda *_: None, progress=False)
    return d / "run"


def _stdin(monkeypatch, text: str):
    buf = io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8")
    buf.isatty = lambda: False
    monkeypatch.setattr(sys, "stdin", buf)


def test_classifier_file_to_csv_matches_the_adapter(cls_run, tiny_bert, tmp_path, capsys):
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimtune import PeftModel

    rows = [{"text": t, "id": i} for i, t in enumerate(["great fun", "dull mess", "loved it", "tedious"])]
    write_jsonl(tmp_path / "new.jsonl", rows)
    assert main(["predict", str(cls_run), str(tmp_path / "new.jsonl"), "--out", str(tmp_path / "p.csv")]) == 0
    out = pd.read_csv(tmp_path / "p.csv")
    assert list(out.columns) == ["text", "id", "label", "probability"] and list(out["id"]) == [0, 1, 2, 3]
    assert set(out["label"]) <= {"neg", "pos"} and ((out["probability"] >= 0.5) & (out["probability"] <= 1)).all()
    pm = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
                                   cls_run / "best").eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.no_grad():
        prob = pm(**tok([r["text"] for r in rows], padding=True, return_tensors="pt")).logits.softmax(-1)
    names = json.loads((cls_run / "best/labels.json").read_text())
    assert list(out["label"]) == [names[i] for i in prob.argmax(-1).tolist()]
    assert torch.allclose(torch.tensor(out["probability"].tolist(), dtype=torch.float64), prob.max(-1).values.double(), atol=1e-5)


def test_classifier_stdin_lines_to_jsonl(cls_run, monkeypatch, capsys):
    _stdin(monkeypatch, "great fun\n\ndull mess\n")
    capsys.readouterr()
    assert main(["predict", str(cls_run)]) == 0
    cap = capsys.readouterr()
    rows = [json.loads(x) for x in cap.out.splitlines()]
    assert [r["text"] for r in rows] == ["great fun", "dull mess"] and all("probability" in r for r in rows)
    assert "predicted 2 row(s)" in cap.err


def test_predict_errors_are_messages(cls_run, tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "x.jsonl", [{"sentence": "a"}])
    capsys.readouterr()
    assert main(["predict", str(cls_run), str(tmp_path / "x.jsonl")]) == 2
    assert "input row 1 has no 'text' column" in capsys.readouterr().err
    assert main(["predict", str(cls_run), str(tmp_path / "x.jsonl"), "--column", "sentence"]) == 0
    _stdin(monkeypatch, "")
    assert main(["predict", str(cls_run)]) == 2
    assert "stdin: no input rows" in capsys.readouterr().err


def test_lm_batched_generation_equals_one_at_a_time(tiny_llama, tmp_path, capsys):
    write_jsonl(tmp_path / "i.jsonl", instruction_rows(40))
    run_train(job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "i.jsonl")}, train={"max_steps": 4}),
              log=lambda *_: None, progress=False)
    rows = [{"instruction": "what is the capital of france?"}, {"prompt": "what is the opposite of hot and cold?"},
            {"messages": [{"role": "user", "content": "hello"}]}, {"text": "two plus two"}]
    write_jsonl(tmp_path / "new.jsonl", rows)
    outs = []
    for bs in ("4", "1"):
        assert main(["predict", str(tmp_path / "run"), str(tmp_path / "new.jsonl"), "--batch-size", bs,
                     "--max-new-tokens", "5", "--out", str(tmp_path / f"g{bs}.jsonl")]) == 0
        outs.append([json.loads(x) for x in (tmp_path / f"g{bs}.jsonl").read_text().splitlines()])
    assert [r["generated"] for r in outs[0]] == [r["generated"] for r in outs[1]]
    assert all(r["generated"] for r in outs[0]) and [dict(r, generated=None) for r in outs[0]] == \
        [dict(r, generated=None) for r in rows]
