"""AdaLoRA against the real peft 0.21.2: config, keys, outputs, the rank allocation step by step
(the same steps in both libraries give the same masks), pruned files both ways, and the job."""
import warnings

import peft
import pytest
import torch
from conftest import logits, tiny_llama
from safetensors.torch import load_file

import slimtune
from slimtune import ConfigError
from slimtune.methods.adalora import SVDLinear

LIBS = {"peft": peft, "slimtune": slimtune}
TARGETS = ["q_proj", "v_proj"]


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def cfg(L, **kw):
    base = dict(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, target_modules=TARGETS, lora_alpha=8,
                task_type="CAUSAL_LM")  # (peft applies the orthogonality term only through a task class)
    return L.AdaLoraConfig(**{**base, **kw})


def randomize(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def train(pm, L, ids, steps):
    """The PEFT loop: forward with labels (loss + orthogonality term), step, update_and_allocate, zero_grad."""
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    losses = []
    for step in range(steps):
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


def test_config_checks_and_layers():
    with pytest.raises(ConfigError, match="total_step"):
        slimtune.AdaLoraConfig(target_modules=TARGETS)
    with pytest.raises(ConfigError, match="budgeting phase"):
        slimtune.AdaLoraConfig(total_step=4, tinit=2, tfinal=2)
    with pytest.warns(UserWarning, match="`r` is not used in AdaLora"):
        slimtune.AdaLoraConfig(total_step=10, r=4)
    pm = slimtune.get_peft_model(tiny_llama(), cfg(slimtune))
    layers = [m for m in pm.modules() if isinstance(m, SVDLinear)]
    assert len(layers) == 4 and all(m.r["default"] == 6 for m in layers)
    ours, theirs = pm.get_nb_trainable_parameters(), quiet(peft.get_peft_model, tiny_llama(), cfg(peft)).get_nb_trainable_parameters()
    assert ours[0] == theirs[0] and ours[1] == theirs[1] - 4  # (peft also counts its 4 frozen `ranknum` scalars)
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        pm.add_adapter("second", cfg(slimtune))


def test_outputs_and_files_equal_peft_both_ways(ids, tmp_path):
    made = {}
    for lib, L in LIBS.items():
        pm = quiet(L.get_peft_model, tiny_llama(), cfg(L))
        randomize(pm, seed=1)
        pm.eval()
        made[lib] = logits(pm, ids)
        pm.save_pretrained(tmp_path / lib)
    keys = {lib: {k: tuple(v.shape) for k, v in load_file(tmp_path / lib / "adapter_model.safetensors").items()}
            for lib in LIBS}
    assert keys["slimtune"] == keys["peft"]
    for src, dst in (("peft", slimtune), ("slimtune", peft)):
        back = quiet(dst.PeftModel.from_pretrained, tiny_llama(), tmp_path / src).eval()
        torch.testing.assert_close(logits(back, ids), made[src], atol=1e-5, rtol=1e-5)
    pm = quiet(slimtune.PeftModel.from_pretrained, tiny_llama(), tmp_path / "peft").eval()
    pm.merge_adapter()
    torch.testing.assert_close(logits(pm, ids), made["peft"], atol=1e-5, rtol=1e-5)


def test_rank_allocation_equals_peft_step_by_step_and_pruned_files_load_both_ways(ids, tmp_path):
    start = quiet(peft.get_peft_model, tiny_llama(), cfg(peft))
    randomize(start, seed=2)
    start.save_pretrained(tmp_path / "start")
    runs, outs = {}, {}
    for lib, L in LIBS.items():
        c = cfg(L)
        c.inference_mode = False
        pm = quiet(L.PeftModel.from_pretrained, tiny_llama(), tmp_path / "start", config=c, is_trainable=True)
        runs[lib] = (pm, quiet(train, pm, L, ids, 8))
        pm.eval()
        outs[lib] = logits(pm, ids)
        quiet(pm.save_pretrained, tmp_path / lib)
    (p, p_losses), (s, s_losses) = runs["peft"], runs["slimtune"]
    assert s_losses == pytest.approx(p_losses, rel=1e-4, abs=1e-5)  # orthogonality term included in both
    pat_p = {k.replace(".default", ""): v for k, v in p.peft_config["default"].rank_pattern.items()}
    assert s.peft_config["default"].rank_pattern == pat_p
    ranks = s.base_model.final_ranks()
    assert sum(ranks.values()) == 2 * len(ranks)  # the target budget: target_r per layer on average
    torch.testing.assert_close(outs["slimtune"], outs["peft"], atol=1e-4, rtol=1e-4)
    keys = {lib: {k: tuple(v.shape) for k, v in load_file(tmp_path / lib / "adapter_model.safetensors").items()}
            for lib in LIBS}
    assert keys["slimtune"] == keys["peft"]  # only the kept triplets are written
    assert sum(v[0] for k, v in keys["peft"].items() if k.endswith("lora_E")) == sum(ranks.values())
    for src, dst in (("peft", slimtune), ("slimtune", peft)):
        back = quiet(dst.PeftModel.from_pretrained, tiny_llama(), tmp_path / src).eval()
        torch.testing.assert_close(logits(back, ids), outs[src], atol=1e-4, rtol=1e-4)


def test_job_trains_adalora_and_reports_final_ranks(tiny_llama_dir, tmp_path):
    from conftest_train import job, write_jsonl

    from slimtune.train.run import run_train

    write_jsonl(tmp_path / "t.jsonl", [{"text": f"the cat sat on the mat number {i}"} for i in range(24)])
    method = {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 6,
              "target_modules": ["q_proj", "v_proj"]}
    cfg = job(tiny_llama_dir, tmp_path / "run", {"train": str(tmp_path / "t.jsonl")}, method=method,
              train={"max_steps": 6, "precision": "fp32", "eval_every": 6})
    res = run_train(cfg, log=lambda *_: None, progress=False)
    ranks = res["method_report"]["ranks"]
    assert res["steps"] == 6 and ranks and sum(ranks.values()) == 2 * len(ranks)
    assert "AdaLoRA: final ranks" in (tmp_path / "run" / "report.md").read_text()
    saved = slimtune.AdaLoraConfig.from_pretrained(str(tmp_path / "run" / "adapter"))
    assert {k: sum(v) for k, v in saved.rank_pattern.items()} == {f"{p}.lora_E": r for p, r in ranks.items()}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from conftest_train import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_fsdp_refuses_adalora_ddp_takes_it():
    from slimtune.train.distributed import Dist, DistributedError

    pm = slimtune.get_peft_model(tiny_llama(), cfg(slimtune))
    with pytest.raises(DistributedError, match="method 'adalora'.*re-allocates ranks.*distributed=ddp"):
        Dist("fsdp", world=2).refuse_fsdp(pm)
    Dist("ddp", world=2).refuse_fsdp(pm)
