"""The training loop: one loop on accelerate for CPU, one GPU or several.

    for step in range(start, total):             # optimizer steps
        for micro in range(grad_accum):           # micro-batches; gradients sync on the last one
            loss = model(**batch).loss / accum ; backward
        clip ; optimizer.step ; scheduler.step
        every log_every: JSONL/CSV/TensorBoard ; every eval_every: evaluate, keep best, maybe stop
        every save_every: checkpoint (adapter + optimizer + scheduler + RNG + data position)

Data order is a pure function of (seed, epoch): batch m of the run is always the same examples,
so a resumed run sees exactly the batches the killed one would have seen, and on CPU continues
the same loss curve bit for bit. Checkpoints: state.py. Ctrl-C / SIGTERM: interrupt.py (the loop
stops after the step it is in, saves, and the run writes its report). The logs and the result
dict: records.py; a run's length under a training-time budget (train.budget_s): clock_budget.py.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .checks import plan
from .clock_budget import ClockBudget
from .config import JobConfig, JobConfigError, saved_form
from .data import Prepared, collate
from .distributed import Dist
from .evaluate import Evaluation
from .interrupt import StopRequest
from .lm import CausalLMPath
from .objectives.hooks import ObjectiveSteps
from .resources import cpu_step_clock, peak_memory_mb, precision_choice, set_cpu_threads
from .speed import compile_for_training, enable_gradient_checkpointing, offload_factory
from .records import RunRecords
from .state import Checkpointing
from .trackers import Trackers


class TrainingDiverged(RuntimeError):
    """Loss became NaN/Inf; the message names the step and the last good checkpoint."""


# ---- the trainer ---------------------------------------------------------------------------------

# Called after each evaluation during training with (step, metrics); a non-empty return value (the
# reason) stops the run there, as early stopping does: how `slimtune search` prunes a trial at a rung.
EvalCallback = Callable[[int, dict], "str | None"]


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n training examples in an epoch, seeded by (train.seed, epoch): a resumed run
    draws the same rows, and a benchmark can feed another trainer the same batches
    (bench/job.trainer_order)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


class Trainer(ObjectiveSteps, Evaluation, Checkpointing, RunRecords):
    def __init__(self, cfg: JobConfig, peft_model, tokenizer, data: Prepared, task: str,
                 log: Callable[[str], None] = print, progress: bool = True, session_t0: float | None = None,
                 dist: Dist | None = None, on_evaluate: EvalCallback | None = None) -> None:
        from accelerate import Accelerator

        self.on_evaluate = on_evaluate
        self.stop_reason: str | None = None

        self.cfg, self.t, self.data, self.task, self.log = cfg, cfg.train, data, task, log
        # several processes (distributed.py): the launcher's world, DDP or FSDP; t = this session's
        # train config (a resume under another world size changes the per-rank batch only)
        self.dist = dist or Dist.from_env(cfg.train)
        self.dist.start(self.t.cpu_threads)
        self.t = self.dist.resume_batch(cfg.train, None) if self.dist.batch_size is None else \
            cfg.train.model_copy(update={"batch_size": self.dist.batch_size})
        self.tok = tokenizer
        self.out = Path(cfg.output_dir)
        cuda = torch.cuda.is_available()
        prec, why = precision_choice(self.t.precision)
        self.precision = prec
        if self.t.precision == "auto":
            log(f"precision: {why}")
        mp = {"fp32": "no"}.get(prec, prec)
        _allow_new_precision(mp)
        self.acc = Accelerator(mixed_precision=mp, cpu=not cuda, **self.dist.accelerator_kwargs())
        self.device = self.acc.device
        if not cuda:
            set_cpu_threads(self.t.cpu_threads, log)
        self.is_main = self.acc.is_main_process
        self.progress = progress and self.is_main
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0  # an image processor has none

        self.model = peft_model
        # a method that acts between steps (AdaLoRA's rank allocation) or adds to the loss (its regulariser)
        tuner = getattr(peft_model, "base_model", None)
        self._on_step = getattr(tuner, "on_optimizer_step", None)
        self._extra_loss = getattr(tuner, "extra_loss", None)
        self._method_report = getattr(tuner, "method_report", None)
        if self.t.gradient_checkpointing:
            enable_gradient_checkpointing(peft_model.get_base_model(), log)
        self.dist.refuse_fsdp(peft_model)
        self.dist.shard(peft_model, self.device)  # fsdp: base and adapters split across ranks, before the optimizer
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise JobConfigError("no trainable parameters: the adapter is frozen (loaded with is_trainable=False?) "
                                 "or the method selects nothing to train in this model")
        decay = [p for n, p in self.params if p.ndim >= 2]
        no_decay = [p for n, p in self.params if p.ndim < 2]
        # fused: one kernel for every tensor (CPU and CUDA); a per-tensor loop costs ~4x on CPU
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.t.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.t.lr,
                                fused=all(p.is_floating_point() for _, p in self.params))

        world = self.acc.num_processes
        self.global_bs = self.t.batch_size * world
        self.schedule = plan(self.t, len(data.train), world)
        self.micro_per_epoch, self.total_steps, self.warmup = (self.schedule.micro_per_epoch, self.schedule.total_steps,
                                                               self.schedule.warmup)
        self.clock_budget = ClockBudget.of(self.t.budget_s, self.t.budget_clock, world, cuda)  # re-plans total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda)
        self.model, self.opt = self.dist.prepare(self.acc, self.model, opt)
        self.lm: CausalLMPath | None = None
        self._start_objective()  # train.objective (objectives/): None = sft, the pipeline's own loss
        if self._spec.generates and self.objective is None:  # the decoder, then the head at labelled positions only (lm.py)
            try:
                self.lm = CausalLMPath.build(self.model, self.t, data, self.acc.num_processes, self.device, self.out,
                                             log, will_reuse=self._reuse())
            except ValueError as e:
                raise JobConfigError(str(e)) from None
        self.sched = sched  # stepped once per optimizer step, by hand (not world-size times)
        self.model_unwrapped = self.acc.unwrap_model(self.model)
        self._bind_objective(tokenizer)
        compile_for_training(self.model_unwrapped, self.t, cuda and self.is_main, log)
        self._offload = offload_factory(self.t, self.device)

        self.metric = self.t.metric or self._default_metric()
        if self.metric not in self.measured_metrics():
            raise JobConfigError(f"train.metric '{self.metric}' is not measured for this task and data; choose one "
                                 f"of {self.measured_metrics()}")
        self.metric_max = not (self.metric.endswith("loss") or self.metric in ("perplexity", "wer", "cer"))
        self.step = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.history: list[dict[str, Any]] = []
        self.before: dict[str, float] | None = None
        self.tokens_seen = 0
        self.train_time = 0.0  # seconds inside training steps, over every session of the run
        self.last_ckpt: Path | None = None
        self.trackers: Trackers | None = None  # train.report_to: tensorboard / mlflow / wandb (trackers.py)
        # sessions: one per process that trained this run (a resume starts a new one), each with its
        # steps and times; elapsed = wall time of the earlier sessions up to their last checkpoint
        self.session_t0 = session_t0 or time.time()
        self.sessions: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self.resumed_at: int | None = None
        self.lost_steps = 0  # steps a killed session ran after its last checkpoint (run again now)
        self.samples_before: list[dict[str, str]] | None = None
        self.samples_after: list[dict[str, str]] | None = None
        self.stop: StopRequest | None = None
        self._session_train = 0.0
        self._session_cpu = 0.0  # the same steps on cpu_step_clock(): compute, whatever else the machine runs
        self._first_step: tuple[float, float] | None = None  # (wall, cpu) of this session's first step: its warm-up
        self.last_samples: list[dict[str, str]] | None = None  # the generations of the last evaluate(samples=True)
        self._samples_at: int | None = None

    # ---- schedule -----------------------------------------------------------------------------
    def _lr_lambda(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / (self.warmup + 1)
        if self.t.scheduler == "constant":
            return 1.0
        frac = (s - self.warmup) / max(1, self.total_steps - self.warmup)
        frac = min(frac, 1.0)
        return 0.5 * (1 + math.cos(math.pi * frac)) if self.t.scheduler == "cosine" else 1 - frac

    def _replan(self, bar) -> None:
        """train.budget_s: the run's length from this session's steady steps (clock_budget.py)."""
        cpu = self.clock_budget.clock == "cpu"
        self.total_steps = self.clock_budget.total(
            self.total_steps, self.step, self.step - (self.resumed_at or 0),
            self._session_cpu if cpu else self._session_train, self._first_step[1 if cpu else 0])
        if bar is not None:
            bar.total = self.total_steps

    def _reuse(self) -> dict[str, bool]:
        """Which splits' examples the run meets more than once (what a prefix cache would save)."""
        eval_every = self.t.eval_every or max(1, self.micro_per_epoch // self.t.grad_accum)
        evals = int(self.t.eval_before) + math.ceil(self.total_steps / eval_every)
        return {"train": self.total_steps * self.t.grad_accum > self.micro_per_epoch, "eval": evals > 1}

    # ---- data order: a pure function of (seed, micro-batch index) --------------------------------
    def _examples(self, m: int, rank: int | None = None) -> list[int]:
        """The training examples (indices) of micro-batch m of the run, on this process (or `rank`)."""
        epoch, b = divmod(m, self.micro_per_epoch)
        perm = epoch_permutation(len(self.data.train), self.t.seed, epoch)
        idx = perm[b * self.global_bs:(b + 1) * self.global_bs]
        if len(idx) < self.global_bs and self.acc.num_processes > 1:  # every rank needs a batch
            idx += perm[:self.global_bs - len(idx)]
        r = self.acc.process_index if rank is None else rank
        return idx[r * self.t.batch_size:(r + 1) * self.t.batch_size]

    def _batch(self, m: int) -> dict[str, Any]:
        """Micro-batch m of the run on the device: padding-free when the LM path packs."""
        ex = [self.data.train[i] for i in self._examples(m)]
        batch = self._objective_collate(m, ex) if self.objective is not None else \
            self.lm.collate(ex, self.pad_id) if self.lm is not None and not self.lm.disabled else \
            collate(ex, self.pad_id)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _loss(self, batch: dict[str, Any], ids: list[int]) -> torch.Tensor:
        if self.objective is not None:
            return self._objective_loss(batch)
        if self.lm is not None and not self.lm.disabled:
            loss = self.lm.loss(batch, "train", ids, [self.data.train[i] for i in ids], self.pad_id)
            return loss + self._extra_loss() if self._extra_loss is not None else loss  # (the model's forward adds it)
        return self.model(**batch)["loss"]

    @staticmethod
    def _tokens(batch: dict[str, Any]) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return batch["input_ids"].numel() if "input_ids" in batch else len(batch["labels"])

    def latest_checkpoint(self) -> Path | None:
        from .rundir import checkpoints

        cks = checkpoints(self.out)
        return cks[-1] if cks else None

    # ---- the loop -----------------------------------------------------------------------------
    def train(self, resume_from: Path | None = None) -> dict[str, Any]:
        """Train to the end (or an early stop, a NaN, a Ctrl-C); resume_from continues a checkpoint
        exactly (`load_weights` first takes only a checkpoint's trained weights)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            before = self._logged_steps()
            self.load_checkpoint(resume_from)
            self.lost_steps = max(0, before - self.step)
            self.log(f"resumed from {resume_from} at step {self.step} of {self.total_steps}"
                     + (f"; steps {self.step + 1}-{before} of the earlier session came after its last checkpoint "
                        "and run again" if self.lost_steps else ""))
            if self.is_main:  # the log restarts from what the checkpoint knew: no duplicated steps
                with open(self.out / "metrics.jsonl", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in self.history)
        elif self.is_main:
            (self.out / "metrics.jsonl").write_text("")
        self._objective_precompute()  # train.precompute_ref: before the first step changes the model
        if self.is_main:
            self.trackers = Trackers.open(self.t.report_to, self.out, saved_form(self.cfg), self.step, self.log,
                                          self.history)
        try:
            with StopRequest() as self.stop, (self.lm.attention() if self.lm is not None else _null()):
                return self._loop()
        finally:
            if self.lm is not None:
                self.lm.close()  # the prefix cache (a file in the run folder when it was large)

    def _loop(self) -> dict[str, Any]:
        if self.before is None and self.t.eval_before:
            want = self.samples_before is None and (self.is_main or self.dist.fsdp)  # FSDP: every rank decodes
            self.before = self.evaluate(samples=want)  # the report's samples from the same pass
            if want:
                self.samples_before = self.last_samples
            self._record({"step": 0, **self.before})
            self.log("before training: " + _fmt(self.before))
        if self.samples_before is None and (self.is_main or self.dist.fsdp):  # FSDP: every rank decodes
            self.samples_before = self.sample_generations()

        eval_every = self.t.eval_every or max(1, self.micro_per_epoch // self.t.grad_accum)
        save_every = self.t.save_every or eval_every
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                       file=sys.stderr, mininterval=0.5)
        self.model.train()
        stopped = None
        status = "finished"
        win_loss, win_n, win_tok, win_t0 = 0.0, 0, 0, time.time()
        t_run = time.time()
        if self.step >= self.total_steps:
            self.log(f"the run is complete ({self.step} of {self.total_steps} steps): nothing left to train")
        try:
            while self.step < self.total_steps:
                if self.dist.any(self.stop.requested):  # every rank stops at the same step
                    status = "interrupted"
                    break
                t0, c0 = time.time(), cpu_step_clock()
                step_loss, step_tok = 0.0, 0
                for micro in range(self.t.grad_accum):
                    m = self.step * self.t.grad_accum + micro
                    ids, batch = self._examples(m), self._batch(m)
                    sync = micro == self.t.grad_accum - 1
                    with self.dist.no_sync(self.acc, self.model, sync):
                        with self.acc.autocast(), (self._offload() if self._offload else _null()):
                            loss = self._loss(batch, ids)
                        loss, mean = self.dist.global_mean(loss, batch)  # several processes: the global batch's
                        if not torch.isfinite(mean):
                            raise TrainingDiverged(self._nan_message(mean))
                        self.acc.backward(loss / self.t.grad_accum)
                        if sync:
                            self._objective_sync()  # a loss that ran beside the DDP wrapper: its gradient sync
                    step_loss += mean.item() / self.t.grad_accum
                    step_tok += self._tokens(batch) * self.acc.num_processes
                gnorm = None
                if self.t.max_grad_norm:
                    gnorm = self.dist.clip_grad_norm_(self.acc, [p for _, p in self.params], self.t.max_grad_norm)
                    if not math.isfinite(gnorm) and self.precision != "fp16":
                        raise TrainingDiverged(self._nan_message(torch.tensor(gnorm), what="gradient norm"))
                self.opt.step()
                if self._on_step is not None:  # after the update, while the gradients are still there
                    self._on_step(self.step)
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                self.train_time += time.time() - t0
                self._session_train += time.time() - t0
                self._session_cpu += cpu_step_clock() - c0
                if self._first_step is None:
                    self._first_step = (self._session_train, self._session_cpu)
                if self.clock_budget is not None:
                    self._replan(bar)
                self.tokens_seen += step_tok
                win_tok += step_tok
                win_loss += step_loss
                win_n += 1
                lr = self.sched.get_last_lr()[0]
                if bar is not None:
                    el = max(time.time() - win_t0, 1e-9)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{win_tok / el:.0f}",
                                    mem=f"{peak_memory_mb():.0f}MB", refresh=False)
                    bar.update(1)
                if self.step % self.t.log_every == 0 or self.step == self.total_steps:
                    el = max(time.time() - win_t0, 1e-9)
                    rec = {"step": self.step, "loss": win_loss / win_n, "lr": lr, "tokens_per_s": win_tok / el,
                           "peak_mem_mb": peak_memory_mb()}
                    if gnorm is not None:
                        rec["grad_norm"] = gnorm
                    rec.update(self._objective_log())  # rewards, margins, accuracy, KL (objectives only)
                    self._record(rec)
                    if bar is None:  # no progress bar: the log carries the training loss
                        self.log(f"step {self.step}/{self.total_steps}: loss {rec['loss']:.4f}, lr {lr:.2e}, "
                                 f"{rec['tokens_per_s']:.0f} tokens/s")
                    win_loss, win_n, win_tok, win_t0 = 0.0, 0, 0, time.time()
                do_eval = self.step % eval_every == 0 or self.step == self.total_steps
                if do_eval:
                    last = self.step == self.total_steps and (self.is_main or self.dist.fsdp)  # the samples after: this pass
                    res = self.evaluate(samples=last)
                    self._samples_at = self.step if last else None
                    self._record({"step": self.step, **res})
                    if bar is not None:
                        bar.write(f"step {self.step}: " + _fmt(res))
                    else:
                        self.log(f"step {self.step}: " + _fmt(res))
                    stopped = self._track_best(res)
                    if self.on_evaluate is not None and not stopped:
                        self.stop_reason = self.on_evaluate(self.step, res) or None
                        if self.stop_reason:
                            self.log(f"stopped at step {self.step}: {self.stop_reason}")
                            stopped = True
                if self.dist.any(self.stop.requested) and self.step < self.total_steps:
                    status = "interrupted"
                if self.step % save_every == 0 or self.step == self.total_steps or stopped or status == "interrupted":
                    self.save_checkpoint()
                if stopped or status == "interrupted":
                    break
        except TrainingDiverged as e:
            if bar is not None:
                bar.close()
            self._finish_logs()
            e.result = self._result("diverged", time.time() - t_run)
            raise
        if bar is not None:
            bar.close()
        if stopped:
            status = "stopped early"
        if status != "interrupted":
            self.save_adapter(self.out / "adapter")  # the last adapter (FSDP: gathered, rank 0 writes)
            if self.samples_before is not None:
                self.samples_after = self.last_samples if self._samples_at == self.step else self.sample_generations()
        self._finish_logs()
        return self._result(status, time.time() - t_run)

    def lr_curve(self, points: int = 400) -> list[tuple[int, float]]:
        """The schedule's learning rate after each step (at most `points` of them): for the plot."""
        every = max(1, self.total_steps // points)
        return [(s, self.t.lr * self._lr_lambda(s)) for s in range(0, self.total_steps + 1, every)]

    def _nan_message(self, loss, what: str = "loss") -> str:
        keep = (f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else
                "no checkpoint was written before it (lower train.save_every to keep one)")
        return (f"{what} became {loss.item()} at step {self.step + 1} (lr {self.sched.get_last_lr()[0]:.2e}); "
                f"training stopped and {keep}. Lower train.lr, raise train.warmup_ratio, keep "
                f"train.max_grad_norm set, or use precision bf16/fp32 instead of fp16.")

    def _track_best(self, res: dict[str, float]) -> bool:
        if self.metric not in res:
            raise JobConfigError(f"train.metric '{self.metric}' is not measured for this task; choose from "
                                 f"{sorted(res)}")
        v = res[self.metric]
        better = self.best is None or (v > self.best if self.metric_max else v < self.best)
        if better:
            self.best, self.best_step, self.bad_evals = v, self.step, 0
            self.save_best(v)  # rank 0 writes (FSDP: every rank gathers first)
        else:
            self.bad_evals += 1
        p = self.t.early_stopping_patience
        if p and self.bad_evals >= p:
            self.log(f"early stopping: {self.metric} did not improve for {p} evals (best {self.best:.4f} at step "
                     f"{self.best_step})")
            return True
        return False



def _allow_new_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second run in the same process (a
    notebook, a sweep) with another precision; a single-process run may start over."""
    from accelerate.state import AcceleratorState

    st = AcceleratorState._shared_state
    if st and st.get("_mixed_precision", mixed_precision) != mixed_precision and st.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in res.items())
