"""Several processes for one run: `torchrun` / `accelerate launch`, DDP or FSDP2, on torch.distributed.

    torchrun --nproc_per_node 2 -m slimtune train job.yaml     (or `slimtune train job.yaml --nproc 2`)

The launcher sets WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR; `Dist.from_env` reads them and the
job does the rest with torch.distributed and accelerate (gloo on CPU, NCCL on GPU):

    Dist.start()                the process group (accelerate's PartialState, train.distributed_timeout)
    Dist.shard(model)           fsdp: `fully_shard` each repeated block, then the transformer root
    Dist.prepare(acc, m, opt)   ddp: accelerate's DDP wrapper (unused parameters found); fsdp: as sharded
    Dist.global_mean(loss, b)   the loss weighted by this rank's share of the global batch's items, so
                                the averaged gradient is exactly the 1-process gradient of the whole batch
    eval_rows / eval_sum / ...  evaluation sharded by rows, sums reduced (FSDP: equal forward counts)
    full_tensors / optimizer_state / copy_into
                                checkpoints hold whole tensors keyed by name (DTensor shards gathered),
                                so a run saved by N processes resumes under M (`resume_batch`)

One run, any world size: the global batch is `batch_size x world` per micro-batch, fixed by the
run's first session; a resume under another world size changes the per-rank batch to keep it.
The run folder under several processes and `slimtune train --nproc`: launch.py.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .config import JobConfigError, TrainConfig

INFO = "distributed.json"  # in each checkpoint: the world that wrote it (for a resume under another)
IGNORE = -100


class DistributedError(JobConfigError):
    """The processes of one run cannot go on together; the message names what happened and the fix."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class Dist:
    mode: str  # "single" (one process) | "ddp" | "fsdp"
    world: int = 1
    rank: int = 0
    local_world: int = 1
    timeout_s: int = 600
    batch_size: int | None = None  # per-rank batch of this session (a resume may change it), else the config's
    note: str | None = None  # what resume_batch changed, for the log

    @classmethod
    def from_env(cls, t: TrainConfig) -> "Dist":
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls("single", timeout_s=t.distributed_timeout)
        mode = "ddp" if t.distributed == "auto" else t.distributed
        return cls(mode, world, _env_int("RANK", 0), _env_int("LOCAL_WORLD_SIZE", world), t.distributed_timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.mode == "fsdp"

    def label(self) -> str:
        return "1 process" if self.world == 1 else f"{self.world} processes ({self.mode.upper()})"

    # ---- the process group ----------------------------------------------------------------------
    def start(self, cpu_threads: int | None) -> None:
        """Join the launcher's process group (idempotent). On CPU the ranks of one machine share its
        cores: each takes its part unless train.cpu_threads says otherwise."""
        if self.world == 1:
            return
        import torch.distributed as dist
        from accelerate import PartialState

        if not dist.is_initialized():
            PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=self.timeout_s))
            atexit.register(_leave_process_group)
        if not torch.cuda.is_available() and cpu_threads is None:
            from . import resources

            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            n = max(1, cores // self.local_world)
            if not resources._AUTO_THREADS:
                resources._AUTO_THREADS.append((n, f"{cores} cores shared by {self.local_world} processes"))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch.distributed as dist

        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes (a signal reaches the ranks at different steps: all stop together)."""
        if self.world == 1:
            return bool(flag)
        return self._reduce([float(bool(flag))], "max")[0] > 0

    # ---- the model ------------------------------------------------------------------------------
    def refuse_fsdp(self, peft_model: nn.Module) -> None:
        """Methods FSDP cannot split, refused before anything trains (with the reason and the fix)."""
        if not self.fsdp:
            return
        method = next(iter(peft_model.peft_config.values())).method
        base = peft_model.get_base_model()
        inside = {id(p) for p in base.parameters()}
        outside = [n for n, p in peft_model.named_parameters() if p.requires_grad and id(p) not in inside]
        why = None
        if outside:
            why = (f"its trained tensors live outside the transformer ('{outside[0]}'), so FSDP's per-block groups "
                   "cannot hold them")
        elif getattr(getattr(peft_model, "base_model", None), "on_optimizer_step", None) is not None:
            why = ("it re-allocates ranks between steps from scores over whole tensors (AdaLoRA), which FSDP's "
                   "shards do not hold")
        elif any(type(p).__module__.startswith("bitsandbytes") for p in base.parameters()):
            why = "a quantized base (model.quantize) has packed weights FSDP cannot split"
        if why:
            raise DistributedError(f"train.distributed=fsdp cannot run method '{method}': {why}; use "
                                   "train.distributed=ddp (each rank holds the model; the adapter is small)")

    def shard(self, peft_model: nn.Module, device: torch.device | None = None) -> nn.Module:
        """fsdp: FSDP2 `fully_shard` on each repeated block (the Llama layers, BERT's encoder layers),
        then on the transformer itself (embeddings, norm, head: its forward and `generate` both
        gather them). Parameters become DTensor shards: each rank keeps 1/world of the base."""
        if not self.fsdp:
            return peft_model
        from torch.distributed.fsdp import fully_shard

        from ..compile_blocks import repeated_blocks

        if device is not None:  # GPU: shard from the rank's device (accelerate does not move an FSDP model)
            peft_model.to(device)
        base = peft_model.get_base_model()
        blocks = list(repeated_blocks(base))
        if not blocks:
            raise DistributedError(f"train.distributed=fsdp: {type(base).__name__} has no repeated blocks (a ModuleList "
                                   "of same-class layers) to shard; use train.distributed=ddp")
        for _, b in blocks:
            fully_shard(b)
        fully_shard(base)
        return peft_model

    def accelerator_kwargs(self) -> dict[str, Any]:
        if self.mode != "ddp":
            return {}
        from accelerate import DistributedDataParallelKwargs

        # some methods leave parameters out of some forwards (prompt rows, layer-wise phases): DDP
        # must find them each step rather than wait for gradients that never come
        return {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}

    def prepare(self, acc, model: nn.Module, opt):
        if self.fsdp:  # sharded in place already: accelerate must not wrap it in DDP on top
            return model, acc.prepare(opt)
        return acc.prepare(model, opt)

    def no_sync(self, acc, model: nn.Module, sync: bool):
        """Gradient accumulation: reduce only on the last micro-batch of a step."""
        if sync or self.world == 1:
            return contextlib.nullcontext()
        if self.fsdp:
            return _fsdp_no_sync(model)
        return acc.no_sync(model)

    def clip_grad_norm_(self, acc, params: list[torch.Tensor], max_norm: float) -> float:
        if self.fsdp:  # DTensor gradients: torch computes the norm over every shard
            from torch.distributed.tensor import DTensor

            n = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return float(n.full_tensor() if isinstance(n, DTensor) else n)
        return float(acc.clip_grad_norm_(params, max_norm))

    def held_mb(self, model: nn.Module) -> float:
        """MiB of parameters this rank holds (its shards under FSDP): what sharding saves."""
        from torch.distributed.tensor import DTensor

        tot = 0
        for p in model.parameters():
            loc = p.to_local() if isinstance(p, DTensor) else p
            tot += loc.numel() * loc.element_size()
        return tot / 2**20

    # ---- the loss of the global batch -------------------------------------------------------------
    def global_mean(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, the global batch's mean loss). Each rank's mean is weighted by its
        share of the batch's items (label tokens for an LM, rows for a classifier): DDP / FSDP
        average the gradients over ranks, so the result is the gradient of the global mean, the same
        as one process with the whole batch, whatever the padding and lengths."""
        if self.world == 1:
            return loss, loss.detach()
        n = float(_items(batch))
        n_all, s_all = self._reduce([n, float(loss.detach()) * n])
        return loss * (n * self.world / max(n_all, 1.0)), torch.tensor(s_all / max(n_all, 1.0))

    # ---- evaluation -----------------------------------------------------------------------------
    def eval_rows(self, rows: list) -> list:
        """This rank's contiguous share of the validation rows."""
        if self.world == 1:
            return rows
        k, r = divmod(len(rows), self.world)
        start = self.rank * k + min(self.rank, r)
        return rows[start:start + k + (self.rank < r)]

    def gen_rows(self, rows: list) -> list:
        """Rows to generate from: a share under DDP; under FSDP every rank generates every row (each
        decoding step gathers the weights, so the ranks must take the same steps)."""
        return rows if self.fsdp else self.eval_rows(rows)

    def eval_sum(self, *values: float) -> list[float]:
        return list(values) if self.world == 1 else self._reduce([float(v) for v in values])

    def gen_sum(self, correct: float, n: int) -> tuple[float, float]:
        if self.world == 1 or self.fsdp:
            return correct, n
        c, m = self._reduce([float(correct), float(n)])
        return c, m

    def gather(self, xs: list) -> list:
        if self.world == 1:
            return xs
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, xs)
        return [x for part in out for x in part]

    def eval_tail(self, n_total: int, bs: int, forward: Callable[[], Any]) -> None:
        """FSDP: every rank runs as many forwards as the rank with the most batches (each forward
        gathers weights with the others); the extra ones are not counted. The counts follow from
        the row total, so no collective is needed (one would interleave with the forwards')."""
        if not self.fsdp:
            return
        mine = -(-len(self.eval_rows(range(n_total))) // bs)
        most = -(-(-(-n_total // self.world)) // bs)
        for _ in range(most - mine):
            forward()

    # ---- checkpoints ----------------------------------------------------------------------------
    def reshard(self, model: nn.Module) -> None:
        """FSDP keeps the root group's weights gathered after a forward that no backward follows (an
        evaluation, a generation): shard them again, so the parameters are the optimizer's."""
        if not self.fsdp:
            return
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def full_tensors(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors on CPU (FSDP shards gathered: every rank calls this, in the same order)."""
        from torch.distributed.tensor import DTensor

        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in named.items()}

    def adapter_tensors(self, peft_model) -> dict[str, dict[str, torch.Tensor]] | None:
        """FSDP: each adapter's PEFT tensors gathered (every rank calls); otherwise None (the model
        saves itself)."""
        if not self.fsdp:
            return None
        self.reshard(peft_model)
        return {name: self.full_tensors(peft_model.get_adapter_state_dict(name)) for name in peft_model.peft_config}

    def write_adapter(self, peft_model, folder: Path, gathered: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """PEFT's files (rank 0 only): the live model's save_pretrained, or, under FSDP, the gathered
        tensors written the way save_pretrained writes them."""
        if gathered is None:
            peft_model.save_pretrained(folder)
            return
        from ..checkpoint import save_adapter_weights

        for name, sd in gathered.items():
            out = Path(folder) / name if name != "default" else Path(folder)
            save_adapter_weights(sd, str(out))
            peft_model.peft_config[name].replace(inference_mode=True).save_pretrained(str(out))

    def optimizer_state(self, model: nn.Module, opt) -> dict:
        """The optimizer's state keyed by parameter name with whole tensors (torch.distributed's
        state-dict API; full on rank 0): loadable under any world size, DDP or FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.reshard(model)
        return get_optimizer_state_dict(model, _raw(opt), options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))

    def load_optimizer_state(self, model: nn.Module, opt, saved: dict) -> None:
        state = saved.get("state", {})
        if state and isinstance(next(iter(state)), int):  # an older checkpoint: keyed by position
            if self.world > 1:
                raise DistributedError("this checkpoint's optimizer state is from an older slimtune (keyed by "
                                       "position); resume it with one process first, or with --resume-weights-only")
            _raw(opt).load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, _raw(opt), saved, options=StateDictOptions(full_state_dict=True))

    def copy_into(self, live: torch.Tensor, t: torch.Tensor) -> None:
        """A whole saved tensor into a live parameter (an FSDP shard takes its part)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            if isinstance(live, DTensor):
                live.copy_(distribute_tensor(t.to(live.dtype), live.device_mesh, live.placements))
            else:
                live.copy_(t)

    def write_info(self, folder: Path, batch_size: int) -> None:
        (folder / INFO).write_text(json.dumps({"world_size": self.world, "mode": self.mode,
                                               "batch_size_per_rank": batch_size,
                                               "global_micro_batch": batch_size * self.world}))

    def resume_batch(self, t: TrainConfig, ckpt: Path | None) -> TrainConfig:
        """The train config of this session: under another world size than the checkpoint's, the
        per-rank batch that keeps the run's global batch (so its steps, schedule and data order go
        on as they were)."""
        self.batch_size = t.batch_size
        if ckpt is None or not (ckpt / INFO).is_file():
            saved = {"world_size": 1, "global_micro_batch": t.batch_size}  # checkpoints before this file: 1 process
            if ckpt is None:
                return t
        else:
            saved = json.loads((ckpt / INFO).read_text())
        g, w0 = int(saved["global_micro_batch"]), int(saved["world_size"])
        if g == t.batch_size * self.world:
            return t
        if g % self.world:
            raise DistributedError(f"resume: the run's global batch is {g} examples per micro-batch ({w0} process(es) "
                                   f"x {g // max(w0, 1)}), which {self.world} processes cannot share evenly; resume "
                                   f"with a number of processes that divides {g}")
        self.batch_size = g // self.world
        self.note = (f"resume under {self.world} process(es) (the checkpoint was written by {w0}): batch_size "
                     f"{self.batch_size} per process keeps the run's global batch of {g}")
        return t.model_copy(update={"batch_size": self.batch_size})

    @staticmethod
    def hold_signals() -> None:
        """A peer is gone, the run is over: the launcher's SIGTERM to the survivors must not cut
        the message short (torchrun SIGKILLs after its grace period anyway)."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)

    def explain(self, e: BaseException, out: Path) -> DistributedError | None:
        """A collective that failed because a peer died or hung, as one message (None: another error)."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        text = str(e)
        lost = isinstance(e, getattr(dist, "DistError", ())) or any(
            k in text for k in ("Connection closed by peer", "Connection reset", "gloo", "NCCL", "timed out",
                                "Timed out", "Broken pipe", "Socket Timeout"))
        if not isinstance(e, RuntimeError) or not lost:
            return None
        from .rundir import checkpoints

        cks = checkpoints(out)
        kept = (f"the last checkpoint {cks[-1]} is intact; relaunch the same command with --resume to continue "
                "(with any number of processes)" if cks else "no checkpoint was written yet: relaunch the command")
        first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
        return DistributedError(f"rank {self.rank} of {self.world}: another process of this run stopped (killed, out "
                                f"of memory, or failed: its own output says which) or stopped answering within "
                                f"train.distributed_timeout={self.timeout_s} s, so this one stops too ({first}); "
                                f"{kept}")


def _raw(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer holds torch's


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    mods = [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]
    for m in mods:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_requires_gradient_sync(True, recurse=False)


def _items(batch: dict[str, torch.Tensor]) -> int:
    """What the model's mean loss divides by: label tokens after the causal shift, else rows."""
    lab = batch.get("labels")
    if lab is None:
        return 1
    if lab.ndim >= 2:
        return int((lab[:, 1:] != IGNORE).sum())
    return int(lab.numel())


def _leave_process_group() -> None:
    """At exit, leave the process group on every rank. A rank that exits with it still alive can
    abort in gloo's teardown ("terminate called without an active exception", SIGABRT: seen once
    in the suite), and the launcher then SIGTERMs the ranks still running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
