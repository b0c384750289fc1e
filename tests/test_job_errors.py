"""Every mistake is one message from the CLI, exit code 2, no traceback; an unexpected error says what
failed and where its traceback is (exit 1); --debug shows the traceback. One row per case: the
cases of issue 16 and the ones around them (docs/data.md lists them with their messages)."""
import gzip

import pytest

from conftest_train import instruction_rows, sentiment_rows, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from slimtune.cli.main import main


@pytest.fixture
def files(tmp_path):
    """A folder of good and bad inputs, by name."""
    import pandas as pd

    pd.DataFrame(sentiment_rows(40)).to_csv(tmp_path / "good.csv", index=False)
    write_jsonl(tmp_path / "inst.jsonl", instruction_rows(20))
    (tmp_path / "one_class.csv").write_text("text,label\n" + "".join(f"t{i},pos\n" for i in range(10)))
    (tmp_path / "no_label.csv").write_text("text,stars\n" + "".join(f"t{i},{i % 5}\n" for i in range(10)))
    (tmp_path / "one_row.jsonl").write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,a\nb,b\n".encode("latin-1"))
    (tmp_path / "random.jsonl").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "ragged.csv").write_text("text,label\na,x\nb,y,extra\n")
    (tmp_path / "wrapped.json").write_text('{"data": [{"text": "a", "label": "x"}]}')
    (tmp_path / "list_rows.jsonl").write_text('["a", "x"]\n')
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip")
    (tmp_path / "ok.csv.gz").write_bytes(gzip.compress((tmp_path / "good.csv").read_bytes()))
    (tmp_path / "data.xlsx").write_text("x")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "dir").mkdir()
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "dup.yaml").write_text("model: minilm\ntrain: {lr: 1}\ndata: {builtin: rotten_tomatoes}\ntrain: {epochs: 2}\n")
    (tmp_path / "list.yaml").write_text("- model: minilm\n")
    (tmp_path / "latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    return tmp_path


def _base(files, model, data="good.csv", **kw):
    args = ["train", f"model={model}", f"data.train={files / data}", f"output_dir={files / 'out'}",
            "train.max_steps=2", "train.batch_size=4", "train.cpu_threads=1", "eval.max_examples=4", "--no-progress"]
    return args + [f"{k}={v}" for k, v in kw.items()]


# (name, args builder, expected substring of the one error line); fast ones: they fail before training
CASES = [
    ("config file missing", lambda f, b, l: ["train", f / "nope.yaml"], "config file '{f}/nope.yaml' does not exist"),
    ("config is a folder", lambda f, b, l: ["train", f / "dir"], "is a folder but not a slimtune run"),
    ("config not YAML", lambda f, b, l: ["train", f / "bad.yaml"], "bad.yaml is not valid YAML"),
    ("config key twice", lambda f, b, l: ["train", f / "dup.yaml"], "key 'train' appears twice (lines 2 and 4)"),
    ("config top level a list", lambda f, b, l: ["train", f / "list.yaml"], "the top level must be a mapping"),
    ("config not UTF-8", lambda f, b, l: ["train", f / "latin1.yaml"], "is not UTF-8 text (byte 0xe9"),
    ("override without =", lambda f, b, l: _base(f, b) + ["train.lr"], "'train.lr' is neither an option nor a key=value override"),
    ("override typo", lambda f, b, l: _base(f, b) + ["train.lerning_rate=1"], "unknown key 'train.lerning_rate'"),
    ("wrong type", lambda f, b, l: _base(f, b) + ["train.batch_size=big"], "'train.batch_size' = 'big'"),
    ("override into a value", lambda f, b, l: _base(f, b) + ["train.lr.x=1"], "'train.lr' = {'x': 1}: Input should be a valid number"),
    ("empty key", lambda f, b, l: _base(f, b) + ["=3"], "is not a dotted key"),
    ("builtin and train", lambda f, b, l: _base(f, b) + ["data.builtin=rotten_tomatoes"], "are both set; keep one"),
    ("unknown builtin", lambda f, b, l: ["train", "data.builtin=rotten", f"output_dir={f / 'out'}"],
     "unknown builtin dataset 'rotten'"),
    ("model missing", lambda f, b, l: _base(f, f / "no_model"), "is neither a builtin"),
    ("data file missing", lambda f, b, l: _base(f, b, "nope.csv"), "file not found"),
    ("data is a folder", lambda f, b, l: _base(f, b, "dir"), "is a folder, not a file"),
    ("data empty", lambda f, b, l: _base(f, b, "empty.csv"), "the file is empty"),
    ("data unknown type", lambda f, b, l: _base(f, b, "data.xlsx"), "unknown file type '.xlsx'"),
    ("data not UTF-8", lambda f, b, l: _base(f, b, "latin1.csv"), "not UTF-8 text: byte 0xe9 at line 2"),
    ("data random bytes", lambda f, b, l: _base(f, b, "random.jsonl"), "not UTF-8 text"),
    ("data ragged CSV", lambda f, b, l: _base(f, b, "ragged.csv"), "line 3 has 3 field(s) but the header has 2"),
    ("JSON object around rows", lambda f, b, l: _base(f, b, "wrapped.json"), "holding a list under 'data'"),
    ("rows not objects", lambda f, b, l: _base(f, b, "list_rows.jsonl"), "row 1 is str, not an object"),
    ("broken gzip", lambda f, b, l: _base(f, b, "bad.csv.gz"), "not a valid .gz file"),
    ("one row", lambda f, b, l: _base(f, b, "one_row.jsonl"), "1 example cannot be split into train and validation"),
    ("one class", lambda f, b, l: _base(f, b, "one_class.csv"), "holds one class ('pos') in all 10 rows"),
    ("no label column, task classification", lambda f, b, l: _base(f, b, "no_label.csv", task="classification"),
     "task classification needs a label column, but the rows have no 'label'"),
    ("classification data, task causal_lm", lambda f, b, l: _base(f, l, task="causal_lm"),
     "task causal_lm, but the rows are classification data"),
    ("unknown method", lambda f, b, l: _base(f, b, method="loraa"), "unknown method 'loraa'. Did you mean 'lora'"),
    ("method key typo", lambda f, b, l: _base(f, b) + ["method.rank=4"], "did you mean 'method.r'"),
    ("bad method value", lambda f, b, l: _base(f, b) + ["method.r=0"], "method block"),
    ("target matches nothing", lambda f, b, l: _base(f, b) + ["method.target_modules=[nope]"],
     "entry 'nope' matches no module. Layer names in BertForSequenceClassification: classifier, dense, key"),
    ("metric not measured", lambda f, b, l: _base(f, b) + ["train.metric=bleu"], "train.metric 'bleu' is not measured"),
    ("warm-up never ends", lambda f, b, l: _base(f, b) + ["train.max_steps=1e12"], "the warm-up would never end"),
    ("warm-up longer than the run", lambda f, b, l: _base(f, b) + ["train.warmup_steps=5"],
     "train.warmup_steps=5 is not shorter than the run (2 steps)"),
    ("label outside data.labels", lambda f, b, l: _base(f, b) + ["data.labels=[a,b]"],
     "which is not in the label set ['a', 'b']"),
    ("num_labels below the classes", lambda f, b, l: _base(f, b) + ["num_labels=2", "data.labels=[neg,pos,mid]"],
     "num_labels=2 but the data has 3 classes"),
    ("eval: not a run", lambda f, b, l: ["eval", f / "dir"], "is a folder but not a slimtune run"),
    ("predict: not a run", lambda f, b, l: ["predict", f / "dir", f / "good.csv"], "is a folder but not a slimtune run"),
    ("generate: adapter missing", lambda f, b, l: ["generate", "hi", "--adapter", f / "nope"], "does not exist"),
    ("merge: adapter is a file", lambda f, b, l: ["merge", "--adapter", f / "good.csv", "--out", f / "m"], "is a file"),
]


@pytest.mark.parametrize("name,build,expect", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_message(files, tiny_bert, tiny_llama, capsys, name, build, expect):
    capsys.readouterr()
    rc = main([str(x) for x in build(files, tiny_bert, tiny_llama)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert expect.replace("{f}", str(files)) in lines[0], lines[0]


def test_yaml_numbers_and_off_are_accepted(files, tiny_bert):
    from slimtune.train.config import load_config

    cfg = load_config(None, [f"model={tiny_bert}", f"data.train={files / 'good.csv'}", "train.max_steps=1e3",
                             "train.lr=5e-4", "train.chunked_ce=off", "output_dir=2024"])
    assert cfg.train.max_steps == 1000 and cfg.train.lr == 5e-4 and cfg.train.chunked_ce == "off"
    assert cfg.output_dir == "2024" and cfg.data.builtin is None  # own data: the default's builtin is dropped
    p = files / "n.yaml"
    p.write_text(f"model: {tiny_bert}\ndata: {{train: good.csv}}\ntrain: {{lr: 1e-3, max_steps: 2e2, chunked_ce: on}}\n")
    cfg = load_config(str(p))
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 200 and cfg.train.chunked_ce == "on"


def test_unexpected_error_names_the_log_and_debug_shows_traceback(files, tiny_bert, capsys, monkeypatch):
    from slimtune.train import trainer as T

    def boom(self, *a, **k):
        raise RuntimeError("simulated failure inside the loop")
    monkeypatch.setattr(T.Trainer, "_loop", boom)
    args = [str(x) for x in _base(files, tiny_bert)]
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error: unexpected RuntimeError: simulated failure inside the loop" in err and "Traceback" not in err
    log = files / "out/train.log"
    assert f"the traceback is in {log}" in err
    assert "Traceback" in log.read_text() and "simulated failure" in log.read_text()
    assert main(args + ["--debug", "--overwrite"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_error_outside_a_run_writes_a_log(files, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    import slimtune.cli.inspect as ins

    def boom(a):
        raise ZeroDivisionError("simulated")
    monkeypatch.setattr(ins, "run", boom)
    capsys.readouterr()
    assert main(["inspect", "x"]) == 1
    err = capsys.readouterr().err
    logs = list((tmp_path / "cache/logs").glob("slimtune-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err and "ZeroDivisionError" in logs[0].read_text()
