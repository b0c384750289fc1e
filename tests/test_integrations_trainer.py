"""slimtune models in the real transformers `Trainer`, side by side with peft (issue 17)."""
import os
import warnings

import peft
import pytest
import torch
from conftest import VOCAB
from safetensors.torch import load_file

import slimtune
from slimtune.integrations import Trainer


def tied_llama(seed: int = 0):
    """A tiny Llama with tied embeddings, as SmolLM2 (the case that broke full-model checkpoints)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def dataset(n: int = 8, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 8), generator=g).tolist()
    # an extra text column: the Trainer's default remove_unused_columns must drop it by the signature
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * n, "labels": ids, "text": ["x"] * n})


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=4, max_steps=4,
                learning_rate=1e-2, logging_steps=1, save_steps=2, report_to=[], use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def lora(lib, init_from=None):
    L = {"peft": peft, "slimtune": slimtune}[lib]
    if init_from is not None:  # the same starting adapter for both libraries
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return L.PeftModel.from_pretrained(tied_llama(), init_from, is_trainable=True)
    return L.get_peft_model(tied_llama(), L.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture
def start(tmp_path):
    """A random starting adapter saved by peft (B nonzero, so training moves from a non-trivial point)."""
    pm = peft.get_peft_model(tied_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "start")
    return tmp_path / "start"


def test_trainer_default_args_train_evaluate_checkpoint_like_peft(start, tmp_path):
    import transformers

    runs = {}
    for lib, cls in (("peft", transformers.Trainer), ("slimtune", Trainer)):
        t = cls(model=lora(lib, start), args=args(tmp_path / lib), train_dataset=dataset(), eval_dataset=dataset(4, 1))
        t.train()
        runs[lib] = (losses(t), t.evaluate())
    (pl, pe), (sl, se) = runs["peft"], runs["slimtune"]
    assert len(sl) == 4 and "eval_loss" in se
    torch.testing.assert_close(torch.tensor(sl), torch.tensor(pl), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(se["eval_loss"]), torch.tensor(pe["eval_loss"]), atol=1e-4, rtol=1e-4)
    ck = tmp_path / "slimtune" / "checkpoint-2"
    files = set(os.listdir(ck))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and not any(f.startswith("model") for f in files)
    ref = load_file(tmp_path / "peft" / "checkpoint-2" / "adapter_model.safetensors")
    ours = load_file(ck / "adapter_model.safetensors")
    assert set(ours) == set(ref) and all(torch.allclose(ours[k], ref[k], atol=1e-5) for k in ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(tied_llama(), ck)  # the checkpoint is a PEFT adapter


def test_plain_transformers_trainer_trains_and_evaluates_a_slimtune_model(start, tmp_path):
    """No mixin: the signature and label names alone let transformers.Trainer train and report eval_loss."""
    import transformers

    t = transformers.Trainer(model=lora("slimtune", start), args=args(tmp_path, save_strategy="no", max_steps=2),
                             train_dataset=dataset(), eval_dataset=dataset(4, 1))
    t.train()
    assert len(losses(t)) == 2 and "eval_loss" in t.evaluate()


def test_resume_from_checkpoint_continues_the_run(start, tmp_path):
    whole = Trainer(model=lora("slimtune", start), args=args(tmp_path / "whole"), train_dataset=dataset())
    whole.train()
    from transformers import TrainerCallback

    class StopAt2(TrainerCallback):  # an interrupted run: the same schedule, stopped after the step-2 checkpoint
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 2

    first = Trainer(model=lora("slimtune", start), args=args(tmp_path / "cut"), train_dataset=dataset(),
                    callbacks=[StopAt2()])
    first.train()
    resumed = Trainer(model=lora("slimtune", start), args=args(tmp_path / "cut"), train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    torch.testing.assert_close(torch.tensor(losses(resumed)[-2:]), torch.tensor(losses(whole)[-2:]), atol=1e-5, rtol=1e-5)
    a, b = whole.model.get_adapter_state_dict(), resumed.model.get_adapter_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_load_best_model_at_end_loads_the_adapter(start, tmp_path):
    t = Trainer(model=lora("slimtune", start), train_dataset=dataset(), eval_dataset=dataset(4, 1),
                args=args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                          metric_for_best_model="eval_loss"))
    t.train()
    best = load_file(os.path.join(t.state.best_model_checkpoint, "adapter_model.safetensors"))
    live = t.model.get_adapter_state_dict()
    assert all(torch.equal(best[k], live[k].cpu()) for k in best)
