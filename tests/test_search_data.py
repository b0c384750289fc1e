"""The held-out test split (data.test / data.test_fraction) and the trainer's per-evaluation callback:
the test rows are carved before validation and never reach training or validation; a config without
a test split is split exactly as before; the callback sees every evaluation and can stop the run."""
from __future__ import annotations

import json

import pytest

from conftest_train import chat_rows, job, sentiment_rows, tiny_bert, write_jsonl  # noqa: F401
from slimtune.train.config import JobConfig
from slimtune.train.data import DataError, prepare


def _tok():
    from conftest_train import _tok as t

    return t()


def _texts(examples, tok):
    return sorted(tok.decode(e["input_ids"], skip_special_tokens=True) for e in examples)


def _rows(n=60):
    return [{"text": f"example number {i} " + ("good" if i % 2 else "bad"), "label": "pos" if i % 2 else "neg"}
            for i in range(n)]


def test_test_fraction_is_carved_first_and_disjoint(tmp_path):
    tok = _tok()
    path = write_jsonl(tmp_path / "d.jsonl", _rows(60))
    cfg = JobConfig.model_validate({"data": {"train": str(path), "test_fraction": 0.2, "max_length": 32}}).data
    d = prepare(cfg, tok, "classification", seed=7)
    tr, va, te = _texts(d.train, tok), _texts(d.eval, tok), _texts(d.test, tok)
    assert (len(tr), len(va), len(te)) == (43, 5, 12)
    assert not (set(tr) & set(te)) and not (set(va) & set(te)) and not (set(tr) & set(va))
    assert "before validation" in d.stats["test"] and d.stats["rows_test"] == 12
    assert set(d.stats["class_counts"]) == {"train", "validation", "test"}
    again = prepare(cfg, tok, "classification", seed=7)
    assert _texts(again.test, tok) == te  # seeded
    held = d.held_out()
    assert held.eval is d.test and held.train is d.train


def test_no_test_split_leaves_the_splits_as_they_were(tmp_path):
    """Configs without a test split (every existing run) keep their validation rows."""
    from slimtune.train.data import carve

    tok = _tok()
    rows = _rows(50)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = JobConfig.model_validate({"data": {"train": str(path), "max_length": 32}}).data
    d = prepare(cfg, tok, "classification", seed=42)  # train.seed's default: data.split_seed's default
    _, val = carve(rows, 5, 42)
    assert _texts(d.eval, tok) == sorted(r["text"] for r in val)
    assert d.test == [] and "test" not in d.stats
    with pytest.raises(DataError, match="no test split"):
        d.held_out()


def test_the_split_seed_moves_the_splits_and_train_seed_does_not(tmp_path):
    """data.split_seed carves validation and test; train.seed (the seed spread of compare / search)
    leaves them where they are; split_seed null follows train.seed, as before the key existed."""
    tok = _tok()
    path = write_jsonl(tmp_path / "d.jsonl", _rows(60))

    def splits(train_seed, **data):
        cfg = JobConfig.model_validate({"data": {"train": str(path), "test_fraction": 0.2, "max_length": 32, **data}}).data
        d = prepare(cfg, tok, "classification", seed=train_seed)
        return _texts(d.eval, tok), _texts(d.test, tok), d.stats["test"]

    assert splits(1) == splits(2) == splits(3, split_seed=42)
    assert "split seed 42" in splits(1)[2]
    assert splits(1, split_seed=7)[1] != splits(1)[1] and splits(1, split_seed=7) == splits(2, split_seed=7)
    assert splits(7, split_seed=None) == splits(1, split_seed=7) and splits(8, split_seed=None) != splits(7, split_seed=None)


def test_test_file_max_test_and_contradictions(tmp_path):
    tok = _tok()
    train = write_jsonl(tmp_path / "t.jsonl", _rows(40))
    test = write_jsonl(tmp_path / "x.jsonl", _rows(30))
    cfg = JobConfig.model_validate({"data": {"train": str(train), "test": str(test), "max_test": 7,
                                             "max_length": 32}}).data
    d = prepare(cfg, tok, "classification", seed=1)
    assert len(d.test) == 7 and len(d.train) + len(d.eval) == 40
    both = cfg.model_copy(update={"test_fraction": 0.1})
    with pytest.raises(DataError, match="both set; keep one"):
        prepare(both, tok, "classification", seed=1)
    tiny = write_jsonl(tmp_path / "tiny.jsonl", _rows(2))
    few = JobConfig.model_validate({"data": {"train": str(tiny), "test_fraction": 0.5}}).data
    with pytest.raises(DataError, match="too few to carve a test split"):
        prepare(few, tok, "classification", seed=1)


def test_chat_test_split_keeps_prompts_for_generation(tmp_path):
    """A language-model test split carries its prompts (test_raw), as validation does (eval_raw)."""
    from conftest_train import instruction_rows

    tok = _tok()
    tok.chat_template = None
    path = write_jsonl(tmp_path / "i.jsonl", instruction_rows(40))
    cfg = JobConfig.model_validate({"data": {"train": str(path), "test_fraction": 0.25, "max_length": 48,
                                             "chat_template": False}}).data
    d = prepare(cfg, tok, "causal_lm", seed=0)
    assert len(d.test) == 10 and len(d.test_raw) == 10
    assert all(r["reference"] in ("paris", "four", "blue", "cold") for r in d.test_raw)
    chat = write_jsonl(tmp_path / "c.jsonl", chat_rows(20))
    from slimtune.train.prompts import ensure_chat_template

    ensure_chat_template(tok)
    c = JobConfig.model_validate({"data": {"train": str(chat), "test_fraction": 0.2, "max_length": 64}}).data
    dc = prepare(c, tok, "causal_lm", seed=0)
    assert len(dc.test) == 4 and dc.test_raw


def test_the_trainer_callback_sees_each_evaluation_and_can_stop_the_run(tiny_bert, tmp_path):
    from slimtune.train.run import run_train

    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(48))
    seen = []

    def on_evaluate(step, metrics):
        seen.append((step, dict(metrics)))
        return "enough" if step == 4 else None

    cfg = job(tiny_bert, tmp_path / "run", {"train": str(data)}, task="classification",
              train={"max_steps": 8, "eval_every": 2})
    res = run_train(cfg, log=lambda m: None, progress=False, on_evaluate=on_evaluate)
    assert [s for s, _ in seen] == [2, 4]
    assert all("accuracy" in m and "eval_loss" in m for _, m in seen)
    assert res["steps"] == 4 and res["status"] == "stopped early" and res["stop_reason"] == "enough"
    assert "stopped at step 4: enough" in (tmp_path / "run" / "train.log").read_text()
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(h["step"] for h in hist) == 4
    none = run_train(cfg.model_copy(update={"output_dir": str(tmp_path / "run2")}), log=lambda m: None,
                     progress=False, on_evaluate=lambda s, m: None)
    assert none["steps"] == 8 and none["status"] == "finished" and none["stop_reason"] is None
