"""OFT: block-diagonal orthogonal rotations of each layer's input; checked against the real `peft`
package both ways (Cayley-Neumann and exact Cayley, block sharing, COFT)."""
import warnings

import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_llama
from properties import check_merge_and_round_trip, train_lm_steps
from test_method_loha import job_trains

from slimtune import ConfigError, OFTConfig, PeftModel, get_peft_model, make_config
from slimtune.inject import adapter_layers
from slimtune.methods.oft import OFTLinear


def test_defaults_count_identity_and_errors(ids):
    cfg = make_config("oft", oft_block_size=8)
    assert isinstance(cfg, OFTConfig) and cfg.use_cayley_neumann and cfg.num_cayley_neumann_terms == 5
    pm = get_peft_model(tiny_llama(), cfg)
    m = pm.base_model.model.config
    # q_proj and v_proj read the hidden state: in = 32 = 4 blocks of 8, 8·7/2 numbers per block
    assert pm.get_nb_trainable_parameters()[0] == m.num_hidden_layers * 2 * 4 * 28
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))
    with pytest.raises(ConfigError, match="exactly one"):
        OFTConfig(r=4, oft_block_size=8)
    with pytest.warns(UserWarning, match="adjusted to 8"):  # 32 has no divisor 7: PEFT's nearest, 8
        pm = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=7))
    assert {l.oft_block_size["default"] for _, l in adapter_layers(pm)} == {8}


KW = {"neumann": dict(oft_block_size=8), "cayley": dict(r=4, oft_block_size=0, use_cayley_neumann=False),
      "shared": dict(oft_block_size=16, block_share=True, target_modules="all-linear")}


@pytest.mark.parametrize("kw", KW)
def test_merge_unmerge_and_round_trip(kw, ids, tmp_path):
    pm = get_peft_model(tiny_llama(), OFTConfig(init_weights=False, **KW[kw]))
    check_merge_and_round_trip(pm, tiny_llama, ids, tmp_path)


def test_rotation_is_orthogonal_with_exact_cayley():
    pm = get_peft_model(tiny_llama(), OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False, init_weights=False))
    layer = next(l for _, l in adapter_layers(pm))
    r = layer.get_delta_weight("default")
    torch.testing.assert_close(r @ r.t(), torch.eye(r.shape[0]), atol=1e-5, rtol=0)


def test_training_changes_only_rotations_and_disable_is_base(ids):
    pm = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    losses, changed = train_lm_steps(pm, ids, lr=2e-2)
    assert losses[-1] < losses[0]
    assert changed == {k for k, _ in pm.named_parameters() if ".oft_R." in k}
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(logits(pm, ids), logits(tiny_llama(), ids))


def test_coft_keeps_each_block_in_its_ball(ids):
    pm = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, coft=True, eps=1e-2, init_weights=False))
    with torch.no_grad():
        logits(pm, ids)
    for _, layer in adapter_layers(pm):
        rot = layer.oft_R["default"]
        norms = torch.linalg.matrix_norm(rot._skew(rot.weight))
        assert (norms <= 1e-2 / rot.weight.shape[0] ** 0.5 * (1 + 1e-5)).all()


def test_module_dropout_only_in_training(ids):
    pm = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, module_dropout=0.5, init_weights=False)).eval()
    with torch.no_grad():
        ref = logits(pm, ids)
        pm.train()
        torch.manual_seed(0)
        dropped = logits(pm, ids)
        pm.eval()
        torch.testing.assert_close(logits(pm, ids), ref)
    assert not torch.allclose(dropped, ref)


def test_two_adapters_and_mixed_batch_refused(ids):
    pm = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, init_weights=False))
    pm.add_adapter("other", OFTConfig(oft_block_size=16, init_weights=False))
    with torch.no_grad():
        a = logits(pm, ids)
        pm.set_adapter("other")
        assert not torch.allclose(a, logits(pm, ids))
    with pytest.raises(ValueError, match="mixed-adapter batches are not supported for oft"):
        with pm.base_model.mixed_batch(["default", "other", "default"]):
            pass


def test_trains_from_the_job(tmp_path):
    saved = job_trains(tmp_path, {"name": "oft", "oft_block_size": 8})
    assert saved["peft_type"] == "OFT" and saved["oft_block_size"] == 8


# ---- compatibility with HF PEFT, both directions ---------------------------------------------
peft = pytest.importorskip("peft")

PEFT_CASES = {
    "llama": (tiny_llama, dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama_cayley_r": (tiny_llama, dict(r=2, oft_block_size=0, use_cayley_neumann=False, target_modules="all-linear")),
    "llama_shared_terms": (tiny_llama, dict(oft_block_size=16, block_share=True, num_cayley_neumann_terms=3)),
    "bert": (tiny_bert_cls, dict(task_type="SEQ_CLS", oft_block_size=4)),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_saved_loads_in_slimtune(case, ids, tmp_path):
    make, kw = PEFT_CASES[case]
    pp = peft.get_peft_model(make(), peft.OFTConfig(init_weights=False, **kw))
    with torch.no_grad():
        ref = logits(pp, ids)
    pp.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    assert all(isinstance(l, OFTLinear) for _, l in adapter_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_slimtune_saved_loads_in_peft(case, ids, tmp_path):
    make, kw = PEFT_CASES[case]
    pm = get_peft_model(make(), OFTConfig(init_weights=False, **kw))
    with torch.no_grad():
        ref = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cayley-neumann.*")  # our file says which series it holds
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, ids), ref, atol=1e-5, rtol=1e-5)
        theirs.merge_adapter()
        torch.testing.assert_close(logits(theirs, ids), ref, atol=1e-5, rtol=1e-5)


def test_gradients_match_peft(ids, tmp_path):
    from test_method_loha import grads_match_peft

    grads_match_peft(peft.OFTConfig(oft_block_size=8, init_weights=False, target_modules=["q_proj", "down_proj"]),
                     OFTLinear, ids, tmp_path)


def test_search_and_compare_take_the_new_methods():
    """`search.methods` and `compare --methods` name LoHa/LoKr/VeRA/OFT like any registered method: a
    trial's draw is a method block that injects into the model (the lr is searched per method)."""
    optuna = pytest.importorskip("optuna")
    from slimtune.search import targets as T
    from slimtune.search.compare import resolve_methods
    from slimtune.search.space import build_space, method_block, parse_section

    new = ["loha", "lokr", "vera", "oft"]
    assert resolve_methods(["lora"] + new) == ["lora"] + new
    model = tiny_llama()
    blocks = T.find_blocks(model)  # the four take the space's target sets and layers (search/space.py METHOD_KEYS)
    space = build_space(parse_section({"methods": new}), "causal_lm", blocks)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(16):
        t = study.ask()
        p = space.sample(t)
        block = method_block(p, blocks)
        pm = get_peft_model(tiny_llama(), make_config(block.pop("name"), **block))
        assert pm.get_nb_trainable_parameters()[0] > 0 and p["lr"] > 0
        seen.add(p["method"])
        study.tell(t, 0.0)
    assert seen == set(new)


def test_bench_runs_the_four_methods_in_both_libraries():
    """`slimtune bench --scenarios frozen,peft_loha,slimtune_loha,...` (bench/methods.py) on the tiny
    preset: a row per library and method, and each slimtune row compared with PEFT's same method."""
    from slimtune.bench import format_table, run_benchmark

    names = ["frozen"] + [f"{lib}_{m}" for m in ("loha", "lokr", "vera", "oft") for lib in ("peft", "slimtune")]
    res = run_benchmark("tiny", scenarios=names, warmup=0)
    assert [r["scenario"] for r in res["rows"]] == names
    assert all(r["trainable"] > 0 for r in res["rows"][1:])
    for m in ("loha", "lokr", "vera", "oft"):
        assert res["ratios"][f"train_slimtune_{m}_vs_peft"] > 0 and res["ratios"][f"mem_slimtune_{m}_vs_floor"] > 0
    # same method, same settings, same trainable count in both libraries
    by = {r["scenario"]: r["trainable"] for r in res["rows"]}
    assert all(by[f"peft_{m}"] == by[f"slimtune_{m}"] for m in ("loha", "lokr", "vera", "oft"))
    assert "| train | slimtune_oft |" in format_table(res)


class _ConvNet(torch.nn.Module):
    """3×3 and 1×1 Conv2d (groups 1, square kernels: what OFT on convs takes) and a Linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.point = torch.nn.Conv2d(8, 4, 1)
        self.head = torch.nn.Linear(4 * 16, 3)

    def forward(self, x):  # (B, 2, 4, 4)
        return self.head(torch.relu(self.point(torch.relu(self.conv(x)))).flatten(1))


def test_conv2d_equals_peft_merged_both_ways(tmp_path):
    """OFT on Conv2d: the rotation of the flattened kernel applied to the weight. PEFT's file loads
    here and gives PEFT's merged outputs unmerged and merged; ours loads in PEFT, and PEFT's merge of
    it gives ours; merge/unmerge and the round trip hold; training moves only oft_R."""
    import peft

    from slimtune.methods.oft import OFTConv2d

    torch.manual_seed(3)
    x = torch.randn(3, 2, 4, 4)
    cfg = dict(oft_block_size=6, target_modules=["conv", "point"], init_weights=False)  # conv: 2·3·3 = 18 = 3 × 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_ConvNet(), peft.OFTConfig(**cfg))
        theirs.save_pretrained(tmp_path / "p")
        with torch.no_grad():
            want = theirs.merge_and_unload()(x)
    ours = PeftModel.from_pretrained(_ConvNet(), tmp_path / "p")
    assert {type(l) for _, l in adapter_layers(ours)} == {OFTConv2d}
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, _ConvNet()(x), atol=1e-3)  # the rotations act
    check_merge_and_round_trip(ours, _ConvNet, x, tmp_path / "ours", load_atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_ConvNet(), tmp_path / "ours")
        with torch.no_grad():
            torch.testing.assert_close(back.merge_and_unload()(x), want, atol=1e-5, rtol=1e-5)
    train = get_peft_model(_ConvNet(), OFTConfig(oft_block_size=6, target_modules=["conv"]))
    train(x).pow(2).mean().backward()
    grads = {k for k, p in train.named_parameters() if p.grad is not None}
    assert grads and all("oft_R" in k for k in grads)
    with pytest.raises(ValueError, match="groups=1"):
        get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)), OFTConfig(oft_block_size=6,
                                                                                          target_modules=["0"]))


def test_no_grad_folded_weight_equals_input_rotation():
    """No-grad calls with more tokens than output features rotate the weight instead of the input
    (cheaper there): the same outputs as the training form, block sharing included."""
    torch.manual_seed(4)
    x = torch.randint(0, 50, (8, 16))  # 128 tokens > every layer's out features (≤ 64)
    for kw in (dict(oft_block_size=8), dict(oft_block_size=16, block_share=True, target_modules="all-linear")):
        pm = get_peft_model(tiny_llama(), OFTConfig(init_weights=False, **kw)).eval()
        with torch.no_grad():
            folded = logits(pm, x)
        rotated = logits(pm, x).detach()  # grad enabled: the input rotation
        torch.testing.assert_close(folded, rotated, atol=1e-5, rtol=1e-5)
