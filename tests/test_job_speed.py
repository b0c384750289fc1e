"""The job's fast LM path (train/lm.py, packing.py, prefix_cache.py, decode.py) gives the model's own
results: padding-free batches and the frozen-prefix cache give the padded full forward's loss and
gradients, the one-pass evaluation gives generate()'s greedy answers; plus the token count, the
on/off YAML values and `precision: auto` on CPU."""
from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from conftest_train import instruction_rows, job, tiny_llama as tiny_llama_dir, write_jsonl  # noqa: F401

from slimtune import LoraConfig, get_peft_model
from slimtune.train import packing, resources
from slimtune.train.config import JobConfigError, TrainConfig
from slimtune.train.data import IGNORE, batch_rows, collate
from slimtune.train.lm import CausalLMPath
from slimtune.train.prefix_cache import first_trained_block
from slimtune.train.run import run_train

pytestmark = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="needs torch >= 2.13")
quiet = dict(log=lambda *_: None, progress=False)


def _examples(n: int = 5, seed: int = 1) -> list[dict]:
    """Rows of different lengths, a prompt (no labels) then an answer, as data.prepare makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L, p = 5 + 3 * i, 2 + i
        ids = torch.randint(1, 128, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * L, "labels": [IGNORE] * p + ids[p:]})
    return out


def _data(ex):
    return types.SimpleNamespace(train=ex, eval=ex)


def _grads(pm):
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


def _model_loss(pm, ex):
    pm.zero_grad()
    loss = pm(**collate(ex, 0)).loss
    loss.backward()
    return loss.detach(), _grads(pm)


def _path_loss(pm, lm, ex, ids):
    pm.zero_grad()
    with lm.attention():
        loss = lm.loss(lm.collate(ex, 0), "train", ids, ex, 0)
    loss.backward()
    return loss.detach(), _grads(pm)


def _close(a, b):
    la, ga = a
    lb, gb = b
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=1e-4)


def test_padding_free_batch_equals_padded_loss_and_gradients():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    pm.train()
    ex = _examples()
    logs: list[str] = []
    lm = CausalLMPath.build(pm, TrainConfig(prefix_cache="off"), _data(ex), 1, torch.device("cpu"), None, logs.append)
    assert lm is not None and lm.pack, logs
    b = lm.collate(ex, 0)
    assert packing.is_packed(b) and b["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in ex))
    # the flattened batch holds the same rows: the benchmark's batch check reads either layout alike
    assert [r[0] for r in batch_rows(b)] == [r[0] for r in batch_rows(collate(ex, 0))]
    _close(_path_loss(pm, lm, ex, list(range(len(ex)))), _model_loss(pm, ex))
    assert any("first batch" in m and "= model's own" in m for m in logs), logs
    # outside lm.attention() the model's attention is what it was (evaluation, generation, saving)
    assert pm.get_base_model().config._attn_implementation == "sdpa"


def test_prefix_cache_starts_at_first_adapted_block_with_the_same_result(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                                 init_lora_weights=False))
    pm.train()
    ex = _examples(6)
    assert first_trained_block(pm, pm.get_base_model().get_decoder())[0] == 1
    logs: list[str] = []
    for budget_mb in (2048, 0):  # in memory, and in a file-backed tensor in the run folder
        lm = CausalLMPath.build(pm, TrainConfig(prefix_cache="on", prefix_cache_mb=budget_mb), _data(ex), 1,
                                torch.device("cpu"), tmp_path, logs.append, will_reuse={"train": True, "eval": False})
        assert lm.prefix is not None and lm.prefix.k == 1
        assert ("on disk" in lm.prefix.where) == (budget_mb == 0)
        calls = []
        h = lm.prefix.blocks[0].register_forward_hook(lambda *a: calls.append(1))
        try:
            for ids in ([0, 2, 4], [1, 3, 5], [4, 0, 2], [5, 1, 3]):  # first epoch fills, the second reads
                batch_ex = [ex[i] for i in ids]
                _close(_path_loss(pm, lm, batch_ex, ids), _model_loss(pm, batch_ex))
        finally:
            h.remove()
        # block 0 ran for the two filling batches, the path's first-batch check against the model's own
        # loss, the full forward checking the first cached batch, and our 4 references: never in epoch 2
        assert len(calls) == 2 + 1 + 1 + 4
        lm.close()
    assert not (tmp_path / ".prefix_cache").exists()


def test_prefix_cache_refuses_dropout_and_block_zero():
    m = tiny_llama()
    m.config.attention_dropout = 0.1
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.1
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1]))
    k, why = first_trained_block(pm, pm.get_base_model().get_decoder())
    assert k == 0 and "dropout before block 1" in why
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    k, why = first_trained_block(pm, pm.get_base_model().get_decoder())
    assert k == 0 and "block 0" in why
    with pytest.raises(ValueError, match="train.prefix_cache=on cannot apply: adapters start at block 0"):
        CausalLMPath.build(pm, TrainConfig(prefix_cache="on"), _data(_examples()), 1, torch.device("cpu"), None,
                           lambda *_: None, will_reuse={"train": True, "eval": True})


def _run(tiny, tmp_path, name, **train):
    write_jsonl(tmp_path / "d.jsonl", instruction_rows(36))
    cfg = job(tiny, tmp_path / name, {"train": str(tmp_path / "d.jsonl"), "max_eval": 8},
              train={"max_steps": 4, "eval_every": 2, **train}, eval={"max_new_tokens": 4, "samples": 4})
    return run_train(cfg, **quiet)


def test_one_pass_evaluation_equals_the_models_own(tiny_llama_dir, tmp_path):
    """The job's evaluation (loss at labelled positions, answers verified along the reference and
    continued from the pass's KV cache) against the model's own forward + generate(): the same
    held-out loss, accuracies and generated samples, before and after training."""
    fast = _run(tiny_llama_dir, tmp_path, "fast")
    ref = _run(tiny_llama_dir, tmp_path, "ref", chunked_ce="off")
    for a, b in ((fast["before"], ref["before"]), (fast["after"], ref["after"])):
        assert a.keys() == b.keys() and "gen_accuracy" in a
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
        assert a["gen_accuracy"] == b["gen_accuracy"] and a.get("choice_accuracy") == b.get("choice_accuracy")
    tf, tr = fast["trainer"], ref["trainer"]
    assert tf.samples_before == tr.samples_before and tf.samples_before
    assert tf.samples_after == tr.samples_after
    assert tf.lm is not None and tr.lm is None


def test_summary_counts_each_token_once(tiny_llama_dir, tmp_path):
    """summary.json's tokens: the real (unpadded) tokens of the trained batches, each step once."""
    for name, over in (("packed", {}), ("padded", {"chunked_ce": "off"})):
        res = _run(tiny_llama_dir, tmp_path, name, max_steps=None, epochs=1, log_every=1, **over)
        tr = res["trainer"]
        want = sum(len(e["input_ids"]) for e in tr.data.train)  # one epoch: every example once
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["tokens"] == want, name


def test_on_off_values_from_yaml(tiny_llama_dir, tmp_path):
    from slimtune.train.config import load_config

    p = tmp_path / "j.yaml"
    p.write_text(f"model: {tiny_llama_dir}\ndata: {{train: x.jsonl}}\n"
                 "train:\n  chunked_ce: off\n  packing: off\n  prefix_cache: on\n")
    t = load_config(str(p), []).train
    assert (t.chunked_ce, t.packing, t.prefix_cache) == ("off", "off", "on")
    # chunked_ce off turns the whole path off: forcing one of its parts is a message, not a silent no
    with pytest.raises(JobConfigError, match="train.prefix_cache=on needs the job's loss path"):
        write_jsonl(tmp_path / "d.jsonl", instruction_rows(20))
        run_train(job(tiny_llama_dir, tmp_path / "run", {"train": str(tmp_path / "d.jsonl")},
                      train={"chunked_ce": "off", "prefix_cache": "on"}), **quiet)


def test_precision_auto_on_cpu(monkeypatch):
    """The flags' branch of the decision (the SLIMTUNE_CPU_BF16 override is test_precision.py's)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(resources.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(resources, "cpu_flags", lambda: {"avx2", "fma"})
    p, why = resources.precision_choice("auto")
    assert p == "fp32" and "no native bf16" in why
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(resources, "cpu_flags", lambda flag=flag: {"avx2", flag})
        p, why = resources.precision_choice("auto")
        assert p == "bf16" and flag in why and "fp32" in why  # trained parameters stay fp32
    assert resources.precision_choice("fp32")[0] == "fp32"


def test_precision_auto_on_this_machine_is_said(tiny_llama_dir, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", instruction_rows(20))
    logs: list[str] = []
    res = run_train(job(tiny_llama_dir, tmp_path / "run", {"train": str(tmp_path / "d.jsonl")},
                        train={"max_steps": 1}), log=logs.append, progress=False)
    native, _ = resources.cpu_bf16()
    want = "bf16" if native and not torch.cuda.is_available() else res["trainer"].precision
    assert res["trainer"].precision == want
    assert any(m.startswith("precision: train.precision=auto") for m in logs), logs


@pytest.mark.slow
def test_job_benchmark_quick(tmp_path):
    """`slimtune bench --preset job --quick`: both sides run as processes on the same batches."""
    import subprocess
    import sys

    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "slimtune", "bench", "--preset", "job", "--quick", "--work",
                        str(tmp_path / "w"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    t = res["tasks"][0]
    assert t["batches_equal"] and t["batches"] > 0
    assert {"whole_process", "step_time", "peak_rss"} <= set(t["ratios"]["hf-fp32"])
    assert "| quick | hf-fp32 |" in p.stdout


def test_loss_path_modes_and_first_batch_check(monkeypatch):
    """train.chunked_ce: off / several processes / auto off CPU give the model's own loss (None);
    auto on CPU checks the first batch against the model's own loss; a mismatch switches back under
    auto (and says so) and is an error naming the fix under on."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    ex, cpu = _examples(), torch.device("cpu")
    t = TrainConfig(prefix_cache="off")
    build = lambda mode, procs=1, dev=cpu, log=lambda *_: None: CausalLMPath.build(  # noqa: E731
        pm, t.model_copy(update={"chunked_ce": mode}), _data(ex), procs, dev, None, log)
    assert build("off") is None
    assert build("auto", procs=2) is None  # several processes: the loss runs through the DDP/FSDP wrapper
    assert build("auto", dev=torch.device("meta")) is None  # auto: CPU only
    with pytest.raises(ValueError, match="chunked_ce=on cannot apply"):
        build("on", procs=2)
    ids = list(range(len(ex)))
    ref = pm(**collate(ex, 0)).loss
    # a model whose logits are not lm_head(h): simulated by shifting the path's cross-entropy
    real = CausalLMPath._ce
    monkeypatch.setattr(CausalLMPath, "_ce", lambda self, h, tgt, red: real(self, h, tgt, red) + 1.0)
    logs: list[str] = []
    lm = build("auto", log=logs.append)
    with lm.attention():
        torch.testing.assert_close(lm.loss(lm.collate(ex, 0), "train", ids, ex, 0), ref)
    assert lm.disabled and any("using the model's own loss" in m for m in logs), logs
    lm = build("on")
    with lm.attention(), pytest.raises(ValueError, match="chunked_ce=auto or off"):
        lm.loss(lm.collate(ex, 0), "train", ids, ex, 0)


def test_loss_path_refuses_on_for_a_model_it_cannot_run():
    from conftest import tiny_gpt2

    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    data = _data(_examples())
    with pytest.raises(ValueError, match="chunked_ce=on cannot apply"):
        CausalLMPath.build(pm, TrainConfig(chunked_ce="on"), data, 1, torch.device("cpu"), None, lambda *_: None)
    assert CausalLMPath.build(pm, TrainConfig(chunked_ce="auto"), data, 1, torch.device("cpu"), None,
                              lambda *_: None) is None
