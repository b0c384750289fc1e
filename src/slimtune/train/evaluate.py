"""Held-out evaluation for the trainer: loss (and perplexity), accuracy/F1 for classifiers,
answer-choice and generated-answer accuracy for LM tasks with a short answer set.

A mixin: it reads the trainer's model, data, config, device and tokenizer (`Trainer` in trainer.py).
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..compile_blocks import eager
from .data import IGNORE, collate
from .metrics import accuracy_f1, answer_matches


class Evaluation:
    def _default_metric(self) -> str:
        if self.task in ("classification", "image_classification"):
            return "accuracy"
        return "gen_accuracy" if self._do_generate() else "eval_loss"

    def _do_generate(self) -> bool:
        g = self.cfg.eval.generate
        if g is None:
            return bool(self.data.answers) and bool(self.data.eval_raw)
        return g and bool(self.data.eval_raw)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.model_unwrapped if self.dist.mode == "ddp" else self.model  # DDP syncs buffers per forward
        was_training = model.training
        model.eval()
        tot_loss, tot_n = 0.0, 0
        preds: list[int] = []
        golds: list[int] = []
        bs = self.cfg.eval.batch_size
        ev = self.dist.eval_rows(self.data.eval)  # several processes: this rank's share, sums reduced below
        cand = self._answer_first_tokens()
        choice_right, choice_n = 0, 0
        for i in range(0, len(ev), bs):
            batch = {k: v.to(self.device) for k, v in collate(ev[i:i + bs], self.pad_id).items()}
            with self.acc.autocast():
                out = model(**batch)
            logits = out["logits"].float()
            if self.task == "causal_lm":
                # prompt learning prepends virtual tokens: their logits predict nothing we label
                logits = logits[:, logits.shape[1] - batch["labels"].shape[1]:]
                lab = batch["labels"][:, 1:]
                lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), lab, ignore_index=IGNORE,
                                                       reduction="sum")
                tot_loss += lp.item()
                tot_n += int((lab != IGNORE).sum())
                if cand is not None:  # which answer the model ranks first, at the first answer token
                    for row, l in zip(logits, batch["labels"]):
                        pos = int((l != IGNORE).nonzero()[0])
                        gold = int(l[pos])
                        if gold in cand:
                            choice_n += 1
                            choice_right += cand[int(row[pos - 1, cand].argmax())] == gold
            else:
                tot_loss += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
                tot_n += len(batch["labels"])
                preds += logits.argmax(-1).tolist()
                golds += batch["labels"].tolist()
        self.dist.eval_tail(len(self.data.eval), bs, lambda: model(**{k: v.to(self.device) for k, v in
                                                          collate(self.data.eval[:1], self.pad_id).items()}))
        tot_loss, tot_n, choice_right, choice_n = self.dist.eval_sum(tot_loss, tot_n, choice_right, choice_n)
        preds, golds = self.dist.gather(preds), self.dist.gather(golds)
        res: dict[str, float] = {"eval_loss": tot_loss / max(tot_n, 1)}
        if self.task == "causal_lm":
            res["perplexity"] = math.exp(min(res["eval_loss"], 50))
            if choice_n:
                res["choice_accuracy"] = choice_right / choice_n
            if self._do_generate():
                res["gen_accuracy"] = self.generated_accuracy()
        else:
            res.update(accuracy_f1(preds, golds, len(self.data.labels or []) or (max(golds) + 1)))
        if was_training:
            model.train()
        return res

    def _answer_first_tokens(self) -> list[int] | None:
        """First token id of each answer of a label-set LM task, when
        they are distinct: then the label the model scores highest is measurable in the loss pass."""
        if self.task != "causal_lm" or not self.data.answers or self.tok is None or len(self.data.answers) > 20:
            return None
        firsts = [self.tok(a, add_special_tokens=False)["input_ids"][:1] for a in self.data.answers]
        ids = [f[0] for f in firsts if f]
        if len(set(ids)) != len(self.data.answers):
            return None
        return ids

    def measured_metrics(self) -> list[str]:
        """What `evaluate` reports for this task and data (train.metric must be one of them)."""
        if self.task != "causal_lm":
            return ["eval_loss", "accuracy", "f1"]
        return ["eval_loss", "perplexity"] + (["choice_accuracy"] if self._answer_first_tokens() else []) + \
            (["gen_accuracy"] if self._do_generate() else [])

    @torch.no_grad()
    def _generate(self, rows: list[dict], max_new_tokens: int) -> list[str]:
        """Greedy continuations of rows' prompt ids (left-padded in batches), as text."""
        tok = self.tok
        gen_model = self.model_unwrapped
        side = tok.padding_side
        tok.padding_side = "left"
        texts: list[str] = []
        try:
            for i in range(0, len(rows), self.cfg.eval.batch_size):
                chunk = rows[i:i + self.cfg.eval.batch_size]
                n = max(len(r["prompt_ids"]) for r in chunk)  # left-pad the truncated prompt ids
                ids = torch.full((len(chunk), n), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), n), dtype=torch.long)
                for j, r in enumerate(chunk):
                    L = len(r["prompt_ids"])
                    ids[j, n - L:] = torch.tensor(r["prompt_ids"])
                    mask[j, n - L:] = 1
                enc = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
                with self.acc.autocast(), (eager() if self.t.compile else contextlib.nullcontext()):
                    out = gen_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=tok.pad_token_id)
                texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        finally:
            tok.padding_side = side
        return texts

    @torch.no_grad()
    def generated_accuracy(self, samples: list | None = None) -> float:
        rows = self.dist.gen_rows(self.data.eval_raw[:self.cfg.eval.max_examples])
        single = self.data.answers if self.data.answers and all(len(a.split()) == 1 for a in self.data.answers) else None
        correct = 0
        for r, t in zip(rows, self._generate(rows, self.cfg.eval.max_new_tokens)):
            correct += answer_matches(t, r["reference"], single)
            if samples is not None and len(samples) < 5:
                samples.append((r["reference"], t.strip()))
        correct, n = self.dist.gen_sum(correct, len(rows))
        return correct / max(n, 1)

    def sample_generations(self) -> list[dict[str, str]] | None:
        """The report's before -> after samples: the first `eval.samples` validation prompts of an LM
        run, with the reference and what the model generates (short-answer tasks: eval.max_new_tokens
        tokens; others 32)."""
        if self.task != "causal_lm" or not self.data.eval_raw or not self.cfg.eval.samples or self.tok is None:
            return None
        rows = self.data.eval_raw[:self.cfg.eval.samples]
        n_new = self.cfg.eval.max_new_tokens if self.data.answers else max(32, self.cfg.eval.max_new_tokens)
        was = self.model.training
        self.model.eval()
        try:
            texts = self._generate(rows, n_new)
        finally:
            if was:
                self.model.train()
        return [{"prompt": self.tok.decode(r["prompt_ids"][-48:], skip_special_tokens=True).strip(),
                 "reference": r["reference"], "generated": t.strip()} for r, t in zip(rows, texts)]
