"""End-to-end runs on tiny random-init models: each task and data format, resume, NaN stop."""
import json

import pytest
import torch

from conftest_train import (chat_rows, instruction_rows, job, sentiment_rows, tiny_bert, tiny_llama,  # noqa: F401
                            write_jsonl)
from slimtune.train.run import run_train
from slimtune.train.trainer import TrainingDiverged

quiet = dict(log=lambda *_: None, progress=False)


def test_classification_run_writes_everything(tiny_bert, tmp_path):
    import pandas as pd

    pd.DataFrame(sentiment_rows(40)).to_csv(tmp_path / "s.csv", index=False)
    cfg = job(tiny_bert, tmp_path / "run", {"train": str(tmp_path / "s.csv")},
              train={"early_stopping_patience": 5})
    res = run_train(cfg, **quiet)
    out = tmp_path / "run"
    assert res["task"] == "classification" and res["metric"] == "accuracy"
    assert {"accuracy", "f1", "eval_loss"} <= set(res["after"]) and "accuracy" in res["before"]
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "best/adapter_model.safetensors",
              "report.md", "plot.png", "metrics.jsonl", "metrics.csv", "summary.json", "config.yaml"):
        assert (out / f).is_file(), f
    cfgj = json.loads((out / "adapter/adapter_config.json").read_text())
    assert cfgj["task_type"] == "SEQ_CLS" and "classifier" in (cfgj["modules_to_save"] or [])
    report = (out / "report.md").read_text()
    assert "trainable params" in report and "before | after" in report and "wall time" in report
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("lr" in r and "tokens_per_s" in r and "peak_mem_mb" in r for r in recs)


@pytest.mark.parametrize("rows,fmt", [(instruction_rows, "instruction"), (chat_rows, "chat")])
def test_causal_lm_runs(tiny_llama, tmp_path, rows, fmt):
    write_jsonl(tmp_path / "d.jsonl", rows())
    cfg = job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "d.jsonl")})
    res = run_train(cfg, **quiet)
    assert res["task"] == "causal_lm" and "perplexity" in res["after"]
    if fmt == "instruction":  # short answers: generated-answer accuracy is the selection metric
        assert res["metric"] == "gen_accuracy" and "gen_accuracy" in res["after"]
    else:
        assert res["metric"] == "eval_loss"
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]


def test_text_run_with_accumulation_and_checkpointing(tiny_llama, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": f"the cat sat on the mat number {i}"} for i in range(24)])
    cfg = job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "t.jsonl")},
              train={"grad_accum": 2, "gradient_checkpointing": True, "scheduler": "linear"})
    res = run_train(cfg, **quiet)
    assert res["steps"] == 4 and res["after"]["eval_loss"] < res["before"]["eval_loss"]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_is_bitwise(tiny_bert, tmp_path):
    write_jsonl(tmp_path / "s.jsonl", sentiment_rows(40))
    data = {"train": str(tmp_path / "s.jsonl")}
    tr = {"max_steps": 8, "eval_every": 3, "save_every": 3, "log_every": 1, "lr": 5e-3}
    full = run_train(job(tiny_bert, tmp_path / "full", data, train=tr), **quiet)

    # the "killed" run: stop after step 6 (its last checkpoint), then resume in a new process-like setup
    from slimtune.train import trainer as T

    orig = T.Trainer.save_checkpoint

    def kill_after(self):
        path = orig(self)
        if self.step == 6:
            raise KeyboardInterrupt
        return path

    T.Trainer.save_checkpoint = kill_after
    try:
        with pytest.raises(KeyboardInterrupt):
            run_train(job(tiny_bert, tmp_path / "part", data, train=tr), **quiet)
    finally:
        T.Trainer.save_checkpoint = orig
    assert (tmp_path / "part/checkpoints/step-000006/trainer_state.pt").is_file()
    assert not list((tmp_path / "part/checkpoints").glob(".tmp*"))
    resumed = run_train(job(tiny_bert, tmp_path / "part", data, train=tr, resume=True), **quiet)
    a, b = _params(full["peft_model"]), _params(resumed["peft_model"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [(r["step"], r["loss"]) for r in full["trainer"].history if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in resumed["trainer"].history if "loss" in r]
    assert la == lb  # the same loss curve, bit for bit


def test_nan_loss_stops_and_keeps_checkpoint(tiny_bert, tmp_path):
    write_jsonl(tmp_path / "s.jsonl", sentiment_rows(40))
    cfg = job(tiny_bert, tmp_path / "run", {"train": str(tmp_path / "s.jsonl")},
              train={"max_steps": 6, "save_every": 2, "eval_every": 2})
    from slimtune.train import trainer as T

    orig = T.Trainer._batch

    def poisoned(self, m):
        b = orig(self, m)
        if self.step >= 3:
            self.model_unwrapped.get_base_model().bert.embeddings.word_embeddings.weight.data.fill_(float("nan"))
        return b

    T.Trainer._batch = poisoned
    try:
        with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*last good checkpoint is .*step-000002"):
            run_train(cfg, **quiet)
    finally:
        T.Trainer._batch = orig
    assert (tmp_path / "run/checkpoints/step-000002/trainable.safetensors").is_file()
    assert not (tmp_path / "run/checkpoints/step-000004").exists()


def test_digits_cnn_lora_on_conv_and_linear(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    from slimtune.train.config import load_config

    cfg = load_config(None, ["model=digits-cnn", "data={builtin: digits_5_9, max_train: 200, max_eval: 100}",
                             "method={name: lora, r: 4, lora_alpha: 8, target_modules: [conv1, conv2, fc1, fc2]}",
                             "train={max_steps: 30, batch_size: 32, lr: 1e-2, eval_every: 30}",
                             f"output_dir={tmp_path / 'run'}"])
    res = run_train(cfg, **quiet)
    assert res["task"] == "image_classification"
    assert res["after"]["accuracy"] > res["before"]["accuracy"] + 0.3


@pytest.mark.slow
def test_real_minilm_rotten_tomatoes(tmp_path):
    """The packaged MiniLM on packaged Rotten Tomatoes: a real pretrained model learns the task."""
    from slimtune.train.config import load_config

    cfg = load_config(None, ["model=minilm", "data={builtin: rotten_tomatoes, max_train: 160, max_eval: 64, max_length: 48}",
                             "train={max_steps: 10, batch_size: 16, lr: 2e-3, eval_every: 10}",
                             f"output_dir={tmp_path / 'run'}"])
    res = run_train(cfg, **quiet)
    assert res["task"] == "classification"
    assert res["after"]["accuracy"] > res["before"]["accuracy"]


@pytest.mark.parametrize("method", ["prompt", "prefix", "ia3"])
def test_causal_lm_runs_other_methods(tiny_llama, tmp_path, method):
    """Prompt learning prepends virtual tokens: evaluation must still line logits up with labels."""
    write_jsonl(tmp_path / "d.jsonl", chat_rows())
    cfg = job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "d.jsonl"), "max_length": 32}, method=method)
    res = run_train(cfg, **quiet)
    assert res["task"] == "causal_lm" and "eval_loss" in res["before"] and "eval_loss" in res["after"]


@pytest.mark.parametrize("method", [{"name": "sparse", "selection": "fisher", "density": 0.05},
                                    {"name": "heads", "top_k": 1}])
def test_selection_scored_on_training_data(tiny_llama, tmp_path, method):
    """Sparse Fisher masks and top-k heads are chosen from the job's own data (train.score_batches)."""
    write_jsonl(tmp_path / "d.jsonl", chat_rows())
    logs: list[str] = []
    cfg = job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "d.jsonl"), "max_length": 32},
              method=method, train={"score_batches": 2})
    res = run_train(cfg, log=logs.append, progress=False)
    assert any("scored on 2 batches (8 training examples)" in line for line in logs), logs
    assert res["trainable"] > 0 and "eval_loss" in res["after"]
    saved = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert "scores" not in saved
    if method["name"] == "heads":  # the chosen heads are written back: the file loads without scores
        assert saved["top_k"] is None and all(len(v) == 1 for v in saved["heads"].values())
    else:
        assert saved["selected"] is True


def test_bf16_precision_keeps_base_half_and_trains_fp32_adapters(tiny_llama, tmp_path):
    """train.precision=bf16 (what `auto` picks on a GPU): frozen base loaded in bf16, LoRA weights
    upcast to fp32, forward under autocast, adapter saved in fp32 and loadable on an fp32 base."""
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "d.jsonl", chat_rows())
    logs: list[str] = []
    cfg = job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "d.jsonl"), "max_length": 32},
              method={"name": "lora", "target_modules": "all-linear"}, train={"precision": "bf16", "max_steps": 6})
    res = run_train(cfg, log=logs.append, progress=False)
    assert any("frozen base in torch.bfloat16, trained parameters in fp32" in line for line in logs), logs
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
    saved = load_file(str(tmp_path / "run/adapter/adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_compile_trains_and_generates(tiny_llama, tmp_path, monkeypatch):
    """train.compile: every block goes through torch.compile (here the aot_eager backend, which
    needs no C++ compiler), training lowers the loss, and generated-answer eval runs eagerly."""
    import slimtune.train.speed as speed
    from slimtune.compile_blocks import compile_blocks

    torch._dynamo.reset()
    calls = []

    def spy(model, **kw):
        calls.append(kw)
        return compile_blocks(model, backend="aot_eager", **kw)
    monkeypatch.setattr(speed, "compile_blocks", spy)
    write_jsonl(tmp_path / "d.jsonl", instruction_rows())
    logs: list[str] = []
    cfg = job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "d.jsonl")}, train={"compile": True})
    res = run_train(cfg, log=logs.append, progress=False)
    assert calls == [{"mode": None}] and any("blocks under torch.compile" in line for line in logs), logs
    assert res["metric"] == "gen_accuracy" and "gen_accuracy" in res["after"]
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]


def test_activation_offload(tiny_llama, tmp_path, monkeypatch):
    """train.activation_offload wraps every forward in autograd's save-on-CPU context (here without
    pinned memory, on CPU tensors); on a CPU model the job refuses it with the fix named."""
    import slimtune.train.speed as speed
    from slimtune.train.config import JobConfigError

    write_jsonl(tmp_path / "d.jsonl", chat_rows())
    cfg = job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "d.jsonl")}, train={"activation_offload": True})
    with pytest.raises(JobConfigError, match="not a CUDA GPU.*activation_offload: false"):
        run_train(cfg, **quiet)

    entered = []

    def offload_on_cpu(device):
        entered.append(device.type)
        return torch.autograd.graph.save_on_cpu(pin_memory=False)
    monkeypatch.setattr(speed, "activation_offload", offload_on_cpu)
    res = run_train(cfg, **quiet)
    assert len(entered) == 1 + 4  # the set-up check, then one per micro-batch (4 steps)
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
