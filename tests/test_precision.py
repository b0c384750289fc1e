"""Precision on every CPU (issue 22): both branches of `train.precision: auto` forced through the one
switch (SLIMTUNE_CPU_BF16), and every registered method trains in bf16 and fp32 in one process
(the 2-process DDP / FSDP half of the matrix is tests/test_distributed.py).

bf16 on a CPU without native bf16 is emulated through fp32: slow, but correct, and on these tiny
models a matter of milliseconds, so the bf16 rows run on AVX2 machines too."""
from __future__ import annotations

import math

import pytest
import torch
from conftest_train import chat_rows, job, sentiment_rows, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from dist_support import METHODS

from slimtune.train import resources
from slimtune.train.run import run_train

quiet = dict(log=lambda m: None, progress=False)


@pytest.mark.parametrize("forced,want", [("1", "bf16"), ("0", "fp32")])
def test_the_switch_forces_each_branch_of_auto(monkeypatch, forced, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(resources.CPU_BF16_ENV, forced)
    prec, why = resources.precision_choice("auto")
    assert prec == want and resources.CPU_BF16_ENV in why
    assert f"-> {want}" in resources.cpu_summary()
    assert resources.precision_choice("fp32")[0] == "fp32"  # an explicit precision is never overridden


def test_the_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv(resources.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="use 1 .*, 0 .*unset"):
        resources.cpu_bf16()


@pytest.mark.parametrize("forced", ["1", "0"])
def test_auto_job_under_each_cpu_kind(tiny_llama, tmp_path, monkeypatch, forced):  # noqa: F811
    """The whole job with precision auto as it runs on each kind of CPU: the base in the chosen dtype,
    the trained parameters in fp32, the report naming the choice."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(resources.CPU_BF16_ENV, forced)
    d = write_jsonl(tmp_path / "d.jsonl", chat_rows(12))
    logs: list[str] = []
    res = run_train(job(tiny_llama, tmp_path / "run", {"train": str(d), "max_length": 32},
                        train={"max_steps": 2, "batch_size": 2, "eval_every": 2, "eval_before": False},
                        eval={"generate": False, "samples": 0, "batch_size": 4}), log=logs.append, progress=False)
    want = "bf16" if forced == "1" else "fp32"
    assert res["trainer"].precision == want
    base = res["trainer"].model.get_base_model()
    frozen = {p.dtype for p in base.parameters() if not p.requires_grad}
    trained = {p.dtype for p in base.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16 if want == "bf16" else torch.float32} and trained == {torch.float32}
    assert any(f"SLIMTUNE_CPU_BF16={forced}" in m for m in logs if m.startswith("precision:")), logs
    assert math.isfinite(res["after"]["eval_loss"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_in_each_precision(tiny_llama, tiny_bert, tmp_path, name, precision):  # noqa: F811
    """Every registered method, 2 steps in one process: a finite loss that moved, trained parameters
    in fp32 (AdamW steps would vanish in bf16), and the frozen base in the run's dtype."""
    bitfit = name == "bitfit"  # the tiny BERT classifier: its linears and LayerNorms have biases
    rows = sentiment_rows(16) if bitfit else chat_rows(16)
    d = write_jsonl(tmp_path / "d.jsonl", rows)
    res = run_train(job(tiny_bert if bitfit else tiny_llama, tmp_path / "run", {"train": str(d), "max_length": 32},
                        method=METHODS[name],
                        train={"max_steps": 2, "batch_size": 2, "eval_every": 2, "eval_before": True,
                               "precision": precision, "score_batches": 1},
                        eval={"generate": False, "samples": 0, "batch_size": 4}), **quiet)
    assert res["trainer"].precision == precision
    before, after = res["before"]["eval_loss"], res["after"]["eval_loss"]
    assert math.isfinite(before) and math.isfinite(after) and after != before, (before, after)
    model = res["trainer"].model
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    if precision == "bf16" and name != "full":  # full fine-tuning trains (so upcasts) every weight
        assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
