"""compile_blocks: per-layer torch.compile of a LoRA model equals eager (logits and adapter
gradients), identical layers share one graph, and it is undone cleanly. On CPU the backend is
aot_eager (dynamo + AOT autograd, no C++ compiler needed); on a GPU inductor runs too."""
import pytest
import torch
import torch.nn as nn
from conftest import randomize_lora, tiny_llama

from slimtune import LoraConfig, get_peft_model
from slimtune.compile_blocks import compile_blocks, eager, repeated_blocks, uncompile_blocks

BACKENDS = ["aot_eager"] + (["inductor"] if torch.cuda.is_available() else [])


def _run(pm, ids):
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_blocks_equal_eager(backend):
    torch._dynamo.reset()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=128, use_cache=False)).to(dev)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(pm)
    ids = torch.randint(0, 128, (2, 12), device=dev)
    ref_logits, ref_grads = _run(pm, ids)
    from torch._dynamo.utils import counters

    counters.clear()
    paths = compile_blocks(pm, backend=backend)
    assert paths == ["base_model.model.model.layers.0", "base_model.model.model.layers.1",
                     "base_model.model.model.layers.2"]
    for _ in range(2):
        logits, grads = _run(pm, ids)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4)
    # one graph for layer 0 (its input needs no grad) and one shared by the others: the fused MLP
    # forward is a shared class, not a per-layer object that would recompile every layer
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert uncompile_blocks(pm) == 3
    logits, _ = _run(pm, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)


def test_compile_turns_off_kv_cache_and_generation_runs_eager():
    torch._dynamo.reset()
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert pm.get_base_model().config.use_cache
    compile_blocks(pm, backend="aot_eager")
    assert not pm.get_base_model().config.use_cache
    ids = torch.randint(0, 128, (1, 5))
    with eager():
        out = pm.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape == (1, 8)
    uncompile_blocks(pm)
    assert pm.get_base_model().config.use_cache  # back on


def test_no_repeated_blocks_is_an_error():
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), backend="aot_eager")


def test_repeated_blocks_takes_outermost_same_class_lists():
    inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    block = nn.Module()
    block.inner = inner
    m = nn.Module()
    m.layers = nn.ModuleList([block, type(block)()])
    m.layers[1].inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    m.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])  # two classes: not a stack of blocks
    m.act = nn.ModuleList([nn.ReLU(), nn.ReLU()])  # no parameters
    assert [p for p, _ in repeated_blocks(m)] == ["layers.0", "layers.1"]
