"""(IA)³: PEFT-compatible scaling vectors; checked against the real `peft` package both ways."""
import pytest
import torch
from conftest import logits, tiny_bert_cls, tiny_gpt2, tiny_llama
from properties import check_merge_and_round_trip, train_lm_steps

from slimtune import ConfigError, PeftModel, get_peft_model, make_config
from slimtune.inject import adapter_layers
from slimtune.methods.ia3 import IA3Config, IA3Linear

CASES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, {}), "bert": (tiny_bert_cls, {"task_type": "SEQ_CLS"})}


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif "classifier" in n and p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_defaults_and_count():
    cfg = make_config("ia3")
    assert isinstance(cfg, IA3Config)
    pm = get_peft_model(tiny_llama(), cfg)
    assert cfg.target_modules == ["k_proj", "v_proj", "down_proj"] and cfg.feedforward_modules == ["down_proj"]
    m = pm.base_model.model.config
    kv = m.num_key_value_heads * (m.hidden_size // m.num_attention_heads)
    assert pm.get_nb_trainable_parameters()[0] == m.num_hidden_layers * (2 * kv + m.intermediate_size)
    shapes = {n.split(".")[-1]: tuple(l.ia3_l["default"].shape) for n, l in adapter_layers(pm)}
    assert shapes == {"k_proj": (kv, 1), "v_proj": (kv, 1), "down_proj": (1, m.intermediate_size)}
    with pytest.raises(ConfigError, match="feedforward_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


@pytest.mark.parametrize("case", CASES)
def test_init_identity_merge_and_roundtrip(case, ids, tmp_path):
    make, kw = CASES[case]
    pm = get_peft_model(make(), IA3Config(**kw))
    with torch.no_grad():
        torch.testing.assert_close(logits(pm, ids), logits(make(), ids))
    randomize(pm)
    check_merge_and_round_trip(pm, make, ids, tmp_path)

def test_training_changes_only_vectors_and_lowers_loss(ids):
    pm = get_peft_model(tiny_llama(), IA3Config())
    losses, changed = train_lm_steps(pm, ids, lr=5e-2)
    assert losses[-1] < losses[0]
    assert changed == {k for k, _ in pm.named_parameters() if ".ia3_l." in k}


# ---- compatibility with HF PEFT, both directions ---------------------------------------------
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_loads_in_slimtune(case, ids, tmp_path):
    make, kw = CASES[case]
    pp = peft.get_peft_model(make(), peft.IA3Config(**kw))
    randomize(pp)
    with torch.no_grad():
        ref = logits(pp, ids)
    pp.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    assert all(isinstance(l, IA3Linear) for _, l in adapter_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_slimtune_saved_loads_in_peft(case, ids, tmp_path):
    make, kw = CASES[case]
    pm = get_peft_model(make(), IA3Config(**kw))
    randomize(pm, seed=3)
    with torch.no_grad():
        ref = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, ids), ref, atol=1e-6, rtol=1e-6)


# ---- convolutions (PEFT's IA³ Conv layout: ia3_l is (1, C, 1, ...)) -------------------------------
class _GroupedCNN(torch.nn.Module):
    """Conv2d (groups=1), a grouped Conv2d as feed-forward, Conv1d, then a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv1d = torch.nn.Conv1d(8, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 16, 3)

    def forward(self, x):  # (B, 1, 4, 4)
        h = torch.relu(self.grouped(torch.relu(self.conv(x))))  # (B, 8, 4, 4)
        return self.head(torch.relu(self.conv1d(h.flatten(2))).flatten(1))


CONV_KW = dict(target_modules=["conv", "grouped", "conv1d"], feedforward_modules=["grouped", "conv1d"])


def test_conv_shapes_merge_and_round_trip(images, tmp_path):
    from slimtune.methods.ia3 import IA3Conv

    pm = get_peft_model(_GroupedCNN(), IA3Config(**CONV_KW))
    shapes = {n: tuple(l.ia3_l["default"].shape) for n, l in adapter_layers(pm) if isinstance(l, IA3Conv)}
    assert shapes == {"base_model.model.conv": (1, 8, 1, 1), "base_model.model.grouped": (1, 8, 1, 1),
                      "base_model.model.conv1d": (1, 8, 1)}
    randomize(pm)
    check_merge_and_round_trip(pm, _GroupedCNN, images, tmp_path)


def test_conv_trains_only_the_vectors(images):
    pm = get_peft_model(_GroupedCNN(), IA3Config(**CONV_KW, modules_to_save=["head"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    before = {k: p.detach().clone() for k, p in pm.named_parameters()}
    losses = []
    for _ in range(6):
        loss = (pm(images) - 1).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    changed = {k for k, p in pm.named_parameters() if not torch.equal(p, before[k])}
    assert losses[-1] < losses[0]
    assert changed and all("ia3_l" in k or ".head." in k for k in changed)


@pytest.mark.parametrize("direction", ["peft_to_slimtune", "slimtune_to_peft"])
def test_conv_files_move_between_libraries(images, tmp_path, direction):
    kw = dict(target_modules=["conv", "grouped"], feedforward_modules=["grouped"])  # PEFT's IA³: Conv2d/3d only
    if direction == "peft_to_slimtune":
        src = peft.get_peft_model(_GroupedCNN(), peft.IA3Config(**kw))
    else:
        src = get_peft_model(_GroupedCNN(), IA3Config(**kw))
    randomize(src, seed=5)
    with torch.no_grad():
        ref = src(images)
    src.save_pretrained(tmp_path)
    load = PeftModel.from_pretrained if direction == "peft_to_slimtune" else peft.PeftModel.from_pretrained
    dst = load(_GroupedCNN(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(dst(images), ref, atol=1e-6, rtol=1e-6)
