"""The search space (search/space.py) and target sets (search/targets.py): every bad space is one
SearchError naming the key; target sets select exactly the attention / MLP / all linears of the
chosen blocks; a trial's draw becomes a method block the job accepts; trainable counts on the
weightless copy equal the real injection's."""
from __future__ import annotations

import pytest
import torch.nn as nn

optuna = pytest.importorskip("optuna")

from slimtune.search import targets as T  # noqa: E402
from slimtune.search.space import SearchError, build_space, method_block, parse_section  # noqa: E402
from slimtune.targeting import LINEAR_TYPES, select  # noqa: E402


def _llama(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1))


def _bert(layers=3):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=layers, num_attention_heads=2))


def _gpt2(layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=layers, n_head=2, bos_token_id=0, eos_token_id=0))


def _chosen(model, target):
    return set(select(model, target, supported_types=LINEAR_TYPES).names)


@pytest.mark.parametrize("make, att, mlp", [
    (_llama, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
     {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    (_bert, {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"},
     {"intermediate.dense", "output.dense"}),
    (_gpt2, {"attn.c_attn", "attn.c_proj"}, {"mlp.c_fc", "mlp.c_proj"}),
])
def test_target_sets_split_each_block_by_role(make, att, mlp):
    model = make()
    blocks = T.find_blocks(model)
    (b,) = blocks.lists
    assert b.n == 3
    assert set(b.attention) == att and set(b.mlp) == mlp
    a = _chosen(model, T.target_modules(blocks, "attention", "all"))
    m = _chosen(model, T.target_modules(blocks, "mlp", "all"))
    assert a and m and not (a & m)
    assert len(a) == 3 * len(att) and len(m) == 3 * len(mlp)
    every = _chosen(model, T.target_modules(blocks, "all-linear", "top_third"))
    assert every == {n for n in a | m if f"{b.path}.2." in n}
    # the ambiguity a suffix list would have (BERT's output.dense is also attention.output.dense) is gone
    assert all(".attention." not in n for n in m)


def test_all_linear_over_all_layers_is_peft_all_linear_and_layer_choices():
    blocks = T.find_blocks(_llama(layers=6))
    assert T.target_modules(blocks, "all-linear", "all") == "all-linear"
    assert T.layer_indices("top_half", 6) == [3, 4, 5]
    assert T.layer_indices("top_third", 6) == [4, 5]
    assert T.layer_indices("bottom_half", 6) == [0, 1, 2]
    assert T.layer_indices([5, 0, 5], 6) == [0, 5]
    with pytest.raises(ValueError, match="numbered 0..5"):
        T.layer_indices([6], 6)


def test_a_model_without_blocks_has_no_target_sets():
    with pytest.raises(ValueError, match="no repeated transformer blocks"):
        T.check(T.find_blocks(nn.Sequential(nn.Linear(2, 2))), "attention", "all")


@pytest.mark.parametrize("section, match", [
    ({"rank": [4]}, r"unknown key 'search.rank'"),
    ({"lrr": 1e-3}, r"did you mean 'search.lr'"),
    ({"methods": []}, "empty list"),
    ({"r": []}, "search.r is an empty list"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "low 0.01 is above high 0.0001"),
    ({"lr": {"low": 0, "high": 1e-2, "log": True}}, "log range needs low > 0"),
    ({"methods": ["ia3"], "r": [4, 8]}, r"search.r applies to lora / dora / loha / lokr only"),
    ({"methods": ["lorra"]}, "did you mean 'lora'"),
    ({"targets": ["attn"]}, "not a target set"),
    ({"layers": ["top"]}, "not a layer choice"),
    ({"dropout": [1.5]}, r"must be in \[0, 1\)"),
    ({"r": [0]}, "whole number >= 1"),
    ({"methods": "lora", "r": 8, "alpha_over_r": 2, "targets": "attention", "layers": "all", "dropout": 0.0, "lr": 1e-3,
      "rslora": False}, "holds one configuration"),
    ({"pruner": "median"}, "search.pruner"),
])
def test_bad_spaces_are_one_message(section, match):
    with pytest.raises(SearchError, match=match):
        build_space(parse_section(section), "causal_lm", T.find_blocks(_llama()))


def test_a_target_set_the_model_lacks_is_refused_before_any_trial():
    blocks = T.Blocks([T.BlockList("model.layers", 2, attention=["self_attn.q_proj"], mlp=[])])
    with pytest.raises(SearchError, match="no mlp linear layers"):
        build_space(parse_section({"targets": ["mlp"]}), "causal_lm", blocks)


def test_defaults_per_task_and_shared_parameter_names():
    blocks = T.find_blocks(_llama())
    gen = build_space(parse_section(None), "causal_lm", blocks)
    cls = build_space(parse_section(None), "classification", blocks)
    assert gen.methods == ("lora", "dora")
    assert "top_third" in gen.per_method["lora"]["layers"].values
    assert "top_third" not in cls.per_method["lora"]["layers"].values
    assert gen.names[("lora", "lr")] == "lr"  # lora and dora share the lr range: one parameter
    mixed = build_space(parse_section({"methods": ["lora", "prompt"]}), "causal_lm", blocks)
    assert mixed.names[("prompt", "lr")] == "lr[prompt]" and mixed.names[("lora", "lr")] == "lr[lora]"
    assert set(mixed.per_method["prompt"]) == {"lr"}


def test_draws_become_method_blocks_the_job_accepts():
    from slimtune.registry import make_config

    model = _llama()
    blocks = T.find_blocks(model)
    space = build_space(parse_section({"methods": ["lora", "dora", "ia3"], "layers": ["all", [0, 2]]}), "causal_lm",
                        blocks)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen, rs = set(), set()
    for _ in range(25):
        t = study.ask()
        p = space.sample(t)
        block = method_block(p, blocks)
        cfg = make_config(block.pop("name"), **block)
        seen.add(p["method"])
        if p["method"] in ("lora", "dora"):
            assert cfg.lora_alpha == pytest.approx(p["alpha_over_r"] * p["r"])
            assert cfg.use_rslora is p["rslora"]  # rsLoRA is in the default space
            rs.add((p["method"], p["rslora"]))
            names = _chosen(model, cfg.target_modules)
            assert names
            if p["layers"] == [0, 2]:
                assert all(".1." not in n for n in names)
        study.tell(t, 0.0)
    assert seen == {"lora", "dora", "ia3"} and {r for _, r in rs} == {False, True}


def test_the_first_trial_is_the_jobs_own_config_snapped_into_the_space():
    """warmstart.first_trial: the config's rank / scale / dropout / lr, each snapped to the nearest
    value the space offers; a method outside the space gives no warm start."""
    from slimtune.search.space import build_space, parse_section
    from slimtune.search.warmstart import first_trial
    from slimtune.train.config import JobConfig

    sp = build_space(parse_section({"methods": ["lora", "ia3"], "r": [4, 16], "alpha_over_r": [1, 4],
                                    "lr": {"low": 1e-4, "high": 1e-2, "log": True}}), "classification")
    cfg = JobConfig.model_validate({"model": "m", "data": {"train": "t.jsonl"}, "method": {"name": "lora", "r": 12, "lora_alpha": 24},
                                    "train": {"lr": 5e-2}})
    first = first_trial(sp, cfg, "classification")
    assert first == {"method": "lora", "r": 16, "alpha_over_r": 1.0, "targets": "attention", "layers": "all",
                     "dropout": 0.0, "rslora": False, "lr": 1e-2}
    # the job's auto choice (r 8 on a small classifier, alpha 2r) when the config names only the method
    first = first_trial(sp, JobConfig.model_validate({"model": "m", "data": {"train": "t.jsonl"}, "method": "lora", "train": {"lr": 1e-3}}),
                        "classification")
    assert first["r"] == 4 and first["alpha_over_r"] == 1.0 and first["lr"] == 1e-3
    assert first_trial(sp, JobConfig.model_validate({"model": "m", "data": {"train": "t.jsonl"}, "method": "prompt"}), "classification") is None


def test_the_warm_starts_fit_the_trainable_limit_and_try_every_linear():
    """warmstart.starts under a trainable limit: the job's own choice with its rank lowered through the
    space's ranks until it fits (a skipped warm start would leave the search without it), then LoRA on
    every linear of every block at the largest rank that fits, the pattern off, the lr at the range's
    centre, counted on the real injected model."""
    from slimtune import get_peft_model
    from slimtune.registry import make_config
    from slimtune.search.warmstart import draw_of, starts
    from slimtune.train.config import JobConfig

    blocks = T.find_blocks(_llama())

    def pct(p):  # the share a configuration trains, on the injected tiny Llama
        block = method_block(p, blocks, total_steps=20)
        pm = get_peft_model(_llama(), make_config(block.pop("name"), **block))
        trainable, total = pm.get_nb_trainable_parameters()
        return 100 * trainable / total

    sp = build_space(parse_section({"methods": ["lora"], "r": [1, 2, 4, 8, 16],
                                    "lr": {"low": 1e-4, "high": 1e-2, "log": True}}), "causal_lm", blocks)
    cfg = JobConfig.model_validate({"model": "m", "data": {"train": "t.jsonl"}, "method": {"name": "lora", "r": 16},
                                    "train": {"lr": 5e-4}})
    at = {r: pct({**draw_of(sp, {"r": r, "alpha_over_r": 2.0, "targets": "attention", "layers": "all", "dropout": 0.0,
                                 "rslora": False, "lr": 5e-4})}) for r in (1, 2, 4, 8, 16)}
    lin = {r: pct({**draw_of(sp, {"r": r, "alpha_over_r": 2.0, "targets": "all-linear", "layers": "all", "dropout": 0.0,
                                  "rslora": False, "mlp_r_factor": 1.0, "lr": 5e-4})}) for r in (1, 2, 4, 8, 16)}
    limit = (at[4] + at[8]) / 2  # the job's r 16 and 8 are above it, 4 below
    assert at[4] < limit < at[8] and lin[1] < limit  # the every-linear start fits at some rank below
    fits = max(r for r in lin if lin[r] <= limit)
    got = starts(sp, cfg, "causal_lm", limit, pct)
    (first, why1), (second, why2) = got
    assert first == {"r": 4, "alpha_over_r": 2.0, "targets": "attention", "layers": "all", "dropout": 0.0,
                     "rslora": False, "lr": 5e-4}
    assert "rank lowered to 4" in why1
    assert second == {"r": fits, "alpha_over_r": 2.0, "targets": "all-linear", "layers": "all", "dropout": 0.0,
                      "rslora": False, "mlp_r_factor": 1.0, "lr": pytest.approx(1e-3)}
    assert "every linear" in why2
    # no limit: the job's own rank, the every-linear start at the space's largest
    (first, why1), (second, _) = starts(sp, cfg, "causal_lm", None, pct)
    assert first["r"] == 16 and "lowered" not in why1 and second["r"] == 16
    # nothing fits: no start at all (the search's own draws then say the space is above the limit)
    assert starts(sp, cfg, "causal_lm", min(at[1], lin[1]) / 2, pct) == []
    # a space without every-linear targets: only the job's own choice
    sp2 = build_space(parse_section({"methods": ["lora"], "targets": ["attention", "mlp"]}), "causal_lm", blocks)
    assert [p["targets"] for p, _ in starts(sp2, cfg, "causal_lm", None, pct)] == ["attention"]


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "vera", "oft", "adalora"])
def test_new_methods_and_rank_patterns_are_in_the_space_and_build(method):
    """LoHa, LoKr, VeRA, OFT and AdaLoRA are options of the space with the target sets and layers; the
    rank pattern (all-linear targets: MLP rank r * mlp_r_factor, attention r, the same alpha/r) reaches
    PEFT's rank_pattern / alpha_pattern and the injected layers have those ranks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune import get_peft_model
    from slimtune.registry import make_config

    def llama():  # hidden 64: OFT's 32-wide rotation blocks divide every linear's input
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1))

    blocks = T.find_blocks(llama())
    space = build_space(parse_section({"methods": [method], "targets": ["all-linear", "attention"],
                                       "layers": ["all", "top_half"], "r": [2, 4], "mlp_r_factor": [2.0, 1.0]}
                                      if method in ("lora", "dora", "loha", "lokr") else
                                      {"methods": [method], "targets": ["all-linear", "attention"],
                                       "layers": ["all", "top_half"]}), "causal_lm", blocks)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    patterned = 0
    for _ in range(8):
        t = study.ask()
        p = space.sample(t)
        assert ("mlp_r_factor" in p) == (method in ("lora", "dora", "loha", "lokr") and p["targets"] == "all-linear")
        block = method_block(p, blocks, total_steps=20)
        name = block.pop("name")
        pm = get_peft_model(llama(), make_config(name, **block))
        trained = [n for n, q in pm.named_parameters() if q.requires_grad]
        assert trained and all(".layers.1." in n for n in trained) if p["layers"] == "top_half" else trained
        if p["targets"] == "attention":
            assert not any(".mlp." in n for n in trained)
        if p.get("mlp_r_factor") == 2.0:
            patterned += 1
            r, alpha = p["r"], p["alpha_over_r"] * p["r"]
            assert list(block["rank_pattern"].values()) == [2 * r]
            assert list(block["alpha_pattern"].values()) == [pytest.approx(2 * alpha)]
            ranks = {n: (m.r["default"] if isinstance(m.r, dict) else m.r) for n, m in pm.named_modules()
                     if hasattr(m, "r") and n.endswith(("_proj",))}
            assert ranks and all(v == (2 * r if ".mlp." in n else r) for n, v in ranks.items()), ranks
        study.tell(t, 0.0)
    if method in ("lora", "dora", "loha", "lokr"):
        assert patterned
