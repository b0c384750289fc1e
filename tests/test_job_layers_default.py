"""The job's CPU default of adapting only the top third of a deep model's blocks, and the way out of
it that its own log line names (`method.layers_to_transform=null`)."""
import torch

from slimtune.train.config import load_config


def deep_llama(layers: int = 24):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                        max_position_embeddings=32)).eval()


def test_top_third_default_and_null_adapts_every_block(monkeypatch):
    from slimtune import get_peft_model
    from slimtune.train.job import auto_method

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c, why = auto_method(load_config(None, []), deep_llama(), "causal_lm")
    assert c.layers_to_transform == list(range(16, 24))
    line = next(w for w in why if w.startswith("layers_to_transform="))
    assert "method.layers_to_transform=null" in line

    # what the line says works: null means every block (PEFT's None), and no default line is printed
    c, why = auto_method(load_config(None, ["method.layers_to_transform=null"]), deep_llama(), "causal_lm")
    assert c.layers_to_transform is None
    assert not any(w.startswith("layers_to_transform=") for w in why)
    pm = get_peft_model(deep_llama(), c)
    blocks = {n.split(".layers.")[1].split(".")[0] for n, p in pm.named_parameters() if p.requires_grad}
    assert blocks == {str(i) for i in range(24)}
