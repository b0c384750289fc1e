"""The `slimtune` command line: help, train/eval/generate/merge/inspect on tiny models, errors."""
import subprocess
import sys

import pytest
import torch

from conftest_train import instruction_rows, sentiment_rows, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from slimtune.cli.main import main


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["predict"], ["generate"], ["merge"], ["inspect"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: slimtune" in out and "%%" not in out  # argparse's % escapes must not show


def test_building_the_parser_imports_nothing_heavy():
    """`slimtune --help` costs `import slimtune` plus the CLI modules (and light slimtune modules they read
    defaults from), which import no torch,
    transformers, datasets or matplotlib at parser-build time (the commands import them when run)."""
    code = ("import sys, slimtune; before = set(sys.modules); import slimtune.cli.main as m; m.build_parser(); "
            "print(sorted(set(sys.modules) - before))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    new = eval(r.stdout.strip().splitlines()[-1])
    heavy = [x for x in new if x.split(".")[0] != "slimtune" and x.split(".")[0] not in sys.stdlib_module_names]
    assert new and not heavy, heavy


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "slimtune", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "merge" in r.stdout


def _train_yaml(tmp_path, model, data_file, extra=""):
    p = tmp_path / "cfg.yaml"
    p.write_text(f"model: {model}\nmethod: lora\ndata: {{train: {data_file}, max_length: 32}}\n"
                 "train: {max_steps: 3, batch_size: 4, lr: 1.0e-2, eval_every: 3}\n"
                 "eval: {max_new_tokens: 2, max_examples: 4}\n"
                 f"output_dir: {tmp_path / 'run'}\n{extra}")
    return p


def test_bad_config_is_one_message(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("model: minilm\ndata: {builtin: rotten_tomatoes}\ntrain: {lerning_rate: 1}\n")
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'train.lerning_rate'" in err
    assert main(["train", str(p), "train.lerning_rate=1"]) == 2


def test_train_merge_generate_eval(tiny_llama, tmp_path, capsys):
    write_jsonl(tmp_path / "i.jsonl", instruction_rows(24))
    cfg = _train_yaml(tmp_path, tiny_llama, tmp_path / "i.jsonl")
    assert main(["train", str(cfg), "--no-progress", "method.init_lora_weights=false"]) == 0
    run = tmp_path / "run"
    assert (run / "best/adapter_config.json").is_file()

    assert main(["merge", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    from slimtune import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "adapter")
    ids = torch.tensor([[5, 17, 99, 1000, 2000, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits
    assert not torch.allclose(base, merged(ids).logits, atol=1e-4)  # the merge changed something

    capsys.readouterr()
    assert main(["generate", "what is the capital of france?", "--adapter", str(run / "adapter"),
                 "--adapter", str(run / "best"), "--compare-base", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "[base model]" in out and f"[adapter {run / 'adapter'}]" in out and f"[adapter {run / 'best'}]" in out

    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "eval_loss" in out and "gen_accuracy" in out


def test_classification_merge_keeps_head(tiny_bert, tmp_path):
    write_jsonl(tmp_path / "s.jsonl", sentiment_rows(24))
    cfg = _train_yaml(tmp_path, tiny_bert, tmp_path / "s.jsonl")
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert main(["merge", "--adapter", str(tmp_path / "run/adapter"), "--out", str(tmp_path / "m")]) == 0
    from transformers import AutoModelForSequenceClassification

    from slimtune import PeftModel

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
                                     tmp_path / "run/adapter")
    ids = torch.tensor([[101, 2307, 4569, 102]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_inspect(tiny_llama, capsys):
    assert main(["inspect", str(tiny_llama), "--task", "causal_lm"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "q_proj: Linear (32, 32)" in out
    assert "r=16" in out and "trainable%" in out
    assert main(["inspect", str(tiny_llama), "--task", "causal_lm", "method.r=2"]) == 0
    assert "r=2" in capsys.readouterr().out


def test_examples_validate():
    from pathlib import Path

    from slimtune.train.config import load_config

    ex = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert len(ex) >= 3
    for p in ex:
        load_config(str(p))


def test_bench_subcommand_dispatches(capsys):
    from slimtune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "--preset" in capsys.readouterr().out
