"""The core on a CUDA device in bf16 and fp32: the fused path's gradients, merge, mixed batches,
save/load. Skipped where there is no GPU (CI); run on a lent GPU with `pytest tests/test_gpu.py`."""
import pytest
import torch
from conftest import randomize_lora, tiny_llama

from slimtune import BASE_ADAPTER, LoraConfig, PeftModel, get_peft_model
from slimtune.inject import adapter_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def cuda_model(dtype):
    return tiny_llama().to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_gradients_equal_reference(dtype, dropout):
    from slimtune.kernels.lora import lora_reference
    from slimtune.methods import lora_blocks, lora_layers

    ids = torch.randint(0, 128, (2, 16), device="cuda")
    pm = get_peft_model(cuda_model(dtype), LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear"))
    randomize_lora(pm)
    assert all(p.dtype == dtype for p in pm.parameters() if p.requires_grad)  # no fp32 upcast
    pm.train()
    grads = []
    for fn in (None, lora_reference):
        orig = lora_layers.lora_linear
        if fn is not None:  # reference: every projection through plain ops, no fused SwiGLU block
            lora_layers.lora_linear, lora_blocks.FUSE_SWIGLU = fn, False
        try:
            torch.manual_seed(0)
            pm(input_ids=ids, labels=ids).loss.backward()
        finally:
            lora_layers.lora_linear, lora_blocks.FUSE_SWIGLU = orig, True
        grads.append({n: p.grad.float().clone() for n, p in pm.named_parameters() if p.requires_grad})
        pm.zero_grad()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_mixed_batch_and_round_trip(dtype, tmp_path):
    ids = torch.randint(0, 128, (3, 16), device="cuda")
    pm = get_peft_model(cuda_model(dtype), LoraConfig(r=4, target_modules="all-linear"))
    pm.add_adapter("b", LoraConfig(r=2, target_modules="all-linear"))
    randomize_lora(pm)
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits.float()
        mixed = pm(input_ids=ids, adapter_names=["default", "b", BASE_ADAPTER]).logits.float()
        torch.testing.assert_close(mixed[:1], ref[:1], **TOL[dtype])
        pm.merge_adapter()
        torch.testing.assert_close(pm(input_ids=ids).logits.float(), ref, **TOL[dtype])
        pm.unmerge_adapter()
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(cuda_model(dtype), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits.float(), ref, atol=0, rtol=0)
    layer = next(l for _, l in adapter_layers(loaded))
    assert layer.lora_A["default"].weight.device.type == "cuda"


def test_autocast_bf16_training_step():
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    pm = get_peft_model(cuda_model(torch.float32), LoraConfig(r=4, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
