"""Property-based fuzzing of data files (hypothesis): random bytes under every suffix, rows with wrong
columns, mixed types, nested values, huge lines and empty rows, as JSONL / JSON / CSV / TSV /
parquet, read and tokenised under every format and task. Each either prepares or fails with one
DataError naming the file — never another exception. Bounded: fixed example counts, no deadline."""
from __future__ import annotations

import csv
import io
import json
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slimtune.train.config import DataConfig
from slimtune.train.data import DataError, prepare
from slimtune.train.datafiles import read_rows

FUZZ = settings(max_examples=int(os.environ.get("SLIMTUNE_FUZZ_EXAMPLES", 120)), deadline=None, derandomize=not os.environ.get("SLIMTUNE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet", ".jsonl.gz", ".csv.bz2", ".xz", ".bin"]


@pytest.fixture(scope="module")
def tok():
    from conftest_train import _tok

    return _tok()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzzdata")


@FUZZ
@given(raw=st.one_of(st.binary(max_size=600), st.text(max_size=600).map(lambda t: t.encode("utf-8"))),
       suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_are_rows_or_one_message(folder, raw, suffix):
    p = folder / f"r{suffix}"
    p.write_bytes(raw)
    try:
        rows = read_rows(str(p))
    except DataError as e:
        assert str(p) in str(e)
        event("refused with a message")
        return
    event("read")
    assert rows and all(isinstance(r, dict) for r in rows)


KEYS = ["text", "label", "instruction", "input", "output", "messages", "conversations", "pixels", "question",
        "answer", "Text", "", " label", "id"]
scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                   st.sampled_from(["pos", "neg", "", " ", "a,b", 'say "hi"', "line\nbreak", "tab\there", "ünï",
                                    "{x}", "user", "assistant", "human", "gpt", "system"]),
                   st.text(max_size=40), st.integers(1000, 20000).map(lambda n: "w " * n))  # huge lines
message = st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]),
                          st.one_of(scalar, st.lists(scalar, max_size=2)), max_size=3)
value = st.one_of(scalar, st.lists(message, max_size=4), st.lists(scalar, max_size=3),
                  st.dictionaries(st.text(max_size=4), scalar, max_size=2),
                  st.lists(st.lists(st.floats(0, 1), min_size=2, max_size=2), min_size=2, max_size=2))
row = st.one_of(st.dictionaries(st.sampled_from(KEYS), value, max_size=5), st.just({}))
texty = st.one_of(st.text(min_size=1, max_size=60), st.text(min_size=1, max_size=60), st.sampled_from(["great fun", "dull", "a,b", 'say "hi"',
                                                                     "line\nbreak", "ünï {x}", "  "]),
                  st.integers(1000, 20000).map(lambda n: "w " * n), st.integers(-5, 5), st.floats(allow_nan=True))
labels = st.sampled_from(["pos", "neg"] * 6 + ["mid", 0, 1, None, ""])


def _turns(role_key, content_key, user, bot):
    turn = st.fixed_dictionaries({role_key: st.sampled_from([user, bot] * 4 + ["system", "robot", 3]), content_key: texty})
    return st.lists(turn, min_size=1, max_size=4)


shaped = st.one_of(  # rows of one format, with the mistakes people make inside them
    st.lists(st.fixed_dictionaries({"text": texty, "label": labels}, optional={"id": scalar}), min_size=3, max_size=12),
    st.lists(st.fixed_dictionaries({"instruction": texty, "output": texty}, optional={"input": texty, "question": texty}),
             min_size=1, max_size=12),
    st.lists(st.fixed_dictionaries({"messages": _turns("role", "content", "user", "assistant")}), min_size=1, max_size=8),
    st.lists(st.fixed_dictionaries({"conversations": _turns("from", "value", "human", "gpt")}), min_size=1, max_size=8),
    st.lists(st.fixed_dictionaries({"text": texty}), min_size=1, max_size=12),
)
rows_strategy = st.one_of(shaped, shaped, st.lists(row, min_size=1, max_size=12))  # and rows of any shape at all


def _write(path, rows, kind):
    if kind == ".jsonl":
        path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows), encoding="utf-8")
    elif kind == ".json":
        path.write_text(json.dumps(rows, default=str), encoding="utf-8")
    elif kind in (".csv", ".tsv"):
        keys = sorted({k for r in rows for k in r}) or ["text"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, delimiter="\t" if kind == ".tsv" else ",")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
        path.write_text(buf.getvalue(), encoding="utf-8")
    else:  # parquet: pyarrow may refuse mixed types itself; then the JSONL path covers the rows
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.write_table(pa.Table.from_pylist(rows), path)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))


@FUZZ
@given(rows=rows_strategy, kind=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]),
       fmt=st.sampled_from(["auto"] * 5 + ["classification", "instruction", "chat", "sharegpt", "text"]),
       task=st.sampled_from(["auto"] * 3 + ["classification", "causal_lm"]),
       template=st.sampled_from([None, "{instruction}", "Q: {question}", "{text} / {label}"]),
       with_val=st.booleans())
def test_rows_of_any_shape_prepare_or_one_message(tok, folder, rows, kind, fmt, task, template, with_val):
    p = folder / f"d{kind}"
    _write(p, rows, kind)
    val = None
    if with_val:
        val = folder / f"v{kind}"
        _write(val, list(reversed(rows)), kind)
    cfg = DataConfig(train=str(p), validation=str(val) if val else None, format=fmt, max_length=24,
                     prompt_template=template if fmt in ("instruction", "auto") else None)
    try:
        out = prepare(cfg, tok, task, seed=0, log=lambda *_: None)
    except DataError as e:
        assert str(e).strip()
        event("refused with a message")
        return
    event(f"prepared {out.format}")
    assert out.train and out.eval
    assert all(len(e["input_ids"]) <= 24 for e in out.train + out.eval if "input_ids" in e)
