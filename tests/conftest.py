"""Shared tiny random-init models (built from transformers configs in milliseconds, never the hub)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "HF_HOME" not in os.environ:  # the suite never writes into the user's Hugging Face cache (train/hf_cache.py
    import tempfile                # links the packaged models there by their Hub ids)

    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="slimtune-test-hf-home-")

import pytest
import torch
import torch.nn as nn


def pytest_addoption(parser):
    parser.addoption("--cpu-bf16", choices=("0", "1"), default=None,
                     help="run the suite as on another kind of CPU: 1 = native bf16 (AVX512-BF16 / AMX), 0 = AVX2-only. "
                          "Sets SLIMTUNE_CPU_BF16 for every test and the processes they start (train/resources.py)")


def pytest_configure(config):
    forced = config.getoption("--cpu-bf16")
    if forced is not None:  # xdist workers run this too, so every process sees the same CPU kind
        os.environ["SLIMTUNE_CPU_BF16"] = forced


def pytest_report_header(config):
    from slimtune.train.resources import cpu_summary

    return cpu_summary()

# Tiny models: one thread per pytest worker is fastest (-n 2 runs two workers on two cores).
torch.set_num_threads(1)

VOCAB = 128


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


class TinyCNN(nn.Module):
    """A non-transformer model: embedding, Conv1d, Conv2d and Linear layers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # x (B, 1, 4, 4)
        h = torch.relu(self.conv(x))  # (B, 8, 4, 4)
        h = torch.relu(self.conv1d(h.flatten(2)))  # (B, 8, 16)
        return self.head(torch.relu(self.fc(h.flatten(1))))


class TinyEmbedMLP(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.proj(self.emb(input_ids))))


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (3, 9))


@pytest.fixture
def images():
    torch.manual_seed(2)
    return torch.randn(3, 1, 4, 4)


def logits(model, x):
    out = model(x) if not isinstance(x, dict) else model(**x)
    return out.logits if hasattr(out, "logits") else out


def randomize_lora(model, seed: int = 0, std: float = 0.1) -> None:
    """Give every LoRA weight (incl. B) non-zero values so the adapter changes outputs."""
    from slimtune.inject import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for name in layer.adapter_names():
                for _, p in layer.adapter_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=g) * std)



@pytest.fixture(autouse=True, scope="module")
def _lora_kernel_state():
    """The mixed-LoRA decode kernel is switched per process (kernels/lora_rows.enable; a server turns
    it on at start-up): each test module starts with it off, as a library user has it (a module's own
    servers may turn it on for the module), and leaves it as it found it."""
    from slimtune.kernels import lora_rows

    saved = (lora_rows._OP, lora_rows._PREFILL, dict(lora_rows._STATE))
    lora_rows.enable("off")
    yield
    lora_rows._OP, lora_rows._PREFILL, state = saved
    lora_rows._STATE.clear()
    lora_rows._STATE.update(state)
