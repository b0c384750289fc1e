"""Where the job meets the objectives: the data step of set-up (`prepare_data`) and the trainer's
mixin (`ObjectiveSteps`) that hands batches, loss, logging and evaluation to the objective when
`train.objective` is not sft. The trainer keeps its loop, schedule, checkpoints and report.
"""
from __future__ import annotations

import inspect
import json
from typing import Any

import torch

from ..config import JobConfig, JobConfigError
from . import OBJECTIVES, build
from .rewards import RewardError


def prepare_data(cfg: JobConfig, tok, log=print):
    """The objective's data (TRL's formats) as a `Prepared`, or None when the pipeline's own data
    reading applies (sft)."""
    cls = OBJECTIVES[cfg.train.objective]
    if getattr(cls, "pipeline", False):
        return None
    if cfg.task not in ("auto", "causal_lm"):
        raise JobConfigError(f"train.objective={cfg.train.objective} trains a causal LM; task={cfg.task} is not one "
                             "(set task: causal_lm or leave it auto)")
    if tok is None:
        raise JobConfigError(f"train.objective={cfg.train.objective} needs a tokenizer: give a transformers model")
    from .data import prepare

    build(cfg.train)  # the objective's own checks (loss_type, rewards importable, ...) before any data is read
    return prepare(cfg, tok, cls.data, log)


class ObjectiveSteps:
    """Trainer mixin. `self.objective` is None for sft: every method then defers to the pipeline.

    Under several processes (distributed.py) each rank computes the loss of its share of the global
    micro-batch and the ranks' gradients are averaged, so a step is one process's step on the whole
    batch: the objectives' cross-row terms use the global batch (KTO's mismatched KL pairs and its
    KL estimate, ORPO's / RPO's token mean: collectives.world_share / world_mean); GRPO's groups are
    sampled whole on the rank that holds their prompt, from the unwrapped model, each rank with its
    own sampling seed. The one-row fast layout (pairs, KTO) calls the decoder and head directly, beside the DDP
    wrapper, so its gradients are averaged by one all-reduce after backward (`_objective_sync`)."""

    objective = None
    _manual_sync = False  # the loss runs on the unwrapped model: the gradients are all-reduced by hand

    def _start_objective(self) -> None:
        self.objective = build(self.t)
        self._obj_sums: dict[str, list[float]] = {}

    def _objective_collate(self, m: int, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Micro-batch m's rows on this rank, collated by the objective; an objective whose rows pair
        across the batch (`before`: KTO's KL completions) gets the row before this rank's share."""
        if self.dist.world > 1 and "before" in inspect.signature(self.objective.collate).parameters:
            r = self.acc.process_index
            prev = self._examples(m, (r - 1) % self.dist.world)[-1]
            return self.objective.collate(examples, self.pad_id, before=self.data.train[prev])
        return self.objective.collate(examples, self.pad_id)

    def _objective_sync(self) -> None:
        if self._manual_sync:
            from ..collectives import allreduce_grads

            allreduce_grads([p for _, p in self.params])

    def _bind_objective(self, tokenizer) -> None:
        if self.objective is None:
            return
        if self.dist.fsdp:  # (`slimtune train --nproc` says it before starting the processes)
            from ..launch import refuse

            refuse(self.cfg)
        self.objective.ref_model = self.model_unwrapped  # the adapters are switched off on this one
        self.objective.tok = tokenizer
        if hasattr(self.objective, "use_shared_prompt"):  # pairs, KTO's rows: the job's fast path (shared.py)
            # the adapter-off reference is the frozen base: a row's reference log-probs never change
            self.objective.cache_ref = True
            if self.t.chunked_ce == "off":
                on, why = False, "train.chunked_ce=off: the model's own forward"
            elif self.dist.fsdp:
                on, why = False, ("train.distributed=fsdp: the one-row layout calls the decoder and head directly, "
                                  "and FSDP gathers the embeddings and head only in the whole model's forward")
            else:
                on, why = self.objective.use_shared_prompt(self.model_unwrapped, self.log)
                if on and self.dist.world > 1:  # DDP: the loss runs on the unwrapped model, gradients synced by hand
                    self._manual_sync = True
                    why += "; DDP: the gradients are averaged by one all-reduce after backward"
            if not on and self.t.chunked_ce == "on":
                raise JobConfigError(f"train.chunked_ce=on cannot apply to the pairs: {why}; set train.chunked_ce=auto "
                                     "or off")
            plain = "G padded rows per prompt" if self.objective.data == "prompts" else "pairs as two padded rows each"
            self.log(f"loss: {why}" if on else f"loss: {plain} ({why})")
        if callable(getattr(self.objective, "sample", None)) and self.dist.world > 1:
            self.log(f"sampling: each of the {self.dist.world} processes samples the groups of its own prompts "
                     "(a group stays on one process, so its advantages are normalised as in one process)")

    def _objective_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        try:
            loss, stats = self.objective.loss(self.model_unwrapped if self._manual_sync else self.model, batch)
        except RewardError as e:  # the user's reward broke mid-run: keep what was trained, then say which
            ck = self.save_checkpoint()
            raise RewardError(f"{e}. Training stopped at step {self.step}; checkpoint {ck} keeps the run: fix the "
                              f"function and `slimtune train {self.out} --resume` continues") from None
        for k, v in stats.items():
            s = self._obj_sums.setdefault(k, [0.0, 0.0])
            s[0] += float(v.detach().float().sum())
            s[1] += v.numel()
        return loss

    def _objective_log(self) -> dict[str, float]:
        """The objective's statistics averaged since the last log line (rewards, margins, accuracy, KL);
        under several processes over every rank's rows (every rank logs at the same steps)."""
        keys = sorted(self._obj_sums)
        if self.dist.world > 1 and keys:
            flat = self.dist.eval_sum(*[x for k in keys for x in self._obj_sums[k]])
            self._obj_sums = {k: flat[2 * i:2 * i + 2] for i, k in enumerate(keys)}
        out = {f"train_{k}": s[0] / s[1] for k, s in self._obj_sums.items() if s[1]}
        self._obj_sums = {}
        return out

    def _objective_precompute(self) -> None:
        """At the start of training (after a resume restored the checkpoint). An objective that
        samples, under several processes: each rank its own generator stream, seeded by (seed, rank,
        step), else the ranks would draw the same noise for their different prompts (set here, after
        the model's init, which must match across ranks, and after the checkpoint's rank-0 state).
        train.precompute_ref: the starting model's log-probs of every pair, once; kept in the run
        folder so a resumed run uses the same reference."""
        if self.objective is not None and callable(getattr(self.objective, "sample", None)) and self.dist.world > 1:
            torch.manual_seed(self.t.seed + 7919 * self.dist.rank + 104729 * self.step)
        if self.objective is None or not self.t.precompute_ref:
            return
        path = self.out / "ref_logps.json"
        splits = {"train": self.data.train, "eval": self.data.eval}
        if path.is_file():
            saved = json.loads(path.read_text())
            for name, rows in splits.items():
                for e, r in zip(rows, saved[name]):
                    e["ref_logps"] = tuple(r)
            self.log(f"reference log-probs: read from {path}")
            return
        for rows in splits.values():
            self.objective.precompute(self.model_unwrapped, rows, self.pad_id, self.cfg.eval.batch_size, self.device)
        if self.is_main:
            path.write_text(json.dumps({n: [e["ref_logps"] for e in rows] for n, rows in splits.items()}))
        self.log(f"reference log-probs: computed once for {len(self.data.train)} + {len(self.data.eval)} pairs "
                 "(train.precompute_ref)")

    def evaluate(self, samples: bool = False) -> dict[str, float]:
        if self.objective is None:
            return super().evaluate(samples)
        res = self._objective_evaluate()
        if self._do_generate():  # a short-answer task: the generated answers too (as its SFT run measures)
            res["gen_accuracy"] = self.generated_accuracy()
        if samples:
            self.last_samples = self.sample_generations()
        return res

    def measured_metrics(self) -> list[str]:
        if self.objective is None:
            return super().measured_metrics()
        return self.objective.metrics() + (["gen_accuracy"] if self._do_generate() else [])

    def _default_metric(self) -> str:
        return self.objective.metric if self.objective is not None else super()._default_metric()

    @torch.no_grad()
    def _objective_evaluate(self) -> dict[str, float]:
        model = self._eval_model()
        was = model.training
        model.eval()
        try:
            rows = self.data.eval[:self.cfg.eval.max_examples]
            with self.acc.autocast():
                return self.objective.evaluate(model, rows, self.pad_id, self.cfg.eval.batch_size, self.device)
        finally:
            if was:
                model.train()
