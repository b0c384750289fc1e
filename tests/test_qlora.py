"""QLoRA: slimtune's adapters on bitsandbytes 4-bit (NF4, FP4) and 8-bit bases, on CPU.

Every numeric check compares against a *dense twin*: the same model with each quantized linear
replaced by its exact dequantized weight, so "the quantized path computes the right thing" is a
statement about plain torch, not about tolerances for quantization error."""
import warnings

import pytest
import torch
import torch.nn as nn
from conftest_qlora import (batch, dense_twin, force_cpu_repack, grads, is_repacked, llama_dir, load,  # noqa: F401
                            save_tiny_llama)

import slimtune
from slimtune import LoraConfig, get_peft_model, make_config
from slimtune.compat import is_activation_checkpointing
from slimtune.methods.lora_quant import QuantDoraLinear, QuantIA3Linear, QuantLinear
from slimtune.quant import QuantizationError, dequantize, kind, quantized_linears

QUANTS = ["nf4", "fp4", "int8"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model, seed=1, **kw):
    torch.manual_seed(seed)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ALL, "init_lora_weights": False, **kw}
    return get_peft_model(model, LoraConfig(**kw))


def test_layers_found_by_type_and_all_linear(llama_dir):
    for quant in ("nf4", "int8"):
        m = load(llama_dir, quant)
        n_quant = len(list(quantized_linears(m)))
        pm = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear"))
        layers = [mod for mod in pm.modules() if isinstance(mod, QuantLinear)]
        assert len(layers) == n_quant == 14  # every quantized linear, not the (unquantized) lm_head
        assert type(pm.base_model.model.lm_head) is nn.Linear
        assert all(kind(layer.base_layer) == ("8bit" if quant == "int8" else "4bit") for layer in layers)
        assert layers[0].in_features == 64 and layers[0].lora_A["default"].weight.dtype == torch.float32
    fam = get_peft_model(load(llama_dir), LoraConfig(r=4))  # no targets: the family default (q_proj, v_proj)
    assert sorted({n.split(".")[-1] for n, mod in fam.named_modules() if isinstance(mod, QuantLinear)}) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_loss_and_grads_equal_the_dense_twin(llama_dir, quant, dropout):
    q = load(llama_dir, quant)
    ref = dense_twin(llama_dir, q)
    pq, pr = _lora(q, lora_dropout=dropout), _lora(ref, lora_dropout=dropout)
    pq.train(), pr.train()
    x = batch()
    torch.manual_seed(3)
    lq = pq(x, labels=x).loss
    lq.backward()
    torch.manual_seed(3)  # the same dropout masks
    lr = pr(x, labels=x).loss
    lr.backward()
    # int8 on CPU trains through dequantize + fp32 matmul (bitsandbytes' MatMul8bitFp): same numbers
    torch.testing.assert_close(lq, lr, atol=1e-5, rtol=1e-5)
    gq, gr = grads(pq), grads(pr)
    assert set(gq) == set(gr) and len(gq) == 28
    for k in gq:
        torch.testing.assert_close(gq[k], gr[k], atol=1e-5, rtol=1e-4, msg=k)


def test_only_adapters_change_and_disable_is_the_base(llama_dir):
    q = load(llama_dir)
    x = batch()
    with torch.no_grad():
        base_out = q(x).logits
    packed = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in quantized_linears(q)}
    pm = _lora(q)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    for _ in range(2):
        pm(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(("lora_A" in n or "lora_B" in n) for n in changed)
    for n, m in quantized_linears(pm):
        orig = packed[n.replace("base_model.model.", "").replace(".base_layer", "")]
        assert torch.equal(m.weight.data, orig[0]) and torch.equal(m.weight.quant_state.absmax, orig[1])
    pm.eval()
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(pm(x).logits, base_out, atol=0, rtol=0)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_and_unload_is_exact_and_plain(llama_dir, quant, tmp_path):
    q = load(llama_dir, quant)
    deq = {n: dequantize(m) for n, m in quantized_linears(q)}
    pm = _lora(q, target_modules=["q_proj", "v_proj", "down_proj"])
    deltas = {n.replace("base_model.model.", ""): layer.get_delta_weight("default")
              for n, layer in pm.named_modules() if isinstance(layer, QuantLinear)}
    # int8 in eval() runs LLM.int8(), which quantizes the activations too; in train() it multiplies by the
    # dequantized weight (what the adapter trained against), the reference for an exact merge (no dropout here)
    pm.train(quant == "int8")
    x = batch()
    with torch.no_grad():
        unmerged = pm(x).logits
    merged = pm.merge_and_unload()
    assert not list(quantized_linears(merged)) and not isinstance(merged, slimtune.PeftModel)
    assert getattr(merged, "hf_quantizer", None) is None and not hasattr(merged.config, "quantization_config")
    assert not getattr(merged, "is_loaded_in_4bit", False) and not getattr(merged, "is_loaded_in_8bit", False)
    for n, w in deq.items():
        lin = merged.get_submodule(n)
        assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32
        expect = w + deltas[n] if n in deltas else w  # dequantize(W_q) + ΔW, bit for bit
        assert torch.equal(lin.weight, expect), n
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, unmerged, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "m")  # a plain checkpoint: transformers loads it with no bitsandbytes
    back = load(tmp_path / "m", None)
    assert not list(quantized_linears(back))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_merge_in_place_and_unmerge_restore_the_quantized_base(llama_dir):
    pm = _lora(load(llama_dir))
    pm.eval()
    x = batch()
    packed = {n: m.weight.data.clone() for n, m in quantized_linears(pm)}
    with torch.no_grad():
        unmerged = pm(x).logits
        pm.merge_adapter()
        assert not list(quantized_linears(pm))  # merged: the dense copies run
        merged = pm(x).logits
        with pm.disable_adapter():  # unmerges (restores the 4-bit layers) and re-merges after
            base = pm(x).logits
        pm.unmerge_adapter()
        again = pm(x).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, unmerged)
    assert {n: m.weight.data for n, m in quantized_linears(pm)}.keys() == packed.keys()
    assert all(torch.equal(m.weight.data, packed[n]) for n, m in quantized_linears(pm))
    with torch.no_grad():
        torch.testing.assert_close(base, load(pm.peft_config["default"].base_model_name_or_path)(x).logits)


def test_safe_merge_refuses_nan_and_leaves_the_base(llama_dir):
    pm = _lora(load(llama_dir), target_modules=["q_proj"])
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pm.merge_adapter(safe_merge=True)
    assert kind(layer.base_layer) == "4bit" and not layer.merged


def test_merge_and_requantize_measures_its_cost(llama_dir, tmp_path, capsys):
    from slimtune.quant import merge_and_requantize

    q = load(llama_dir)
    pm = _lora(q, target_modules=["q_proj", "v_proj"])
    pm.eval()
    x = batch()
    with torch.no_grad():
        unmerged = pm(x).logits
    model, cost = merge_and_requantize(pm, {"input_ids": x})
    printed = capsys.readouterr().out
    assert "re-quantizing 4 merged linears (nf4) costs: max |Δ|" in printed
    layers = dict(quantized_linears(model))
    assert len(layers) == 14 and all(kind(m) == "4bit" for m in layers.values())
    qs = layers["model.layers.0.self_attn.q_proj"].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested and qs.blocksize == 64  # settings of the original base
    with torch.no_grad():
        got = model(x).logits
    diff = (got - unmerged).abs()
    assert cost.max_abs == pytest.approx(float(diff.max()), rel=1e-5) and cost.mean_abs > 0
    assert cost.exact_max_abs < 1e-4 < cost.max_abs  # the dense merge is rounding only; re-quantizing is not
    model.save_pretrained(tmp_path / "q")  # a 4-bit checkpoint transformers loads back as it is
    back = load(tmp_path / "q", None)
    assert len(list(quantized_linears(back))) == 14
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, got, atol=1e-5, rtol=1e-5)


def test_eval_then_train_gradients_equal_train_only(llama_dir):
    """The AVX512-BF16 trap: an eval() forward without gradients repacks Linear4bit weights in place,
    after which training gets wrong LoRA gradients. Forced here the way bitsandbytes sets it on such
    CPUs, so it is exercised on every machine (and on AVX512-BF16 CPUs it is the default anyway)."""
    x = batch()

    def run(eval_first: bool, force: bool, guard: bool = True):
        q = load(llama_dir, guard=False)  # the flag as this CPU's bitsandbytes sets it (forced on below)
        if force:
            force_cpu_repack(q)
        if guard:
            q = slimtune.prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)
            pm = _lora(q)
        else:  # the hazard without slimtune's guard, to show the forced flag reaches the repack
            pm = q
        if eval_first:
            pm.eval()
            with torch.no_grad():
                pm(x)
        if not guard:
            return is_repacked(q)
        pm.train()
        pm(x, labels=x).loss.backward()
        assert not any(is_repacked(q))
        return grads(pm)

    assert all(run(True, True, guard=False))  # the forced flag does repack on this CPU
    reference = run(False, False)
    for force in (False, True):
        after_eval = run(True, force)
        assert after_eval.keys() == reference.keys() and len(reference) == 28
        for k in reference:
            assert torch.equal(after_eval[k], reference[k]), k


def test_raw_load_takes_this_cpus_repack_flag_and_slimtune_loads_clear_it(llama_dir):
    """bitsandbytes sets each Linear4bit's repack flag from the CPU (has_avx512bf16): true on AVX512-BF16
    machines, false on AVX2 ones. Whatever it was, the guarded load (slimtune's loaders, the job)
    leaves none set, so no eval forward repacks."""
    from bitsandbytes.functional import has_avx512bf16

    raw = load(llama_dir, guard=False)
    flags = {m.support_avx512bf16_for_cpu for _, m in quantized_linears(raw)}
    assert flags == {bool(has_avx512bf16())}
    q = load(llama_dir)
    assert {m.support_avx512bf16_for_cpu for _, m in quantized_linears(q)} == {False}
    q.eval()
    with torch.no_grad():
        q(batch())
    assert not any(is_repacked(q))


def test_guard_undoes_an_earlier_repack(llama_dir):
    q = load(llama_dir)
    force_cpu_repack(q)
    with torch.no_grad():
        q(batch())  # eval + no grad: bitsandbytes repacks every Linear4bit
    assert all(is_repacked(q))
    with pytest.warns(UserWarning, match="repacked by bitsandbytes"):
        pm = _lora(q)  # get_peft_model meets the repacked base and converts it back
    assert not any(is_repacked(q))
    ref = dense_twin(llama_dir, q)  # whatever the weights are now, training sees them exactly
    pr = _lora(ref)
    x = batch()
    pm.train(), pr.train()
    pm(x, labels=x).loss.backward()
    pr(x, labels=x).loss.backward()
    gq, gr = grads(pm), grads(pr)
    for k in gq:
        torch.testing.assert_close(gq[k], gr[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_on_a_quantized_base(llama_dir, method):
    q = load(llama_dir)
    ref = dense_twin(llama_dir, q)
    if method == "dora":
        make = lambda m: get_peft_model(m, make_config("dora", r=4, target_modules=["q_proj", "v_proj", "down_proj"],  # noqa: E731
                                                        init_lora_weights=False))
        cls = QuantDoraLinear
    else:
        make = lambda m: get_peft_model(m, make_config("ia3", init_ia3_weights=False))  # noqa: E731
        cls = QuantIA3Linear
    torch.manual_seed(1)
    pq = make(q)
    torch.manual_seed(1)
    pr = make(ref)
    assert sum(isinstance(m, cls) for m in pq.modules()) == 6  # 3 targets x 2 layers
    x = batch()
    pq.train(), pr.train()
    torch.testing.assert_close(pq(x, labels=x).loss, pr(x, labels=x).loss, atol=1e-5, rtol=1e-5)
    pq(x, labels=x).loss.backward()
    pr(x, labels=x).loss.backward()
    gq, gr = grads(pq), grads(pr)
    assert gq.keys() == gr.keys() and gq
    for k in gq:
        torch.testing.assert_close(gq[k], gr[k], atol=1e-5, rtol=1e-4)
    pq.eval()
    with torch.no_grad():
        unmerged = pq(x).logits
        pq.merge_adapter()
        torch.testing.assert_close(pq(x).logits, unmerged, atol=1e-5, rtol=1e-5)
        pq.unmerge_adapter()
        assert torch.equal(pq(x).logits, unmerged) and len(list(quantized_linears(pq))) == 14
    merged = pq.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,kw", [("full", {}), ("layerwise", {"last_n": 1}), ("sparse", {}),
                                       ("heads", {"heads": [0]}), ("singular", {}), ("loha", {}), ("lokr", {}),
                                       ("vera", {"r": 4}), ("oft", {})])
def test_methods_that_cannot_work_refuse_before_changing_anything(llama_dir, method, kw):
    q = load(llama_dir)
    before = [type(m) for m in q.modules()]
    with pytest.raises(QuantizationError, match=f"{method} cannot train on a quantized base: .+; use lora"):
        get_peft_model(q, make_config(method, **kw))
    assert [type(m) for m in q.modules()] == before and not any(p.requires_grad for p in q.parameters() if not p.is_floating_point())


def test_pissa_init_refuses_on_a_quantized_base(llama_dir):
    with pytest.raises(QuantizationError, match="pissa"):
        get_peft_model(load(llama_dir), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_mixed_batch_rows_match_single_adapters(llama_dir):
    pm = _lora(load(llama_dir), target_modules=["q_proj", "v_proj"])
    torch.manual_seed(5)
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.eval()
    x = batch(b=3)
    with torch.no_grad():
        mixed = pm(x, adapter_names=["default", "other", "__base__"]).logits
        singles = []
        for i, name in enumerate(["default", "other"]):
            pm.set_adapter(name)
            singles.append(pm(x[i:i + 1]).logits)
        with pm.disable_adapter():
            singles.append(pm(x[2:3]).logits)
    torch.testing.assert_close(mixed, torch.cat(singles), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_on_the_quantized_base(llama_dir, tmp_path):
    pm = _lora(load(llama_dir))
    pm.eval()
    x = batch()
    with torch.no_grad():
        ref = pm(x).logits
    pm.save_pretrained(tmp_path)
    back = slimtune.PeftModel.from_pretrained(load(llama_dir), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref, atol=0, rtol=0)


def test_prepare_model_for_kbit_training_keeps_peft_meaning(llama_dir):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16, quantization_config=__import__(
            "conftest_qlora").bnb("nf4", compute=torch.bfloat16))
    assert q.model.norm.weight.dtype == torch.bfloat16
    out = slimtune.prepare_model_for_kbit_training(q)
    assert out is q and not any(p.requires_grad for p in q.parameters())
    assert q.model.norm.weight.dtype == torch.float32 and q.model.embed_tokens.weight.dtype == torch.float32
    assert all(kind(m) == "4bit" and not m.support_avx512bf16_for_cpu for _, m in quantized_linears(q))
    assert is_activation_checkpointing(q)  # PEFT's default: use_gradient_checkpointing=True
    with torch.no_grad():
        assert q.get_input_embeddings()(batch()).requires_grad  # enable_input_require_grads (reentrant)
    plain = load(llama_dir, None).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="no quantized layers.*upcast the whole base"):
        slimtune.prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False)


def test_trainable_parameter_count_counts_unpacked_4bit_weights(llama_dir):
    dense = sum(p.numel() for p in load(llama_dir, None).parameters())
    pm = _lora(load(llama_dir))
    trainable, total = pm.get_nb_trainable_parameters()
    assert total == dense + trainable


def test_missing_or_unsupported_bitsandbytes_is_one_clear_error(monkeypatch):
    import sys

    from slimtune.quant import bnb_config, require_bitsandbytes

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(QuantizationError, match=r"needs the bitsandbytes package.*pip install 'slimtune\[quant\]'"):
        bnb_config("nf4")
    monkeypatch.undo()
    import bitsandbytes.cextension as ce

    monkeypatch.setattr(ce, "lib", ce.ErrorHandlerMockBNBNativeLibrary("libbitsandbytes_cpu.so: cannot open"))
    with pytest.raises(QuantizationError, match="no native library for this platform.*install a build"):
        require_bitsandbytes("quantize: nf4")
    with pytest.raises(QuantizationError, match="use one of nf4, fp4, int8"):
        bnb_config("nf3")


@pytest.mark.parametrize("method,kw", [("bitfit", {}), ("bottleneck", {}), ("prefix", {"num_virtual_tokens": 4}),
                                       ("prompt", {"num_virtual_tokens": 4}), ("p_tuning", {"num_virtual_tokens": 4})])
def test_methods_beside_the_weights_train_on_a_quantized_base(tmp_path, method, kw):
    """Methods that leave the linear weights alone (biases, added modules, virtual tokens) take a
    quantized base as it is: loss and gradients equal the dense twin's, through bitsandbytes' backward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                 mlp_bias=True)).save_pretrained(tmp_path)  # biases, for BitFit
    q = load(tmp_path)
    ref = dense_twin(tmp_path, q)
    torch.manual_seed(1)
    pq = get_peft_model(q, make_config(method, **kw))
    torch.manual_seed(1)
    pr = get_peft_model(ref, make_config(method, **kw))
    x = batch()
    pq.train(), pr.train()
    lq, lr = pq(input_ids=x, labels=x).loss, pr(input_ids=x, labels=x).loss
    torch.testing.assert_close(lq, lr, atol=1e-5, rtol=1e-5)
    lq.backward()
    lr.backward()
    gq, gr = grads(pq), grads(pr)
    assert gq.keys() == gr.keys() and gq
    for k in gq:
        torch.testing.assert_close(gq[k], gr[k], atol=1e-5, rtol=1e-4)
    assert len(list(quantized_linears(pq))) == 14


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_run.sh runs it)")
def test_qlora_on_cuda_matches_the_dense_twin(llama_dir):
    """The same checks on a GPU: bitsandbytes' CUDA kernels under the fused node, bf16 compute."""
    from transformers import AutoModelForCausalLM

    from conftest_qlora import bnb

    q = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=bnb("nf4", compute=torch.bfloat16),
                                             device_map={"": 0})
    ref = dense_twin(llama_dir, q).cuda()
    for name, m in quantized_linears(q):  # the twin multiplies by the bf16 weight the kernel uses
        ref.get_submodule(name).weight.data = dequantize(m, torch.bfloat16).float()
    pq, pr = _lora(q), _lora(ref)
    x = batch().cuda()
    pq.train(), pr.train()
    lq, lr = pq(x, labels=x).loss, pr(x, labels=x).loss
    torch.testing.assert_close(lq, lr, atol=2e-2, rtol=2e-2)
    lq.backward()
    lr.backward()
    gq, gr = grads(pq), grads(pr)
    for k in gq:
        torch.testing.assert_close(gq[k], gr[k], atol=5e-3, rtol=5e-2, msg=k)
    deq = {n: dequantize(m, torch.bfloat16) for n, m in quantized_linears(q)}
    deltas = {n.replace("base_model.model.", ""): layer.get_delta_weight("default").to(torch.bfloat16)
              for n, layer in pq.named_modules() if isinstance(layer, QuantLinear)}
    merged = pq.merge_and_unload()
    assert not list(quantized_linears(merged))
    for n, w in deq.items():
        assert torch.equal(merged.get_submodule(n).weight, w + deltas[n]), n


def test_merge_and_requantize_int8(llama_dir, capsys):
    from slimtune.quant import merge_and_requantize

    pm = _lora(load(llama_dir, "int8"), target_modules=["q_proj", "down_proj"])
    x = batch()
    model, cost = merge_and_requantize(pm, x)
    assert "re-quantizing 4 merged linears (int8) costs" in capsys.readouterr().out
    layers = dict(quantized_linears(model))
    assert len(layers) == 14 and all(kind(m) == "8bit" for m in layers.values())
    assert layers["model.layers.0.mlp.down_proj"].weight.dtype == torch.int8
    assert cost.max_abs > 0 and torch.isfinite(model(x).logits).all()
