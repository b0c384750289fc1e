"""slimtune's preference objectives against TRL's own code, on a tiny random-init Llama in fp32 and
the same batches: per-step losses, chosen / rejected rewards and log-probs equal to 1e-4 (issue 24).

DPO / IPO / KTO run TRL's real trainers (DPOTrainer, KTOTrainer with a peft LoRA model) for several
steps beside slimtune's objective with the same LoRA start, optimizer and batch; ORPO and SimPO
compare with TRL's ORPO / CPO loss functions on the same logits; GRPO with TRL's advantage and
loss code given the same completions and rewards.
"""
import os
import random
import tempfile
import warnings

import peft
import pytest
import torch
from conftest import VOCAB

import slimtune
from slimtune.train.config import JobConfig
from slimtune.train.objectives import OBJECTIVES
from slimtune.train.objectives.data import Encoder, encode_pairs, encode_unpaired

trl = pytest.importorskip("trl")

WORDS = [f"w{i}" for i in range(VOCAB - 3)]
STEPS = 3
LR = 5e-3


def tokenizer():
    """A word-level tokenizer built offline (no hub), sized to the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg)


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS[:30]) for _ in range(rng.randint(lo, hi)))


def pair_rows(n: int = 4, seed: int = 0):
    rng = random.Random(seed)
    return [{"prompt": words(rng, 2, 5), "chosen": " " + words(rng, 1, 4), "rejected": " " + words(rng, 1, 4)}
            for _ in range(n)]


def job_cfg(tmp, **train):
    return JobConfig.model_validate({"model": "x", "data": {"train": "x.jsonl", "max_length": 48, "chat_template": False},
                                     "train": {"precision": "fp32", **train}, "output_dir": str(tmp)})


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def randomize(model, seed: int = 1) -> None:
    """LoRA B (and A) random and small, so the policy differs from its reference at step 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def trl_trainer(cls, args, rows, tok, tmp, resumed: bool):
    """TRL's trainer on a peft LoRA model, and slimtune's model with the same adapter weights.

    resumed=False: TRL builds a fresh adapter from peft_config (its reference = adapters disabled);
    resumed=True: TRL gets a PeftModel with a trained adapter (its reference = a frozen copy of it)."""
    from datasets import Dataset

    if resumed:
        torch.manual_seed(1)
        pm = peft.get_peft_model(llama(), peft.LoraConfig(**LORA))
        randomize(pm)
        kw = dict(model=pm)
    else:
        kw = dict(model=llama(), peft_config=peft.LoraConfig(**LORA))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = cls(args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, **kw)
    if not resumed:
        randomize(tr.model)
    tr.model.save_pretrained(tmp, selected_adapters=["default"])
    sm = slimtune.PeftModel.from_pretrained(llama(), tmp, is_trainable=True)
    return tr, sm


def train_trl(tr):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    out = [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(out) == STEPS
    return out


def steps(obj, model, batch, n=STEPS):
    """slimtune's side: the objective's loss, AdamW as HF Trainer's (lr constant, clip 1.0), n steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    obj.ref_model = model
    out = []
    model.train()
    for _ in range(n):
        loss, st = obj.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        out.append({"loss": float(loss.detach()), **{k: float(v.float().mean()) for k, v in st.items() if v.numel()}})
    return out


def trl_args(cls, tmp, n_rows, **kw):
    base = dict(output_dir=str(tmp), max_steps=STEPS, per_device_train_batch_size=n_rows, learning_rate=LR,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                report_to=[], use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                save_strategy="no", optim="adamw_torch")
    return cls(**{**base, **kw})


def close(ours, theirs, keys):
    for s, (a, b) in enumerate(zip(ours, theirs)):
        for ko, kt in keys:
            assert abs(a[ko] - b[kt]) < 1e-4, f"step {s + 1}: {ko} {a[ko]:.6f} vs TRL {kt} {b[kt]:.6f}"


@pytest.mark.parametrize("objective,loss_type,resumed,sft", [("dpo", "sigmoid", False, 0.0), ("ipo", "ipo", False, 0.0),
                                                             ("dpo", "sigmoid", True, 0.0), ("dpo", "sigmoid", False, 0.7)])
def test_dpo_ipo_equal_trl_dpo_trainer(tmp_path, objective, loss_type, resumed, sft):
    """DPO / IPO against DPOTrainer; resumed: a trained adapter is its own reference (precompute_ref);
    sft: train.sft_weight = TRL's loss_type [sigmoid, sft] with loss_weights [1, sft] (RPO)."""
    tok = tokenizer()
    rows = pair_rows(4)
    kw = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, sft]) if sft else dict(loss_type=[loss_type])
    args = trl_args(trl.DPOConfig, tmp_path / "trl", len(rows), beta=0.1, max_length=None, **kw)
    tr, sm = trl_trainer(trl.DPOTrainer, args, rows, tok, tmp_path / "adapter", resumed)
    cfg = job_cfg(tmp_path, objective=objective, beta=0.1, precompute_ref=resumed, sft_weight=sft)
    ex = encode_pairs(rows, Encoder(cfg, tok), "rows")
    prep = tr.train_dataset  # the same tokens TRL trains on (its dataset after _prepare_dataset)
    for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert [e[k] for e in ex] == prep[k]
    theirs = train_trl(tr)
    obj = OBJECTIVES[objective](cfg.train)
    assert obj.use_shared_prompt(sm)[0]  # the job's layout: one row per pair, the prompt once (shared.py)
    if resumed:
        obj.precompute(sm, ex, tok.pad_token_id, 8, torch.device("cpu"))
    ours = steps(obj, sm, obj.collate(ex, tok.pad_token_id))
    close(ours, theirs, [("loss", "loss"), ("rewards_chosen", "rewards/chosen"),
                         ("rewards_rejected", "rewards/rejected"), ("reward_margin", "rewards/margins"),
                         ("reward_accuracy", "rewards/accuracies"), ("logps_chosen", "logps/chosen"),
                         ("logps_rejected", "logps/rejected")])
    assert ours[0]["rewards_chosen"] != 0.0 or resumed  # step 1 already measures a policy unlike its reference
    assert ours[-1]["loss"] < ours[0]["loss"]  # and it learns


@pytest.mark.parametrize("one_row", [False, True])
def test_kto_equals_trl_kto_trainer(tmp_path, one_row):
    """KTO against KTOTrainer: loss, the KL estimate from rotated completions, rewards and log-probs;
    one_row: the job's layout (shared.py: the prompt once, completion and KL completion beside it)."""
    tok = tokenizer()
    rng = random.Random(3)
    rows = [{"prompt": words(rng, 2, 5), "completion": " " + words(rng, 1, 4), "label": i % 3 != 0} for i in range(6)]
    args = trl_args(trl.KTOConfig, tmp_path / "trl", len(rows), beta=0.1, max_length=None, desirable_weight=1.0,
                    undesirable_weight=1.5)
    tr, sm = trl_trainer(trl.KTOTrainer, args, rows, tok, tmp_path / "adapter", resumed=False)
    cfg = job_cfg(tmp_path, objective="kto", beta=0.1, undesirable_weight=1.5)
    ex = encode_unpaired(rows, Encoder(cfg, tok), "rows")
    prep = tr.train_dataset
    for k in ("prompt_ids", "completion_ids"):
        assert [e[k] for e in ex] == prep[k]
    theirs = train_trl(tr)
    obj = OBJECTIVES["kto"](cfg.train)
    if one_row:
        assert obj.use_shared_prompt(sm)[0]
    batch = obj.collate(ex, tok.pad_token_id)
    assert ("pair_mask" in batch) == one_row
    ours = steps(obj, sm, batch)  # rows in TRL's (sequential) order
    close(ours, theirs, [("loss", "loss"), ("kl", "kl"), ("rewards_chosen", "rewards/chosen"),
                         ("rewards_rejected", "rewards/rejected"), ("logps_chosen", "logps/chosen"),
                         ("logps_rejected", "logps/rejected")])
    assert ours[-1]["loss"] < ours[0]["loss"]


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_simpo_equal_trl_losses(tmp_path, objective):
    """ORPO / SimPO against TRL's ORPOTrainer.odds_ratio_loss and CPOTrainer.cpo_loss (loss_type simpo),
    with TRL's get_batch_logps, on the logits of the same model at each of several training steps."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    tok = tokenizer()
    rows = pair_rows(4, seed=5)
    torch.manual_seed(1)
    model = slimtune.get_peft_model(llama(), slimtune.LoraConfig(**LORA))
    randomize(model)
    cfg = job_cfg(tmp_path, objective=objective, beta=0.2 if objective == "orpo" else 2.0, simpo_gamma=0.5,
                  label_smoothing=0.1 if objective == "simpo" else 0.0)
    ex = encode_pairs(rows, Encoder(cfg, tok), "rows")
    obj = OBJECTIVES[objective](cfg.train)
    padded = obj.collate(ex, tok.pad_token_id)  # TRL's layout: [prompt + chosen; prompt + rejected]
    assert obj.use_shared_prompt(model)[0]
    batch = obj.collate(ex, tok.pad_token_id)  # ours: one row per pair (shared.py)
    assert "pair_mask" in batch and "pair_mask" not in padded
    labels = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, -100)
    me = SimpleNamespace(beta=obj.beta, accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0,
                         loss_type="simpo", simpo_gamma=cfg.train.simpo_gamma, label_smoothing=cfg.train.label_smoothing)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    for step in range(STEPS):
        loss, st = obj.loss(model, batch)
        with torch.no_grad():
            logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            lp = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
            c, r = lp.chunk(2)
            if objective == "orpo":
                losses, cr, rr, ratio, _ = ORPOTrainer.odds_ratio_loss(me, c, r)
                c_tok = (labels[:4, 1:] != -100)
                nll = torch.nn.functional.cross_entropy(logits[:4, :-1].reshape(-1, VOCAB), labels[:4, 1:].reshape(-1))
                want = nll - losses.mean()
                assert abs(float(ratio) - float(st["log_odds"].detach().sigmoid().log().mean())) < 1e-4
                assert c_tok.any()
            else:
                losses, cr, rr = CPOTrainer.cpo_loss(me, c, r)
                want = losses.mean()
        assert abs(float(loss) - float(want)) < 1e-4, f"step {step + 1}: {float(loss)} vs TRL {float(want)}"
        for ours_k, t in (("rewards_chosen", cr), ("rewards_rejected", rr), ("logps_chosen", c), ("logps_rejected", r)):
            assert torch.allclose(st[ours_k], t, atol=1e-4), (step, ours_k)
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_advantages_and_loss_equal_trl(tmp_path, beta):
    """GRPO given the same completions and rewards: TRL GRPOTrainer's advantages (its own
    _generate_and_score_completions, generation replaced by fixed completions) and its loss
    (_compute_loss, KL to the adapter-off reference when beta > 0) against slimtune's."""
    from datasets import Dataset

    from slimtune.train.objectives.base import completion_logps, reference
    from slimtune.train.objectives.grpo import group_advantages, policy_loss

    tok = tokenizer()
    G = 4
    rng = random.Random(7)
    prompts = [words(rng, 2, 5) for _ in range(2)]
    comps = [[tok.convert_tokens_to_ids(rng.choice(WORDS[:30])) for _ in range(rng.randint(1, 5))] + [1]
             for _ in range(2 * G)]
    comps[3] = comps[3][:-1]  # one completion cut at the length limit (no EOS)
    rewards = [float(rng.randint(0, 3)) for _ in range(2 * G)]
    rewards[G:] = [1.0, 1.0, 1.0, 2.0]

    def reward(completions, **kw):  # the fixed reward of each fixed completion, by position
        return [rewards[comps_text.index(c)] for c in completions]

    comps_text = [f"c{i}" for i in range(2 * G)]
    args = trl_args(trl.GRPOConfig, tmp_path / "trl", 2 * G, beta=beta, num_generations=G, max_completion_length=8,
                    loss_type="dapo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = trl.GRPOTrainer(model=llama(), reward_funcs=reward, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                             peft_config=peft.LoraConfig(**LORA))
    randomize(tr.model)
    tr.model.save_pretrained(tmp_path / "adapter", selected_adapters=["default"])
    sm = slimtune.PeftModel.from_pretrained(llama(), tmp_path / "adapter", is_trainable=True)
    p_ids = [tok(p)["input_ids"] for p in prompts]
    tr._generate = lambda ps: ([p_ids[i // G] for i in range(2 * G)], comps, None, comps_text, None, {}, None, None)
    inputs = [{"prompt": p} for p in prompts for _ in range(G)]
    tr.model.train()
    out = tr._generate_and_score_completions(inputs)
    ours_adv = group_advantages(torch.tensor(rewards), G)
    assert torch.allclose(ours_adv, out["advantages"], atol=1e-5)
    tr.current_gradient_accumulation_steps = 1  # set by Trainer.train; one micro-batch here
    want = tr._compute_loss(tr.model, out)

    C = out["completion_ids"].shape[1]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    full = torch.cat([torch.zeros_like(out["prompt_mask"]), out["completion_mask"]], 1)
    sm.train()
    logps = completion_logps(sm, ids, att, full)[:, -C:]
    ref = None
    if beta:
        with reference(sm):
            ref = completion_logps(sm, ids, att, full)[:, -C:]
        assert torch.allclose(ref, out["ref_per_token_logps"] * out["completion_mask"], atol=1e-5)
    loss, kl = policy_loss(logps, logps.detach(), ours_adv, out["completion_mask"], beta, ref)
    assert abs(float(loss) - float(want)) < 1e-4, (float(loss), float(want))
    # the fast layout (a prompt and its group in one row, shared.group_collate) gives TRL's loss too
    from slimtune.train.objectives import shared

    fast = shared.group_collate(p_ids, out["completion_ids"], out["completion_mask"], G, tok.pad_token_id)
    f_logps = shared.group_logps(sm, fast, out["completion_ids"].shape)
    f_ref = None
    if beta:
        with reference(sm):
            f_ref = shared.group_logps(sm, fast, out["completion_ids"].shape)
    f_loss, _ = policy_loss(f_logps, f_logps.detach(), ours_adv, out["completion_mask"], beta, f_ref)
    assert abs(float(f_loss) - float(want)) < 1e-4, (float(f_loss), float(want))
    loss.backward()  # and it trains: the gradient reaches the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sm.parameters() if p.requires_grad)


def test_completion_logps_runs_the_head_only_where_completions_are():
    """logits_to_keep at completion positions gives the log-probs of the full log-softmax, and a
    prompt-learning model (virtual positions in front) takes the whole-output path to the same."""
    from slimtune.train.objectives.base import completion_logps

    torch.manual_seed(0)
    model = llama().eval()
    ids = torch.randint(3, VOCAB, (3, 9))
    att = torch.ones_like(ids)
    att[2, 7:] = 0
    comp = torch.zeros_like(ids)
    comp[0, 5:] = 1
    comp[1, 3:6] = 1
    comp[2, 6:7] = 1
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
        want = full.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * comp[:, 1:]
        assert torch.allclose(completion_logps(model, ids, att, comp), want, atol=1e-5)
        pm = slimtune.get_peft_model(llama(), slimtune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
        got = completion_logps(pm, ids, att, comp)
        logits = pm(input_ids=ids, attention_mask=att).logits[:, -9:-1].float()
        want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * comp[:, 1:]
        assert torch.allclose(got, want, atol=1e-5)
