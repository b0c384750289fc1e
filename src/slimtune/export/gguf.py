"""GGUF files for llama.cpp / ollama, written with the `gguf` package (its tensor-name map, writer
and quantizers): a LoRA adapter, or the merged model.

    LoRA adapter   general.type "adapter", adapter.type "lora", adapter.lora.alpha = α;
                   per adapted weight W (GGUF name, e.g. blk.0.attn_q.weight):
                       <name>.lora_a = A (r, in)     <name>.lora_b = B (out, r)
                   llama.cpp computes W x + (α / r)·B(A x), r read from lora_a. A per-module
                   scale that is not α/r (rsLoRA, alpha_pattern) is folded into B, so the file
                   computes what the adapter does.
    merged model   general.type "model", the architecture's hyper-parameters, the tokenizer
                   (copied from a GGUF of the base when there is one, else built from the HF
                   tokenizer with gguf.vocab), every weight by its GGUF name.

Layout rules that llama.cpp's own converter applies, applied here too: for the "llama"
architecture the q/k projection rows are reordered for its rotary layout (`permute_for_rope`,
B's rows for a LoRA), an embedding's lora_a is stored transposed, and a tied LM head is not
written (llama.cpp reuses token_embd). Norms and other 1-D tensors stay f32; a tensor whose rows
do not split into the quantizer's blocks falls back to f16.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# HF architecture -> (GGUF architecture, q/k rows reordered for the rotary layout)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True), "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False), "Qwen3ForCausalLM": ("QWEN3", False),
}
MERGED_ARCHITECTURES = ("LLAMA",)  # full-model export: the hyper-parameters written are llama's
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


class GGUFExportError(ValueError):
    """What cannot be written as GGUF, with the reason and what to do instead."""


def _arch(hf_config) -> tuple[Any, bool]:
    """(GGUF architecture, permute q/k) from config.architectures (export_model fills it from the
    model's class for a config built in memory)."""
    import gguf

    names = list(getattr(hf_config, "architectures", None) or [])
    for n in names:
        if n in ARCHITECTURES:
            arch, permute = ARCHITECTURES[n]
            return getattr(gguf.MODEL_ARCH, arch), permute
    raise GGUFExportError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; this base is "
                          f"{names or type(hf_config).__name__}. Merge the adapter (slimtune merge) and use "
                          "llama.cpp's convert_hf_to_gguf.py for other architectures")


def permute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (out, ...) from HF's rotary layout (two halves per head) to
    llama.cpp's (interleaved pairs): per head, row 2i+j ← row j·(d/2)+i."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute_for_rope (reading a GGUF back into HF's layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(hf_config, gguf_name: str) -> int | None:
    """The head count whose rotary layout this weight's rows follow (q: heads, k: kv heads)."""
    if gguf_name.endswith("attn_q.weight"):
        return hf_config.num_attention_heads
    if gguf_name.endswith("attn_k.weight"):
        return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return None


def _encode(t: torch.Tensor, outtype: str):
    """(data, GGML type) of a tensor in `outtype`: 1-D and non-block-aligned tensors in f32 / f16."""
    import gguf

    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or outtype == "f32":
        return a, gguf.GGMLQuantizationType.F32
    qtype = getattr(gguf.GGMLQuantizationType, outtype.upper())
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(a, qtype), qtype


def _add(writer, name: str, t: torch.Tensor, outtype: str) -> None:
    data, qtype = _encode(t, outtype)
    writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)


def _name_map(hf_config):
    import gguf

    arch, _ = _arch(hf_config)
    return gguf.get_tensor_name_map(arch, hf_config.num_hidden_layers), arch


def _gguf_name(name_map, hf_name: str) -> str:
    got = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if got is None:
        raise GGUFExportError(f"'{hf_name}' has no GGUF name for this architecture (gguf's tensor map); "
                              "llama.cpp could not use it")
    return got


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- the LoRA adapter --------------------------------------------------------------------------
def lora_tensors(cfg, state: dict[str, torch.Tensor], hf_config=None,
                 log=print) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A, B, scale)} from a LoRA file (A (r, in) / B (out, r); embeddings as PEFT stores them).

    A targeted embedding's `base_layer.weight` is PEFT's `save_embedding_layers` copy of the frozen base
    embedding (written under "auto" when embed_tokens is a target, for resized vocabularies). At the base's
    vocabulary size it is the base's own frozen tensor, which llama.cpp already has: left out, said in the
    log. At another size the vocabulary was resized, which a GGUF LoRA cannot express: an error."""
    from ..checkpoint import PREFIX

    out: dict[str, list] = {}
    vocab = getattr(hf_config, "vocab_size", None)
    paths = {k[len(PREFIX):] if k.startswith(PREFIX) else k for k in state}
    for k, v in state.items():
        path = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if path.endswith(".base_layer.weight") and f"{path[:-len('.base_layer.weight')]}.lora_embedding_A" in paths:
            if vocab is not None and v.shape[0] != vocab:
                raise GGUFExportError(f"the adapter holds a {v.shape[0]}-row embedding '{k}' but the base has {vocab} "
                                      "tokens: the vocabulary was resized, which a GGUF LoRA cannot carry; export the "
                                      "merged model (--merged) instead")
            log(f"gguf: '{k}' is the frozen base embedding PEFT's save_embedding_layers copies into the adapter; "
                "llama.cpp has it in the base GGUF, so it is left out")
            continue
        for suffix, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1), (".lora_embedding_A", 0), (".lora_embedding_B", 1)):
            if path.endswith(suffix):
                out.setdefault(path[: -len(suffix)], [None, None])[slot] = v
                break
        else:
            raise GGUFExportError(f"the adapter holds '{k}', which is not a LoRA A/B matrix (a trained bias or a "
                                  "modules_to_save copy): a GGUF LoRA cannot carry it; export the merged model "
                                  "(--merged) instead")
    res = {}
    for path, (a, b) in out.items():
        if a is None or b is None:
            raise GGUFExportError(f"'{path}' has only one of lora_A / lora_B in the file")
        r, alpha = cfg.for_module(path)
        res[path] = (a, b, alpha / math.sqrt(r) if cfg.use_rslora else alpha / r)
    return res


def export_lora(adapter_dir: str, out: str, hf_config, outtype: str = "f32", log: Callable = print) -> Path:
    """Write the LoRA adapter in `adapter_dir` (PEFT format) as a llama.cpp LoRA GGUF."""
    import gguf

    from ..checkpoint import read_adapter_weights
    from ..config import AdapterConfig

    cfg = AdapterConfig.from_pretrained(adapter_dir)
    if getattr(cfg.peft_type, "value", cfg.peft_type) != "LORA" or getattr(cfg, "use_dora", False):
        raise GGUFExportError(f"llama.cpp's GGUF adapters are LoRA; this is a "
                              f"{'DoRA' if getattr(cfg, 'use_dora', False) else cfg.method} adapter: export the "
                              "merged model (--merged) instead")
    pairs = lora_tensors(cfg, read_adapter_weights(adapter_dir), hf_config, log)
    name_map, arch = _name_map(hf_config)
    _, permute = _arch(hf_config)
    alpha = float(cfg.lora_alpha)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(adapter_dir).name)
    for path, (a, b, scale) in pairs.items():
        name = _gguf_name(name_map, path + ".weight")
        r = a.shape[0]
        b = b.float() * (scale / (alpha / r))  # llama.cpp applies α/r: fold the rest of the scale into B
        a = a.float()
        heads = _heads(hf_config, name) if permute else None
        if heads:
            b = permute_for_rope(b, heads)
        if name.startswith("token_embd"):
            a = a.t()  # llama.cpp looks embedding rows up in lora_a: (vocab, r)
        _add(writer, name + ".lora_a", a.contiguous(), outtype)
        _add(writer, name + ".lora_b", b.contiguous(), outtype)
    _write(writer)
    log(f"wrote {len(pairs)} LoRA pairs ({outtype}, alpha {alpha:g}) to {out}")
    return Path(out)


# ---- the merged model --------------------------------------------------------------------------
def _rope_theta(hf_config) -> float | None:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(hf_config, "rope_theta", None))


def _add_tokenizer(writer, tokenizer_gguf: str | None, tokenizer_dir: str | None, log: Callable) -> None:
    import gguf

    if tokenizer_gguf:  # the base's own GGUF: its tokenizer exactly as llama.cpp's converter wrote it
        reader = gguf.GGUFReader(tokenizer_gguf)
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                types = field.types
                writer.add_key_value(key, field.contents(), types[0], sub_type=types[-1] if len(types) > 1 else None)
        return
    if not tokenizer_dir:
        raise GGUFExportError("no tokenizer: pass the base's GGUF (--tokenizer-gguf) or an HF tokenizer folder")
    vocab = gguf.vocab.BpeVocab(Path(tokenizer_dir))
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    log("tokenizer built from the HF tokenizer with llama.cpp's default pre-tokenizer; pass the base's GGUF "
        "(--tokenizer-gguf) to keep its exact tokenization")


def export_model(model: torch.nn.Module, out: str, outtype: str = "f16", tokenizer_gguf: str | None = None,
                 tokenizer_dir: str | None = None, name: str | None = None, log: Callable = print) -> Path:
    """Write a (merged) transformers causal LM as a llama.cpp model GGUF."""
    import gguf

    c = model.config
    if not getattr(c, "architectures", None):
        c.architectures = [type(model).__name__]
    name_map, arch = _name_map(c)
    _, permute = _arch(c)
    if arch.name not in MERGED_ARCHITECTURES:
        raise GGUFExportError(f"merged GGUF export writes llama-architecture models; this is {arch.name}. "
                              "Export the adapter (without --merged) or use llama.cpp's convert_hf_to_gguf.py")
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(out).stem)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if _rope_theta(c) is not None:
        writer.add_rope_freq_base(float(_rope_theta(c)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{outtype.upper()}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer_gguf, tokenizer_dir, log)
    tied = getattr(model.get_output_embeddings(), "weight", None) is getattr(model.get_input_embeddings(), "weight", 0)
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    n = 0
    for hf_name, t in model.state_dict().items():
        if tied and head and hf_name == f"{head}.weight":
            continue  # llama.cpp reuses token_embd for a tied head
        gname = _gguf_name(name_map, hf_name)
        heads = _heads(c, gname) if permute else None
        if heads:
            t = permute_for_rope(t, heads)
        _add(writer, gname, t, outtype)
        n += 1
    _write(writer)
    log(f"wrote {n} tensors ({outtype}) to {out}")
    return Path(out)
