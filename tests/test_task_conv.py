"""Conv LoRA on a Conv*d subclass with its own constructor and forward: EfficientNet's
Conv2dStaticSamePadding (TensorFlow 'SAME' padding applied in forward). A and B are built from the
torch base class; A computes through the subclass's forward, so the unmerged output equals the
merged layer's (which pads as the base does), a train step reaches A and B, and a saved adapter
reloads to the same outputs."""
import torch
import torch.nn as nn
from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

from slimtune import LoraConfig, PeftModel, get_peft_model


def _net():
    torch.manual_seed(0)
    return nn.Sequential(Conv2dStaticSamePadding(3, 8, 3, stride=2, image_size=9, bias=True), nn.ReLU(),
                         Conv2dStaticSamePadding(8, 4, 1, image_size=5, bias=False))


def test_lora_on_a_padding_subclass_equals_its_merge():
    x = torch.randn(2, 3, 9, 9)
    pm = get_peft_model(_net(), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    layer = pm.base_model.model[0]
    assert type(layer.lora_A["default"]) is nn.Conv2d and layer.own_forward  # built from the torch class
    out = pm(x)
    assert out.shape == (2, 4, 5, 5)  # 'SAME' padding kept: 9 -> ceil(9 / 2) = 5
    assert torch.allclose(pm.merge_and_unload()(x), out, atol=1e-6)


def test_train_step_and_reload(tmp_path):
    x = torch.randn(4, 3, 9, 9)
    pm = get_peft_model(_net(), LoraConfig(r=2, target_modules=["0", "2"]))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    before = pm(x).detach()
    pm(x).square().mean().backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    opt.step()
    after = pm(x).detach()
    assert not torch.allclose(after, before)
    pm.save_pretrained(tmp_path / "a")
    again = PeftModel.from_pretrained(_net(), tmp_path / "a")
    assert torch.allclose(again(x), after, atol=1e-6)


def test_grouped_subclass_is_refused():
    import pytest

    net = nn.Sequential(Conv2dStaticSamePadding(4, 4, 3, image_size=6, groups=4, bias=False))
    with pytest.raises(ValueError, match="grouped Conv2dStaticSamePadding"):
        get_peft_model(net, LoraConfig(r=4, target_modules=["0"]))


def test_efficientnet_lite0_adapter_reloads_to_the_trained_outputs(tmp_path):
    """The packaged EfficientNet-Lite0 with the job's own method choice (conv LoRA on the 1x1 convs,
    the new head in full): BatchNorm stays in eval mode while training, so its statistics do not
    move and the saved adapter alone reproduces the trained model's outputs."""
    from slimtune.train.config import JobConfig
    from slimtune.train.job import auto_method
    from slimtune.train.tasks.cnn import efficientnet_lite0

    torch.manual_seed(0)
    model = efficientnet_lite0(num_classes=3)
    cfg = JobConfig.model_validate({"model": "efficientnet-lite0", "method": "lora", "data": {"builtin": "textile_defects"}})
    ac, why = auto_method(cfg, model, "image_classification")
    assert ac.target_modules == ["_expand_conv", "_project_conv", "_conv_head"] and ac.modules_to_save == ["_fc"]
    pm = get_peft_model(model, ac)
    bn = next(m for m in pm.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    assert not bn.training  # BN frozen in eval mode (train/tasks/cnn.py)
    for _ in range(2):
        opt.zero_grad()
        pm(pixel_values=x, labels=y)["loss"].backward()
        opt.step()
    assert torch.equal(bn.running_mean, stats)
    pm.eval()
    with torch.no_grad():
        trained = pm(pixel_values=x)["logits"]
    pm.save_pretrained(tmp_path / "a")
    torch.manual_seed(1)  # another random head: the saved one must replace it
    again = PeftModel.from_pretrained(efficientnet_lite0(num_classes=3), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.allclose(again(pixel_values=x)["logits"], trained, atol=1e-5)
