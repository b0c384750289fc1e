"""Held-out evaluation for the trainer: loss (and perplexity), accuracy/F1 for classifiers,
answer-choice and generated-answer accuracy for LM tasks with a short answer set, and the report's
before -> after generations.

A mixin: it reads the trainer's model, data, config, device and tokenizer (`Trainer` in trainer.py).

Causal LMs on the job's LM path (lm.py) evaluate in one pass per batch: the validation examples in
length order (the sums do not depend on the order; similar lengths pad little), right-padded
without a mask; the loss at the labelled positions only; answer choice from the same hidden
states; greedy generation verified along the reference answers of that pass and continued from
its KV cache where the model leaves them (decode.py); examples whose frozen prefix is kept start at
the first adapted block (prefix_cache.py). Elsewhere the model's own forward gives the logits.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..compat import output_cache
from ..compile_blocks import eager
from . import decode
from .data import IGNORE, collate
from .metrics import answer_matches
from .tasks import get_task


class Evaluation:
    @property
    def _spec(self):
        """The task (tasks/): what it measures, and whether this is a language model's evaluation."""
        return get_task(self.task)

    def _default_metric(self) -> str:
        return self._spec.default_metric(self)

    def _do_generate(self) -> bool:
        g = self.cfg.eval.generate
        if g is None:
            return bool(self.data.answers) and bool(self.data.eval_raw)
        return g and bool(self.data.eval_raw)

    def _lm_path(self):
        """The job's LM path (lm.py) when it runs; it is single-process only (None under DDP/FSDP)."""
        lm = getattr(self, "lm", None)
        return lm if lm is not None and not lm.disabled else None

    def _eval_model(self):
        """The module evaluation calls: DDP's wrapper would sync buffers on every forward, and ranks
        with uneven shards would then wait on each other, so DDP evaluates the unwrapped model."""
        return self.model_unwrapped if self.dist.mode == "ddp" else self.model

    @torch.no_grad()
    def evaluate(self, samples: bool = False) -> dict[str, float]:
        """The held-out metrics; with `samples`, also the report's generations (self.last_samples)."""
        model = self._eval_model()
        was_training = model.training
        model.eval()
        try:
            own = self._spec.evaluate(self)  # a task with its own metrics (speech: WER / CER)
            if own is not None:
                res = own
            elif self._spec.generates and self._lm_path() is not None:
                res = self._evaluate_lm(samples)
            else:
                res = self._evaluate_model()
                if samples:
                    self.last_samples = self.sample_generations()
        finally:
            if was_training:
                model.train()
        return res

    # ---- the model's own forward ------------------------------------------------------------------
    def _evaluate_model(self) -> dict[str, float]:
        model = self._eval_model()
        tot_loss, tot_n = 0.0, 0
        preds: list[int] = []
        golds: list[int] = []
        ranks: list[int] = []  # the gold class's rank among the logits (0 = predicted): top-k accuracy
        lm = self._spec.generates
        bs = self.cfg.eval.batch_size
        ev = self.dist.eval_rows(self.data.eval)  # several processes: this rank's share, sums reduced below
        cand = self._answer_first_tokens()
        choice_right, choice_n = 0, 0
        for i in range(0, len(ev), bs):
            batch = {k: v.to(self.device) for k, v in collate(ev[i:i + bs], self.pad_id).items()}
            with self.acc.autocast():
                out = model(**batch)
            logits = out["logits"]
            if lm:
                # prompt learning prepends virtual tokens: their logits predict nothing we label
                logits = logits[:, logits.shape[1] - batch["labels"].shape[1]:]
                lab = batch["labels"][:, 1:]
                keep = lab != IGNORE  # the loss at labelled positions only: no (tokens × vocab) copies
                tot_loss += F.cross_entropy(logits[:, :-1][keep].float(), lab[keep], reduction="sum").item()
                tot_n += int(keep.sum())
                if cand is not None:  # which answer the model ranks first, at the first answer token
                    for row, lb in zip(logits, batch["labels"]):
                        pos = int((lb != IGNORE).nonzero()[0])
                        gold = int(lb[pos])
                        if gold in cand:
                            choice_n += 1
                            choice_right += cand[int(row[pos - 1, cand].argmax())] == gold
            else:
                logits = logits.float()
                tot_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                tot_n += len(batch["labels"])
                preds += logits.argmax(-1).tolist()
                golds += batch["labels"].tolist()
                ranks += (logits > logits.gather(1, batch["labels"][:, None])).sum(1).tolist()
        self.dist.eval_tail(len(self.data.eval), bs, lambda: model(**{k: v.to(self.device) for k, v in
                                                          collate(self.data.eval[:1], self.pad_id).items()}))
        tot_loss, tot_n, choice_right, choice_n = self.dist.eval_sum(tot_loss, tot_n, choice_right, choice_n)
        preds, golds, ranks = self.dist.gather(preds), self.dist.gather(golds), self.dist.gather(ranks)
        res: dict[str, float] = {"eval_loss": tot_loss / max(tot_n, 1)}
        if lm:
            res["perplexity"] = math.exp(min(res["eval_loss"], 50))
            if choice_n:
                res["choice_accuracy"] = choice_right / choice_n
            if self._do_generate():
                res["gen_accuracy"] = self.generated_accuracy()
        else:
            res.update(self._spec.class_metrics(ranks, preds, golds, len(self.data.labels or []) or (max(golds) + 1)))
        return res

    # ---- the job's LM path: one pass per batch -----------------------------------------------------
    def _generations_wanted(self, samples: bool) -> dict[int, int]:
        """eval_raw index -> new tokens to generate (accuracy rows, and the report's samples)."""
        want: dict[int, int] = {}
        raw = self.data.eval_raw
        if self._do_generate():
            for i in range(min(len(raw), self.cfg.eval.max_examples)):
                want[i] = self.cfg.eval.max_new_tokens
        if samples and self.cfg.eval.samples and self.tok is not None:
            for i in range(min(len(raw), self.cfg.eval.samples)):
                want[i] = max(want.get(i, 0), self._sample_tokens())
        return want

    def _sample_tokens(self) -> int:
        return self.cfg.eval.max_new_tokens if self.data.answers else max(32, self.cfg.eval.max_new_tokens)

    def _evaluate_lm(self, samples: bool) -> dict[str, float]:
        lm, ev, raw = self._lm_path(), self.data.eval, self.data.eval_raw
        want = self._generations_wanted(samples)
        gen_cfg = getattr(self.model_unwrapped, "generation_config", None)
        plain, _ = decode.plain_greedy(gen_cfg)
        stop = decode.stop_tokens(gen_cfg, self.tok) if self.tok is not None else set()
        by_row = {raw[i]["row"]: i for i in want if "row" in raw[i]}
        rest = [i for i in want if "row" not in raw[i]]  # generated by generate()
        if not plain:
            rest, by_row = list(want), {}
        cand = self._answer_first_tokens()
        order = sorted(range(len(ev)), key=lambda j: len(ev[j]["input_ids"]))
        tot_loss, tot_n, choice_right, choice_n = 0.0, 0, 0, 0
        outs: dict[int, list[int]] = {}
        again: list[decode.Row] = []  # rows to generate afresh (the pass kept no KV cache)
        bs = self.cfg.eval.batch_size
        for s in range(0, len(order), bs):
            ids = order[s:s + bs]
            batch = {k: v.to(self.device) for k, v in collate([ev[j] for j in ids], self.pad_id).items()}
            rows = [decode.Row(key=by_row[j], r=r, prompt_len=len(raw[by_row[j]]["prompt_ids"]),
                               ids=ev[j]["input_ids"], budget=want[by_row[j]]) for r, j in enumerate(ids) if j in by_row]
            with self.acc.autocast(), (eager() if self.t.compile else contextlib.nullcontext()):
                out = lm.hidden(batch, "eval", ids, use_cache=bool(rows))
                h = out.last_hidden_state
                ls, n = lm.loss_sum(h, batch["labels"])
                tot_loss += ls.item()
                tot_n += n
                if cand is not None:
                    right, seen = self._choice(lm, h, batch["labels"], cand)
                    choice_right, choice_n = choice_right + right, choice_n + seen
                if rows:
                    decode.verify(lm, h, rows, stop)
                    more = [row for row in rows if row.resume is not None and len(row.out) < row.budget
                            and row.out[-1] not in stop]
                    cache = output_cache(out)
                    if cache is not None:
                        decode.continue_from_cache(lm, cache, h.shape[1], more, stop)
                    else:
                        again += more
            for row in rows:
                outs[row.key] = row.out
        if again:  # continue from prompt + accepted tokens with generate()
            extra = self._generate_ids([{"prompt_ids": row.ids[:row.resume] + [row.out[-1]]} for row in again],
                                       max(row.budget - len(row.out) for row in again))
            for row, e in zip(again, extra):
                outs[row.key] = row.out + e[:row.budget - len(row.out)]
        if rest:
            for i, e in zip(rest, self._generate_ids([raw[i] for i in rest], max(want[i] for i in rest))):
                outs[i] = e[:want[i]]
        res: dict[str, float] = {"eval_loss": tot_loss / max(tot_n, 1)}
        res["perplexity"] = math.exp(min(res["eval_loss"], 50))
        if choice_n:
            res["choice_accuracy"] = choice_right / choice_n
        text = {i: self.tok.decode(decode.finished(o, stop), skip_special_tokens=True) for i, o in outs.items()} \
            if self.tok is not None else {}
        if self._do_generate():
            n_new = self.cfg.eval.max_new_tokens
            rows_acc = raw[:self.cfg.eval.max_examples]
            single = self._single_answers()
            cut = {i: self.tok.decode(decode.finished(outs[i][:n_new], stop), skip_special_tokens=True)
                   for i in range(len(rows_acc))}
            res["gen_accuracy"] = sum(answer_matches(cut[i], r["reference"], single)
                                      for i, r in enumerate(rows_acc)) / max(len(rows_acc), 1)
        if samples:
            self.last_samples = self._samples(text) if self.cfg.eval.samples and raw and self.tok is not None else None
        return res

    @staticmethod
    def _choice(lm, h: torch.Tensor, labels: torch.Tensor, cand: list[int]) -> tuple[int, int]:
        """How often the answer ranked first among the candidates, at each row's first answer token."""
        first = (labels != IGNORE).float().argmax(1)  # the first labelled position of each row
        gold = labels.gather(1, first[:, None]).squeeze(1)
        ok = (first > 0) & torch.isin(gold, torch.tensor(cand, device=labels.device))
        if not ok.any():
            return 0, 0
        rows = ok.nonzero().squeeze(1)
        hs = h[rows, first[rows] - 1]
        w = lm.head.weight[cand]
        scores = F.linear(hs, w, lm.head.bias[cand] if lm.head.bias is not None else None)
        picked = torch.tensor(cand, device=labels.device)[scores.argmax(-1)]
        return int((picked == gold[rows]).sum()), len(rows)

    def _samples(self, text: dict[int, str]) -> list[dict[str, str]]:
        rows = self.data.eval_raw[:self.cfg.eval.samples]
        return [{"prompt": self.tok.decode(r["prompt_ids"][-48:], skip_special_tokens=True).strip(),
                 "reference": r["reference"], "generated": text.get(i, "").strip()} for i, r in enumerate(rows)]

    def _single_answers(self):
        a = self.data.answers
        return a if a and all(len(x.split()) == 1 for x in a) else None

    def _answer_first_tokens(self) -> list[int] | None:
        """First token id of each answer of a label-set LM task, when
        they are distinct: then the label the model scores highest is measurable in the loss pass."""
        if not self._spec.generates or not self.data.answers or self.tok is None or len(self.data.answers) > 20:
            return None
        firsts = [self.tok(a, add_special_tokens=False)["input_ids"][:1] for a in self.data.answers]
        ids = [f[0] for f in firsts if f]
        if len(set(ids)) != len(self.data.answers):
            return None
        return ids

    def measured_metrics(self) -> list[str]:
        """What `evaluate` reports for this task and data (train.metric must be one of them)."""
        return self._spec.measured_metrics(self)

    # ---- generate() --------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_ids(self, rows: list[dict], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids) of rows' prompt ids, left-padded in batches, by `generate`."""
        tok = self.tok
        gen_model = self.model_unwrapped
        outs: list[list[int]] = []
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
            outs += out[:, n:].tolist()
        return outs

    def _generate(self, rows: list[dict], max_new_tokens: int) -> list[str]:
        """Greedy continuations of rows' prompt ids, as text."""
        return self.tok.batch_decode(self._generate_ids(rows, max_new_tokens), skip_special_tokens=True)

    @torch.no_grad()
    def generated_accuracy(self, samples: list | None = None) -> float:
        rows = self.dist.gen_rows(self.data.eval_raw[:self.cfg.eval.max_examples])
        single = self._single_answers()
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
        if not self._spec.generates or not self.data.eval_raw or not self.cfg.eval.samples or self.tok is None:
            return None
        rows = self.data.eval_raw[:self.cfg.eval.samples]
        was = self.model.training
        self.model.eval()
        try:
            texts = self._generate(rows, self._sample_tokens())
        finally:
            if was:
                self.model.train()
        return [{"prompt": self.tok.decode(r["prompt_ids"][-48:], skip_special_tokens=True).strip(),
                 "reference": r["reference"], "generated": t.strip()} for r, t in zip(rows, texts)]
