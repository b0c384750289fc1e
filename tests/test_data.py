"""Data formats, answer-only loss masks, validation carving, truncation counts and bad-data errors."""
import json

import pytest

from conftest_train import chat_rows, instruction_rows, sentiment_rows, write_jsonl
from slimtune.train.config import DataConfig
from slimtune.train.data import IGNORE, DataError, prepare


@pytest.fixture(scope="module")
def tok():
    from conftest_train import _tok

    return _tok()


def _prep(tok, task="auto", **kw):
    return prepare(DataConfig(**kw), tok, task, seed=0, log=lambda *_: None)


def test_classification_formats(tmp_path, tok):
    import pandas as pd

    rows = sentiment_rows(20)
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    outs = [_prep(tok, train=str(tmp_path / f"a.{ext}")) for ext in ("jsonl", "json", "csv", "parquet")]
    for p in outs:
        assert p.format == "classification" and p.labels == ["neg", "pos"]
        assert len(p.train) == 18 and len(p.eval) == 2  # 10% carved off
        assert "carved 2 of 20" in p.stats["validation"]
    assert [e["input_ids"] for e in outs[0].train] == [e["input_ids"] for e in outs[3].train]


def test_instruction_loss_on_answer_only(tmp_path, tok):
    write_jsonl(tmp_path / "i.jsonl", instruction_rows(10))
    p = _prep(tok, train=str(tmp_path / "i.jsonl"))
    assert p.format == "instruction"
    ex = p.train[0]
    ans = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE]
    assert tok.decode(ans, skip_special_tokens=True).strip() in {"paris", "four", "blue", "cold"}
    assert ex["labels"][0] == IGNORE and p.eval_raw and p.answers  # short answers: generated accuracy on


def test_chat_loss_on_assistant_turns(tmp_path, tok):
    write_jsonl(tmp_path / "c.jsonl", chat_rows(10))
    p = _prep(tok, train=str(tmp_path / "c.jsonl"))
    assert p.format == "chat"
    ex = p.train[0]
    learned = tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE])
    assert "hi there" in learned and "fine thanks" in learned
    assert "hello" not in learned and "how are you" not in learned


def test_text_format_and_truncation_count(tmp_path, tok):
    rows = [{"text": "word " * (5 if i % 2 else 100)} for i in range(10)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    logs = []
    p = prepare(DataConfig(train=str(tmp_path / "t.jsonl"), max_length=32), tok, "auto", 0, logs.append)
    assert p.format == "text" and p.stats["truncated"] == 5
    assert any("cut 5 of 10" in l for l in logs)
    assert all(len(e["input_ids"]) <= 32 for e in p.train)


def test_builtin_rotten_tomatoes(tok):
    p = _prep(tok, builtin="rotten_tomatoes", max_train=50, max_eval=20)
    assert p.labels == ["rotten", "fresh"] and len(p.train) == 50 and len(p.eval) == 20


def test_bad_data_errors(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: the file is empty"):
        _prep(tok, train=str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: row at line 2 is not valid JSON"):
        _prep(tok, train=str(tmp_path / "bad.jsonl"))
    write_jsonl(tmp_path / "miss.jsonl", [{"text": "a", "label": "x"}, {"txt": "b", "label": "y"}, {"text": "c", "label": "x"}])
    with pytest.raises(DataError, match=r"row \d has no 'text' column.*set data.text_column"):
        _prep(tok, train=str(tmp_path / "miss.jsonl"), format="classification")
    write_jsonl(tmp_path / "tr.jsonl", sentiment_rows(10))
    write_jsonl(tmp_path / "va.jsonl", [{"text": "ok", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    with pytest.raises(DataError, match=r"va.jsonl: row 2 has label 'neutral', which is not in the label set"):
        _prep(tok, train=str(tmp_path / "tr.jsonl"), validation=str(tmp_path / "va.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        _prep(tok, train=str(tmp_path / "nope.jsonl"))
    write_jsonl(tmp_path / "noans.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(DataError, match="row 1 has no assistant message"):
        _prep(tok, train=str(tmp_path / "noans.jsonl"))


def test_instruction_truncation_cuts_the_middle(tmp_path, tok):
    rows = [{"instruction": "START " + "filler " * 200 + "QUESTION END", "input": "", "output": "paris"}] * 4
    write_jsonl(tmp_path / "long.jsonl", rows)
    p = prepare(DataConfig(train=str(tmp_path / "long.jsonl"), max_length=40), tok, "auto", 0, lambda *_: None)
    ex = p.train[0]
    assert len(ex["input_ids"]) == 40 and p.stats["truncated"] == 4
    text = tok.decode(ex["input_ids"]).lower()
    assert "start" in text and "question end" in text and "paris" in text  # head, question and answer kept
    assert p.eval_raw[0]["prompt_ids"] == [t for t, l in zip(p.eval[0]["input_ids"], p.eval[0]["labels"]) if l == IGNORE]
