"""slimtune models in the real TRL `SFTTrainer`, side by side with peft (issue 17)."""
import os
import random
import warnings

import peft
import pytest
import torch
from conftest import VOCAB
from safetensors.torch import load_file

import slimtune

trl = pytest.importorskip("trl")
from slimtune.integrations.trl import SFTTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def tokenizer():
    """A word-level tokenizer built offline (no hub), sized to the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tied_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg)


def texts(n: int, seed: int):
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_dict({"text": [" ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(4, 9))) for _ in range(n)]})


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                learning_rate=1e-2, logging_steps=1, save_steps=2, report_to=[], use_cpu=True, bf16=False, seed=0,
                max_length=16, dataloader_num_workers=0, disable_tqdm=True)
    return trl.SFTConfig(**{**base, **kw})


def losses(t):
    return [h["loss"] for h in t.state.log_history if "loss" in h]


def run(trainer_cls, tmp_path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer_cls(args=config(tmp_path), train_dataset=texts(8, 0), eval_dataset=texts(4, 1),
                        processing_class=tokenizer(), **kw)
        t.train()
        return t, losses(t), t.evaluate()


def test_sft_trainer_with_a_slimtune_model_matches_peft(tmp_path):
    start = peft.get_peft_model(tied_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                                              task_type="CAUSAL_LM"))
    start.save_pretrained(tmp_path / "start")
    models = {n: L.PeftModel.from_pretrained(tied_llama(), tmp_path / "start", is_trainable=True)
              for n, L in (("peft", peft), ("slimtune", slimtune))}
    _, ref, ref_eval = run(trl.SFTTrainer, tmp_path / "peft", model=models["peft"])
    t, got, got_eval = run(SFTTrainer, tmp_path / "ours", model=models["slimtune"])
    assert len(got) == 4 and "eval_loss" in got_eval
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(got_eval["eval_loss"]), torch.tensor(ref_eval["eval_loss"]), atol=1e-4, rtol=1e-4)
    ck = tmp_path / "ours" / "checkpoint-2"
    assert "adapter_model.safetensors" in os.listdir(ck) and not any(f.startswith("model") for f in os.listdir(ck))
    a, b = load_file(ck / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "checkpoint-2" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_sft_trainer_with_a_slimtune_peft_config_matches_peft(tmp_path):
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _, ref, _ = run(trl.SFTTrainer, tmp_path / "peft", model=tied_llama(), peft_config=peft.LoraConfig(**cfg))
    t, got, _ = run(SFTTrainer, tmp_path / "ours", model=tied_llama(), peft_config=slimtune.LoraConfig(**cfg))
    assert isinstance(t.model, slimtune.PeftModel)  # the adapter is slimtune's, initialised as PEFT's (same seed)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        SFTTrainer(model=t.model, args=config(tmp_path / "x"), train_dataset=texts(4, 0), processing_class=tokenizer(),
                   peft_config=slimtune.LoraConfig(**cfg))


def test_sft_trainer_resumes_from_an_adapter_checkpoint(tmp_path):
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _, whole, _ = run(SFTTrainer, tmp_path / "whole", model=tied_llama(), peft_config=slimtune.LoraConfig(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = SFTTrainer(model=tied_llama(), peft_config=slimtune.LoraConfig(**cfg), args=config(tmp_path / "whole"),
                       train_dataset=texts(8, 0), processing_class=tokenizer())
        t.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    torch.testing.assert_close(torch.tensor(losses(t)[-2:]), torch.tensor(whole[-2:]), atol=1e-5, rtol=1e-5)
