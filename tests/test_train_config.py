"""Job config: pydantic validation, one clear message per mistake, dotted overrides, method block."""
import pytest

from slimtune.train.config import JobConfigError, apply_overrides, load_config


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_unknown_key_names_closest(tmp_path):
    p = _yaml(tmp_path, "model: minilm\ndata: {builtin: rotten_tomatoes}\ntrain: {learning_rat: 1e-4}\n")
    with pytest.raises(JobConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "unknown key 'train.learning_rat'" in msg
    p2 = _yaml(tmp_path, "data: {builtin: rotten_tomatoes}\ntrain: {epoch: 2}\n")
    with pytest.raises(JobConfigError, match=r"did you mean 'train.epochs'"):
        load_config(p2)


def test_top_level_unknown_and_wrong_type(tmp_path):
    with pytest.raises(JobConfigError, match=r"unknown key 'ouput_dir'; did you mean 'output_dir'"):
        load_config(_yaml(tmp_path, "ouput_dir: x\ndata: {builtin: rotten_tomatoes}\n"))
    with pytest.raises(JobConfigError, match=r"'train.batch_size' = 'big'"):
        load_config(_yaml(tmp_path, "data: {builtin: rotten_tomatoes}\ntrain: {batch_size: big}\n"))


def test_overrides_dotted_and_typed(tmp_path):
    p = _yaml(tmp_path, "model: minilm\nmethod: lora\ndata: {builtin: rotten_tomatoes}\n")
    cfg = load_config(p, ["train.lr=1e-4", "method.r=16", "data.max_train=10", "train.gradient_checkpointing=true"])
    assert cfg.train.lr == 1e-4 and cfg.data.max_train == 10 and cfg.train.gradient_checkpointing is True
    assert cfg.method == {"name": "lora", "r": 16}
    assert cfg.data.builtin == "rotten_tomatoes"  # untouched keys survive
    with pytest.raises(JobConfigError, match=r"did you mean 'train.lr'"):
        load_config(p, ["train.lrr=1"])
    with pytest.raises(JobConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_default_config_and_method_block():
    cfg = load_config(None, [])
    assert cfg.model == "smollm2-135m" and cfg.data.builtin == "rotten_tomatoes_plot"
    assert cfg.method_name() == "lora"
    cfg = load_config(None, ["method={name: lora, r: 4, lora_alpha: 8}"])
    assert cfg.method_name() == "lora" and cfg.method_kwargs() == {"r": 4, "lora_alpha": 8}


def test_method_block_unknown_key_via_registry(tiny_bert, tmp_path):
    from slimtune.train.job import auto_method
    from slimtune.train.models import resolve
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(resolve(str(tiny_bert)), num_labels=2)
    cfg = load_config(None, [f"model={tiny_bert}", "method.rank=4"])
    with pytest.raises(JobConfigError, match="unknown key 'method.rank' for lora; did you mean 'method.r'"):
        auto_method(cfg, m, "classification")
    cfg = load_config(None, [f"model={tiny_bert}", "method=loraa"])
    with pytest.raises(JobConfigError, match="Did you mean 'lora'"):  # one error type for every config mistake
        auto_method(cfg, m, "classification")


def test_auto_lora_choices(tiny_bert, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from slimtune.train.job import auto_method

    cfg = load_config(None, [])
    c, why = auto_method(cfg, AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2), "classification")
    assert (c.r, c.lora_alpha, c.target_modules, c.task_type) == (8, 16, ["query", "value"], "SEQ_CLS")
    assert any("r=8" in w for w in why)
    c, why = auto_method(cfg, AutoModelForCausalLM.from_pretrained(tiny_llama), "causal_lm")
    assert (c.r, c.lora_alpha, c.target_modules) == (16, 32, ["q_proj", "k_proj", "v_proj"])
    cfg = load_config(None, ["method.r=4"])  # the user's keys win
    c, _ = auto_method(cfg, AutoModelForCausalLM.from_pretrained(tiny_llama), "causal_lm")
    assert c.r == 4 and c.lora_alpha == 8


from conftest_train import tiny_bert, tiny_llama  # noqa: E402,F401


def test_cpu_threads_follow_what_other_processes_leave_free():
    import os
    import subprocess
    import sys

    import torch

    from slimtune.train.resources import busy_cores, set_cpu_threads

    before = torch.get_num_threads()
    try:
        idle = busy_cores(0.2)
        assert 0.0 <= idle <= (os.cpu_count() or 1) + 1e-6
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one core taken
        try:
            assert busy_cores(0.5) >= 0.7
        finally:
            spin.kill()
        assert set_cpu_threads(1, log=lambda *_: None) == 1  # an explicit train.cpu_threads wins
    finally:
        torch.set_num_threads(before)
