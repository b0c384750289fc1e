"""Own data: every example file in examples/data/ trains through its YAML; file reading (encodings,
compression, CSV corner cases); sharegpt, alpaca and prompt templates; own data without a config."""
import bz2
import gzip
import json
from pathlib import Path

import pytest

from conftest_train import sentiment_rows, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from slimtune.train.config import DataConfig, JobConfigError, load_config
from slimtune.train.data import IGNORE, DataError, prepare, render_prompt
from slimtune.train.datafiles import read_rows

EXAMPLES = Path(__file__).parent.parent / "examples" / "data"


@pytest.fixture(scope="module")
def tok():
    from conftest_train import _tok

    return _tok()


@pytest.fixture
def fresh_tok():
    """A tokenizer no test has given a chat template yet (chat data sets ChatML on the one it gets)."""
    from conftest_train import _tok

    return _tok()


def _prep(tok, task="auto", **kw):
    return prepare(DataConfig(**kw), tok, task, seed=0, log=lambda *_: None)


@pytest.mark.parametrize("yaml_name,fmt", [("reviews_csv.yaml", "classification"), ("alpaca.yaml", "instruction"),
                                           ("qa_template.yaml", "instruction"), ("chat.yaml", "chat"),
                                           ("sharegpt.yaml", "chat"), ("notes_text.yaml", "text")])
def test_each_example_trains(yaml_name, fmt, tiny_bert, tiny_llama, tmp_path):
    from slimtune.train.run import run_train

    model = tiny_bert if fmt == "classification" else tiny_llama
    cfg = load_config(str(EXAMPLES / yaml_name), [f"model={model}", f"output_dir={tmp_path / 'run'}",
                                                  "train.max_steps=2", "train.cpu_threads=1", "eval.max_examples=4",
                                                  "eval.max_new_tokens=2"])
    assert Path(cfg.data.train).is_absolute() and Path(cfg.data.train).is_file()
    res = run_train(cfg, log=lambda *_: None, progress=False)
    assert res["format"] == fmt and res["status"] == "finished" and res["n_train"] > 0 and res["n_eval"] > 0
    report = (tmp_path / "run/report.md").read_text()
    assert f"({fmt}): {res['n_train']} train / {res['n_eval']} validation examples" in report
    if fmt != "classification":
        assert "## Generations: before -> after training" in report
    else:
        assert json.loads((tmp_path / "run/best/labels.json").read_text()) == ["negative", "positive"]


def test_sharegpt_roles_and_column(tmp_path, tok):
    p = _prep(tok, train=str(EXAMPLES / "sharegpt.json"), format="sharegpt")
    assert p.format == "chat" and p.train
    learned = tok.decode([t for t, lab in zip(p.train[0]["input_ids"], p.train[0]["labels"]) if lab != IGNORE])
    assert learned.strip()
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}] * 3
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1: message .* needs a role \(system, user/human, assistant/gpt\)"):
        _prep(tok, train=str(tmp_path / "bad.jsonl"), format="sharegpt")


def test_alpaca_rendering_and_prompt_template(fresh_tok):
    tok = fresh_tok
    row = {"instruction": "Name the capital.", "input": "France", "output": "Paris", "q": "Capital of France?"}
    # no chat template in this tokenizer: the alpaca layout
    assert render_prompt(tok, row, DataConfig()) == \
        "### Instruction:\nName the capital.\n\n### Input:\nFrance\n\n### Response:\n"
    # a template: the prompt is the template's text as it is, filled from any columns
    assert render_prompt(tok, row, DataConfig(prompt_template="Q: {q}\nA: ")) == "Q: Capital of France?\nA: "
    # the chat template on: the user turn is instruction, a blank line, the input
    chat = render_prompt(tok, row, DataConfig(chat_template=True, system_prompt="Be brief."))
    assert "<|im_start|>system\nBe brief.<|im_end|>" in chat
    assert "<|im_start|>user\nName the capital.\n\nFrance<|im_end|>\n<|im_start|>assistant\n" in chat
    with pytest.raises(DataError, match=r"prompt_template uses \{nope\}, but the row has no such column"):
        render_prompt(tok, row, DataConfig(prompt_template="{nope}"))
    with pytest.raises(Exception, match="placeholder"):
        DataConfig(prompt_template="no placeholders")


def test_prompt_template_rows_need_their_columns(tmp_path, fresh_tok):
    tok = fresh_tok
    write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": "a"} for i in range(10)])
    p = _prep(tok, train=str(tmp_path / "qa.jsonl"), format="instruction", prompt_template="Q: {question}",
              output_column="answer")
    assert p.format == "instruction" and p.eval_raw[0]["prompt"].startswith("Q: q")
    with pytest.raises(DataError, match=r"row \d+ has no 'output' column"):
        _prep(tok, train=str(tmp_path / "qa.jsonl"), format="instruction", prompt_template="Q: {question}")


def test_file_reading_corner_cases(tmp_path):
    rows = sentiment_rows(6)
    text = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "u16.csv").write_bytes(text.encode("utf-16"))
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    (tmp_path / "a.tsv").write_text(text.replace(",", "\t"))
    for name in ("bom.csv", "u16.csv", "a.csv.gz", "a.jsonl.bz2", "a.tsv"):
        got = read_rows(str(tmp_path / name))
        assert [r["text"] for r in got] == [r["text"] for r in rows] and set(got[0]) == {"text", "label"}, name
    # quoted newlines and commas, a 1 MB field, blank lines and empty rows
    big = "x" * 1_000_000
    (tmp_path / "q.csv").write_text(f'text,label\n"a, b\nc",pos\n\n,\n"{big}",neg\n')
    got = read_rows(str(tmp_path / "q.csv"))
    assert [r["label"] for r in got] == ["pos", "neg"] and got[0]["text"] == "a, b\nc" and len(got[1]["text"]) == 1e6
    (tmp_path / "dup.csv").write_text("text,text\na,b\n")
    with pytest.raises(DataError, match="column 'text' appears twice"):
        read_rows(str(tmp_path / "dup.csv"))
    (tmp_path / "t.txt").write_text("one line\n\n  \ntwo line\n")
    assert read_rows(str(tmp_path / "t.txt")) == [{"text": "one line"}, {"text": "two line"}]
    (tmp_path / "a.json").write_text(json.dumps({"text": "one", "label": "x"}))  # a single object: one example
    assert read_rows(str(tmp_path / "a.json")) == [{"text": "one", "label": "x"}]
    (tmp_path / "nul.jsonl").write_bytes(b'{"text": "a\x00"}\n')
    with pytest.raises(DataError, match="NUL byte at line 1"):
        read_rows(str(tmp_path / "nul.jsonl"))


def test_parquet_with_missing_values(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sentiment_rows(10)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert read_rows(str(tmp_path / "a.parquet")) == rows
    rows[3]["label"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"row \d+ has an empty 'label' column"):
        _prep(tok, train=str(tmp_path / "b.parquet"))


def test_labels_come_from_every_row_and_checks_see_the_splits(tmp_path, tok):
    rows = [{"text": f"t{i}", "label": "a"} for i in range(9)] + [{"text": "rare", "label": "b"}]
    write_jsonl(tmp_path / "r.jsonl", rows)
    p = _prep(tok, train=str(tmp_path / "r.jsonl"), val_fraction=0.3)
    assert p.labels == ["a", "b"]  # 'b' may land in validation only; still a class
    counts = p.stats["class_counts"]
    assert sum(counts["train"].values()) == 7 and sum(counts["validation"].values()) == 3


def test_own_data_without_a_config_file(tmp_path):
    write_jsonl(tmp_path / "mine.jsonl", sentiment_rows(10))
    cfg = load_config(None, [f"data.train={tmp_path / 'mine.jsonl'}", "model=minilm", "task=classification"])
    assert cfg.data.builtin is None and cfg.output_dir == "runs/mine"
    assert cfg.data.max_train is None and cfg.train.lr == 2e-4  # the default run's tuned settings are gone
    cfg = load_config(None, [f"data={{train: {tmp_path / 'mine.jsonl'}, max_length: 64}}", "output_dir=x"])
    assert cfg.data.builtin is None and cfg.data.max_length == 64 and cfg.output_dir == "x"
    with pytest.raises(JobConfigError, match="are both set"):
        load_config(None, [f"data.train={tmp_path / 'mine.jsonl'}", "data.builtin=rotten_tomatoes"])
    cfg = load_config(None, ["data.max_train=10"])  # the default run still works as before
    assert cfg.data.builtin == "rotten_tomatoes_plot" and cfg.data.max_train == 10


def test_chat_and_text_keep_prompts_for_samples(tmp_path, tok):
    p = _prep(tok, train=str(EXAMPLES / "chat.jsonl"))
    assert p.eval_raw and p.answers is None  # samples for the report, not a generated-accuracy metric
    last = p.eval_raw[0]
    assert last["reference"] and len(last["prompt_ids"]) < len(p.eval[0]["input_ids"])
    p = _prep(tok, train=str(EXAMPLES / "notes.txt"), format="text")
    assert p.eval_raw and all(r["prompt_ids"] for r in p.eval_raw)
