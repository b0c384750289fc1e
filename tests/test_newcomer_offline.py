"""Other tools with slimtune's adapters (issue 29): plain transformers.Trainer checkpoints them (no
"Some tensors share memory" on a tied-embedding base), and an adapter of a packaged model loads
offline in transformers and peft by its Hub id, from a fresh Hugging Face cache."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from test_integrations_trainer import args, dataset, losses, tied_llama

import slimtune

ROOT = Path(__file__).resolve().parents[1]


def slimtune_lora():
    return slimtune.get_peft_model(tied_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     task_type="CAUSAL_LM"))


def run_python(code: str, env: dict, timeout: int = 300) -> str:
    """A fresh interpreter (its own imports and Hugging Face settings); its stdout, or the failure."""
    env = {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), **env}.items()
           if v is not None}  # None: unset in the child
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_plain_trainer_checkpoints_and_resumes_a_tied_embedding_adapter(tmp_path):
    import transformers

    t = transformers.Trainer(model=slimtune_lora(), args=args(tmp_path / "run"), train_dataset=dataset())
    t.train()
    ck = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(ck))
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= files
    assert not any(f.startswith("model") for f in files)  # the adapter, not the whole model
    t.save_model(str(tmp_path / "final"))
    loaded = slimtune.PeftModel.from_pretrained(tied_llama(), tmp_path / "final")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, t.model(input_ids=ids).logits)
    # resuming from the checkpoint with a plain Trainer continues where the run was
    whole = losses(t)
    again = transformers.Trainer(model=slimtune_lora(), args=args(tmp_path / "run"), train_dataset=dataset())
    again.train(resume_from_checkpoint=str(ck))
    torch.testing.assert_close(torch.tensor(losses(again)[-2:]), torch.tensor(whole[-2:]), atol=1e-4, rtol=1e-4)


def test_plain_trainer_is_patched_whatever_the_import_order(tmp_path, monkeypatch):
    """A model built before transformers' Trainer was imported: building the Trainer around it patches
    the Trainer (the attributes it reads from the model while it is built)."""
    import transformers

    pm = slimtune_lora()
    cls = transformers.Trainer
    for name in ("_save", "_load_from_checkpoint", "_load_best_model"):  # as if never patched (restored after)
        monkeypatch.setattr(cls, name, getattr(cls, name).__wrapped__)
    monkeypatch.delattr(cls, "_slimtune_patched")
    t = transformers.Trainer(model=pm, args=args(tmp_path, max_steps=2), train_dataset=dataset())
    assert cls.__dict__.get("_slimtune_patched")
    t.train()
    files = set(os.listdir(tmp_path / "checkpoint-2"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files


def test_packaged_adapter_loads_offline_in_transformers_and_peft(tmp_path):
    """The regression: base_model_name_or_path is the Hub id; with a fresh HF_HOME and HF_HUB_OFFLINE=1,
    transformers and peft find nothing until the job links its converted base into the cache."""
    from transformers import AutoModelForCausalLM

    from slimtune.train import models

    folder = models.resolve("smollm2-135m", log=lambda *_: None)
    pm = slimtune.get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                 slimtune.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (adapter / "README.md").read_text()
    assert "packaged GGUF, dequantized" in card and "Q4_1" in card and "On another machine" in card
    ids = torch.tensor([[1, 510, 2223, 314, 260]])
    with torch.no_grad():
        ours = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
    torch.save({"ids": ids, "ours": ours, "base": base}, tmp_path / "expected.pt")
    out = run_python(f"""
        import torch, peft
        from transformers import AutoModelForCausalLM, AutoModel
        adapter, exp = {str(adapter)!r}, torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        try:
            AutoModelForCausalLM.from_pretrained(adapter)
            print("loaded before linking")
        except OSError:
            print("offline miss before linking")
        from slimtune.train import models
        assert not models.is_packaged_gguf_base("HuggingFaceTB/SmolLM2-135M-Instruct")
        models.resolve("smollm2-135m", log=lambda *_: None)  # what the job does: links the base under its id
        assert models.is_packaged_gguf_base("HuggingFaceTB/SmolLM2-135M-Instruct")  # the model card's test
        models.resolve("minilm", log=lambda *_: None)
        with torch.no_grad():
            a = AutoModelForCausalLM.from_pretrained(adapter)(input_ids=exp["ids"]).logits
            b = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)(input_ids=exp["ids"]).logits
        torch.testing.assert_close(a, exp["ours"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b, exp["ours"], atol=1e-4, rtol=1e-4)
        assert (a - exp["base"]).abs().max() > 1e-3  # the adapter is applied, not just the base
        assert AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2").config.hidden_size == 384
        print("transformers and peft load the adapter offline")
    """, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": None, "HUGGINGFACE_HUB_CACHE": None})
    assert "offline miss before linking" in out and "transformers and peft load the adapter offline" in out
    snaps = list((tmp_path / "hf" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots").iterdir())
    assert len(snaps) == 1 and (snaps[0] / "model.safetensors").resolve() == Path(folder, "model.safetensors").resolve()


def test_a_real_download_in_the_cache_is_left_alone(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from slimtune.train import hf_cache

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    real = hf_cache.repo_dir("Org/Model") / "snapshots" / ("a" * 40)
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    (real.parents[1] / "refs").mkdir()
    (real.parents[1] / "refs" / "main").write_text("a" * 40)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text('{"ours": true}')
    assert hf_cache.link_into_cache("Org/Model", ours, "test") is None
    assert (real / "config.json").read_text() == "{}"
    snap = hf_cache.link_into_cache("Other/Model", ours, "test")
    assert hf_cache.snapshot_of("Other/Model") == snap and hf_cache.is_link_to(snap, ours)
    assert hf_cache.link_into_cache("Other/Model", ours, "test") == snap  # idempotent
    monkeypatch.setenv("SLIMTUNE_HF_CACHE_LINK", "0")
    assert hf_cache.link_into_cache("Third/Model", ours, "test") is None
    assert not hf_cache.repo_dir("Third/Model").exists()
    monkeypatch.delenv("SLIMTUNE_HF_CACHE_LINK")
    moved = tmp_path / "moved"  # slimtune's own snapshot follows its folder (e.g. another $SLIMTUNE_CACHE)
    moved.mkdir()
    (moved / "config.json").write_text('{"moved": true}')
    assert hf_cache.is_link_to(hf_cache.link_into_cache("Other/Model", moved, "test"), moved)
    assert hf_cache.is_slimtune_snapshot("Other/Model", "test") and not hf_cache.is_slimtune_snapshot("Org/Model", "test")
