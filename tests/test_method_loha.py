"""LoHa: PEFT-compatible Hadamard-product deltas; checked against the real `peft` package both ways."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_llama
from properties import check_merge_and_round_trip, train_lm_steps

from slimtune import ConfigError, LoHaConfig, PeftModel, get_peft_model, make_config
from slimtune.inject import adapter_layers
from slimtune.methods.loha import LoHaLayer

CASES = {"llama": (tiny_llama, {}), "bert": (tiny_bert_cls, {"task_type": "SEQ_CLS"})}


class _CNN(torch.nn.Module):
    """Conv2d with a 3×3 kernel, a 1×1 Conv2d, a grouped Conv1d with kernel 3, then a Linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.point = torch.nn.Conv2d(8, 8, 1)
        self.conv1d = torch.nn.Conv1d(8, 4, 3, padding=1, groups=2)
        self.head = torch.nn.Linear(4 * 16, 3)

    def forward(self, x):  # (B, 2, 4, 4)
        h = torch.relu(self.point(torch.relu(self.conv(x))))  # (B, 8, 4, 4)
        return self.head(torch.relu(self.conv1d(h.flatten(2))).flatten(1))


@pytest.fixture
def pics():
    torch.manual_seed(2)
    return torch.randn(3, 2, 4, 4)


def test_defaults_count_and_identity(ids):
    cfg = make_config("loha", r=4)
    assert isinstance(cfg, LoHaConfig) and (cfg.alpha, cfg.init_weights) == (8, True)
    pm = get_peft_model(tiny_llama(), cfg)
    assert cfg.target_modules == ["q_proj", "v_proj"]  # PEFT's default (LoRA's) for llama
    m = pm.base_model.model.config
    kv = m.num_key_value_heads * (m.hidden_size // m.num_attention_heads)
    h, r = m.hidden_size, 4
    # two factor pairs per module: 2·(out·r + r·in)
    assert pm.get_nb_trainable_parameters()[0] == m.num_hidden_layers * 2 * (r * (h + h) + r * (kv + h))
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))
    with pytest.raises(ConfigError, match="rank"):
        LoHaConfig(r=0)
    with pytest.raises(ConfigError, match="rank_dropout"):
        LoHaConfig(rank_dropout=1.5)


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_round_trip(case, ids, tmp_path):
    make, kw = CASES[case]
    pm = get_peft_model(make(), LoHaConfig(init_weights=False, target_modules="all-linear", **kw))
    check_merge_and_round_trip(pm, make, ids, tmp_path)


def test_training_changes_only_factors_and_disable_is_base(ids):
    pm = get_peft_model(tiny_llama(), LoHaConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    losses, changed = train_lm_steps(pm, ids, lr=2e-2)
    assert losses[-1] < losses[0]
    expected = {f"{path}.{attr}.default" for path, layer in adapter_layers(pm)
                for attr in layer.adapter_layer_names if "default" in getattr(layer, attr)}
    assert changed == expected  # every factor moved, nothing else did (the zero-init W2b gets a gradient)
    with torch.no_grad():
        adapted = logits(pm, ids)
        with pm.disable_adapter():
            torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))
        torch.testing.assert_close(logits(pm, ids), adapted)


def test_dropouts_only_in_training(ids):
    pm = get_peft_model(tiny_llama(), LoHaConfig(init_weights=False, rank_dropout=0.5, module_dropout=0.5)).eval()
    with torch.no_grad():
        ref = logits(pm, ids)
        pm.train()
        torch.manual_seed(0)
        outs = [logits(pm, ids) for _ in range(4)]
        pm.eval()
        torch.testing.assert_close(logits(pm, ids), ref)
    assert any(not torch.allclose(o, ref) for o in outs)


def test_two_adapters_and_mixed_batch_refused(ids):
    pm = get_peft_model(tiny_llama(), LoHaConfig(init_weights=False))
    pm.add_adapter("other", LoHaConfig(r=2, init_weights=False))
    with torch.no_grad():
        a = logits(pm, ids)
        pm.set_adapter("other")
        b = logits(pm, ids)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="mixed-adapter batches are not supported for loha"):
        with pm.base_model.mixed_batch(["default", "other", "default"]):
            pass


def test_conv_layers_merge_and_round_trip(pics, tmp_path):
    for effective in (False, True):
        cfg = LoHaConfig(target_modules=["conv", "point", "conv1d"], init_weights=False, use_effective_conv2d=effective)
        pm = get_peft_model(_CNN(), cfg)
        cp = {n.rsplit(".", 1)[-1] for n, l in adapter_layers(pm) if "default" in l.hada_t1}
        assert cp == ({"conv", "conv1d"} if effective else set())  # 1×1 kernels never use the CP core (PEFT)
        check_merge_and_round_trip(pm, _CNN, pics, tmp_path / str(effective))


# ---- compatibility with HF PEFT, both directions ---------------------------------------------
peft = pytest.importorskip("peft")

PEFT_CASES = {
    "llama": (tiny_llama, dict(r=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    "bert": (tiny_bert_cls, dict(task_type="SEQ_CLS")),
    "cnn": (_CNN, dict(target_modules=["conv", "point", "conv1d"], use_effective_conv2d=True)),
    "cnn_flat": (_CNN, dict(target_modules=["conv", "point", "conv1d"])),
}


def _inputs(case, ids, pics):
    return pics if case.startswith("cnn") else ids


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_saved_loads_in_slimtune(case, ids, pics, tmp_path):
    make, kw = PEFT_CASES[case]
    x = _inputs(case, ids, pics)
    pp = peft.get_peft_model(make(), peft.LoHaConfig(init_weights=False, **kw))
    with torch.no_grad():
        ref = logits(pp, x)
    pp.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    assert all(isinstance(l, LoHaLayer) for _, l in adapter_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_slimtune_saved_loads_in_peft(case, ids, pics, tmp_path):
    make, kw = PEFT_CASES[case]
    x = _inputs(case, ids, pics)
    pm = get_peft_model(make(), LoHaConfig(init_weights=False, **kw))
    with torch.no_grad():
        ref = logits(pm, x)
    pm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, x), ref, atol=1e-5, rtol=1e-5)
        theirs.merge_adapter()  # PEFT's merge of our file gives the same model too
        torch.testing.assert_close(logits(theirs, x), ref, atol=1e-5, rtol=1e-5)


def job_trains(tmp_path, method: dict) -> dict:
    """Run the job on a tiny Llama with `method` (the YAML `method:` block); check it learnt and saved
    PEFT's files; return the saved adapter_config.json. Shared by the LoKr/VeRA/OFT tests."""
    import json

    from conftest_train import chat_rows, job, make_tiny_llama, write_jsonl

    from slimtune.train.run import run_train

    model = make_tiny_llama(tmp_path / "base")
    write_jsonl(tmp_path / "d.jsonl", chat_rows())
    cfg = job(model, tmp_path / "run", {"train": str(tmp_path / "d.jsonl"), "max_length": 32},
              method=method, train={"precision": "fp32"})
    res = run_train(cfg, log=lambda *_: None, progress=False)
    assert res["trainable"] > 0 and res["after"]["eval_loss"] < res["before"]["eval_loss"]
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), tmp_path / "run/adapter")
    assert loaded.get_nb_trainable_parameters()[1] > loaded.get_nb_trainable_parameters()[0] == 0
    return json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())


def test_trains_from_the_job(tmp_path):
    """`method: {name: loha, r: 4}` in the job's YAML trains, and the saved adapter reloads (PEFT's files)."""
    saved = job_trains(tmp_path, {"name": "loha", "r": 4})
    assert saved["peft_type"] == "LOHA" and saved["r"] == 4


def grads_match_peft(peft_cfg, ours_cls, ids, tmp_path):
    """Same adapter in both libraries (PEFT's file loaded here, trainable): the same loss and the same
    gradient for every adapter tensor (slimtune's backward rebuilds ΔW instead of keeping it)."""
    pp = peft.get_peft_model(tiny_llama(), peft_cfg)
    pp.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    losses, grads = [], []
    for m in (pp, ours):
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({k.replace(".default", ""): p.grad for k, p in m.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, atol=1e-6, rtol=1e-4, msg=k)
    assert all(isinstance(l, ours_cls) for _, l in adapter_layers(ours))


def test_gradients_match_peft(ids, tmp_path):
    grads_match_peft(peft.LoHaConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]),
                     LoHaLayer, ids, tmp_path)
