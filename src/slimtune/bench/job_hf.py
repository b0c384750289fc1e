"""The anchor of the job benchmark: a hand-written HF `Trainer` + `peft` script doing the job's work.

    python -m slimtune.bench.job_hf [CONFIG] [key=value ...] --out DIR [--bf16] [--threads N]

It is what a user would write to do what `slimtune train CONFIG` does, with the same settings read
from the job's config so that the two runs do the same work:

- the same model folder, loaded in fp32 (`--bf16` = `TrainingArguments(bf16=True)`, autocast over
  the fp32 model, as users turn it on);
- the same tokenized examples (slimtune's data preparation, so the comparison is about training
  and evaluation, not tokenizers), padded per batch by `DataCollatorForSeq2Seq`;
- the same data order (a sampler giving the job's seeded permutation per epoch), checked batch by
  batch: every training batch's rows are digested into `batches.json` (the driver compares them
  with the job's);
- the same LoRA (`peft.LoraConfig`: the job's chosen r, alpha, targets and layers, no dropout),
  AdamW (fused, the job's lr and weight decay), warm-up + cosine schedule (the job's formula),
  gradient clipping, seed, threads;
- the same held-out evaluation, before training and at the job's eval steps: the Trainer's own
  `evaluate()` for the loss (its eval batch size = the job's), token-weighted like the job's
  eval_loss, and for short-answer tasks generated-answer accuracy with `model.generate` (greedy,
  left-padded batches), matched by the job's rule; the adapter saved at the end.

Instrumentation only records (digests, step times); it adds no work the job does not also do.
Writes DIR/result.json: wall and step times, the held-out metrics at each eval, peak RSS.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import sys
import time

T_START = time.time()


def row_digest(ids, labels) -> str:
    """One example as the batch holds it (pads removed): its token ids and its targets (the labels
    after the first token; the first one predicts nothing, and padding-free batches mark it -100)."""
    h = hashlib.sha1()
    h.update(",".join(map(str, ids)).encode())
    h.update(b"|")
    h.update(",".join(map(str, labels[1:])).encode())
    return h.hexdigest()[:16]


def padded_rows(batch) -> list[str]:
    """Digests of the rows of a right-padded batch (attention_mask marks the tokens)."""
    out = []
    for ids, mask, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        keep = mask.bool()
        out.append(row_digest(ids[keep].tolist(), lab[keep].tolist()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slimtune.bench.job_hf")
    ap.add_argument("config", nargs="?")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.config and "=" in a.config and not os.path.exists(a.config):  # overrides only (the default job)
        a.overrides.insert(0, a.config)
        a.config = None

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import peft
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from slimtune.train import models
    from slimtune.train.checks import plan
    from slimtune.train.config import load_config
    from slimtune.train.data import prepare
    from slimtune.train.job import auto_method
    from slimtune.train.metrics import answer_matches

    hf_logging.set_verbosity_error()
    cfg = load_config(a.config, list(a.overrides))
    t, ev = cfg.train, cfg.eval
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(t.seed)
    path = str(models.resolve(cfg.model, lambda *_: None))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = prepare(cfg.data, tok, "auto", t.seed, lambda *_: None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sc, _ = auto_method(cfg, model, "causal_lm")  # the job's LoRA choice, given to peft
    lcfg = peft.LoraConfig(r=sc.r, lora_alpha=sc.lora_alpha, target_modules=list(sc.target_modules),
                           layers_to_transform=sc.layers_to_transform, lora_dropout=0.0, bias="none",
                           task_type="CAUSAL_LM")
    torch.manual_seed(t.seed)
    model = peft.get_peft_model(model, lcfg)

    sched_plan = plan(t, len(data.train))
    total, warm = sched_plan.total_steps, sched_plan.warmup

    def lr_lambda(s: int) -> float:  # the job's schedule (trainer._lr_lambda)
        if s < warm:
            return (s + 1) / (warm + 1)
        if t.scheduler == "constant":
            return 1.0
        frac = min((s - warm) / max(1, total - warm), 1.0)
        return 0.5 * (1 + math.cos(math.pi * frac)) if t.scheduler == "cosine" else 1 - frac

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=t.lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    class JobOrder(torch.utils.data.Sampler):
        """The job's data order: a seeded permutation per epoch (trainer._batch)."""

        def __init__(self, n):
            self.n, self.epoch = n, 0

        def set_epoch(self, e):
            self.epoch = e

        def __len__(self):
            return self.n

        def __iter__(self):
            g = torch.Generator().manual_seed(t.seed * 1000 + self.epoch)
            self.epoch += 1  # set_epoch, when the Trainer calls it, sets the same number
            return iter(torch.randperm(self.n, generator=g).tolist())

    batches: list[list[str]] = []
    step_s: list[float] = []
    tok_sum = [0.0, 0]

    class Script(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return JobOrder(len(self.train_dataset))

        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append(padded_rows(inputs))  # instrumentation: what this step trains on
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:  # token-weighted eval loss from the same pass (the job's definition)
                loss = out[0] if return_outputs else out
                n = int((inputs["labels"][:, 1:] != -100).sum())
                tok_sum[0] += float(loss) * n
                tok_sum[1] += n
            return out

    history: list[dict] = []
    single = data.answers if data.answers and all(len(x.split()) == 1 for x in data.answers) else None
    do_gen = cfg.eval.generate if cfg.eval.generate is not None else bool(data.answers)

    @torch.no_grad()
    def gen_accuracy(m) -> float:
        rows = data.eval_raw[:ev.max_examples]
        tok.padding_side = "left"
        right = 0
        try:
            for i in range(0, len(rows), ev.batch_size):
                chunk = rows[i:i + ev.batch_size]
                enc = tok.pad({"input_ids": [r["prompt_ids"] for r in chunk]}, return_tensors="pt")
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                    outs = m.generate(**enc, max_new_tokens=ev.max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
                texts = tok.batch_decode(outs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                right += sum(answer_matches(x, r["reference"], single) for x, r in zip(texts, chunk))
        finally:
            tok.padding_side = "right"
        return right / max(len(rows), 1)

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.perf_counter() - self.t0)

        def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
            rec = {"step": state.global_step, "trainer_eval_loss": metrics.get("eval_loss"),
                   "eval_loss": tok_sum[0] / max(tok_sum[1], 1)}
            tok_sum[0], tok_sum[1] = 0.0, 0
            if do_gen:
                rec["gen_accuracy"] = gen_accuracy(model)
            history.append(rec)

    tok.padding_side = "right"
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=ev.batch_size,
        gradient_accumulation_steps=t.grad_accum, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        learning_rate=t.lr, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm or 0.0,
        logging_steps=t.log_every, eval_strategy="steps" if t.eval_every else "epoch", eval_steps=t.eval_every,
        save_strategy="no", report_to="none", seed=t.seed, bf16=a.bf16, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Script(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                     data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                     optimizers=(opt, sched), callbacks=[Timing()])
    if t.eval_before:
        trainer.evaluate()  # the before of before -> after (the callback adds generation)
    t_train = time.time()
    trainer.train()
    train_wall = time.time() - t_train
    trainer.save_model(os.path.join(a.out, "adapter"))
    res = {"side": "hf-bf16" if a.bf16 else "hf-fp32", "steps": len(step_s), "step_s": step_s,
           "step_time_s": sum(step_s) / max(len(step_s), 1), "train_wall_s": train_wall, "history": history,
           "threads": torch.get_num_threads(), "wall_s": time.time() - T_START,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "lora": {"r": sc.r, "alpha": sc.lora_alpha, "targets": list(sc.target_modules),
                    "layers": sc.layers_to_transform}}
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "batches.json"), "w") as f:
        json.dump(batches, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
