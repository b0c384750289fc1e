"""Shared by the tests/test_serve*.py files: a tiny base model folder, adapters of several methods
made from it (weights perturbed so every adapter changes the output), and each adapter's own
offline greedy output (PeftModel.generate, one prompt at a time) to compare the server against."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from conftest_train import make_tiny_llama


def configs():
    from slimtune import (BottleneckConfig, DoraConfig, IA3Config, LayerwiseConfig, LoraConfig, PrefixTuningConfig,
                          PromptTuningConfig)

    return {
        "lora-a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "lora-b": LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"),
        "lora-c": LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"]),
        "lora-d": LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "gate_proj"]),
        "lora-head": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "dora": DoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "prompt": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "layerwise": LayerwiseConfig(last_n=1),
        "bottleneck": BottleneckConfig(adapter_type="pfeiffer", reduction_factor=4),
    }


def make_adapter(base: Path, out: Path, config, seed: int) -> Path:
    """Save an adapter of `config` on `base` with random (not identity) weights."""
    from transformers import AutoModelForCausalLM

    from slimtune import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base)
    pm = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.base_model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * (p.abs().mean() + 0.1))
    pm.save_pretrained(out)
    return out


def build(tmp: Path, names: list[str]) -> tuple[Path, dict[str, Path]]:
    """(base folder, {name: adapter folder}) for the named configs."""
    base = make_tiny_llama(tmp / "base")
    cfgs = configs()
    return base, {n: make_adapter(base, tmp / n, cfgs[n], seed=i + 1) for i, n in enumerate(names)}


@functools.lru_cache(maxsize=None)
def _base(base: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def offline_greedy(base: Path, adapter: Path | None, prompt: list[int], max_new: int) -> list[int]:
    """What generate() gives for this prompt alone (the server must give the same ids)."""
    import copy

    from slimtune import PeftModel

    model = copy.deepcopy(_base(str(base)))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def load_base(base: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)


EOS = 102  # the tiny model's eos (MiniLM's [SEP])


def make_engine(world, names, **cfg):
    """(registry, engine) over a fresh copy of the world's base model with the named adapters known
    (and loaded, up to max_loaded); not started."""
    from slimtune.serve import Engine, Registry, ServeConfig

    base, ads = world
    model, _ = load_base(base)
    reg = Registry(model, "tiny", max_loaded=cfg.pop("max_loaded", 16))
    for n in names:
        reg.add(n, str(ads[n]), "cli")
    return reg, Engine(reg, ServeConfig(**cfg), [EOS], 0)


def random_prompt(i: int, n: int) -> list[int]:
    """n token ids, the same for the same i."""
    g = torch.Generator().manual_seed(i)
    return torch.randint(1000, 20000, (n,), generator=g).tolist()
