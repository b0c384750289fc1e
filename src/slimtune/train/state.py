"""The trainer's resumable state on disk: checkpoints and the best adapter, written so that a process
killed at any instruction leaves either the old or the new version, never half of one.

    checkpoints/step-000120/     adapter/ (PEFT files), trainable.safetensors (every trained tensor),
                                 trainer_state.pt (optimizer, scheduler, RNG, history, times: tensors
                                 and plain data only, read back with weights_only=True), config.yaml
    best/                        the adapter at the best evaluation + best.json

Each is built in a `.tmp-*` folder and renamed into place; a folder it replaces is first renamed
aside (`.tmp-old-*`) and deleted after, so there is no moment without one. `rundir._recover` clears
what a killed process left. A mixin: it reads the trainer's model, optimizer, scheduler and fields.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import JobConfigError
from .rundir import checkpoints, write_config

KEEP = 2  # checkpoints kept (the newest two: one may be half-deleted by a kill during pruning)
STATE_KEYS = ("step", "best", "best_step", "bad_evals", "history", "before", "tokens_seen", "train_time",
              "elapsed", "sessions", "samples_before")


class CheckpointMismatch(JobConfigError):
    """A checkpoint whose tensors do not fit this model and method."""


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; the one it replaces goes aside first, then away."""
    aside = None
    if final.exists():
        aside = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.replace(final, aside)
    os.replace(tmp, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


class Checkpointing:
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor, whole (FSDP: gathered; every rank calls this)."""
        self.dist.reshard(self.model_unwrapped)
        return self.dist.full_tensors({n: p for n, p in self.model_unwrapped.named_parameters() if p.requires_grad})

    def _state(self, optimizer: dict) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": _numpy_rng_to_plain(np.random.get_state()),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        st = {k: getattr(self, k) for k in STATE_KEYS}
        st["elapsed"] = self.elapsed + (time.time() - self.session_t0)  # wall time of the run so far
        st["sessions"] = self.sessions + [self._session()]
        if self.clock_budget is not None:  # the length the budget re-planned (clock_budget.py), kept on resume
            st["budget_total_steps"] = self.total_steps
        return {**st, "optimizer": optimizer, "scheduler": self.sched.state_dict(), "rng": rng}

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        self.acc.wait_for_everyone()
        final = self.out / "checkpoints" / f"step-{self.step:06d}"
        # this step is saved already? (rank 0 looks; the others must take the same branch)
        done = self.dist.any(self.is_main and self.last_ckpt == final and final.is_dir())
        if not done:  # whole tensors keyed by name: gathered on every rank (FSDP), written by rank 0
            adapter, trained = self.dist.adapter_tensors(self.model_unwrapped), self._trainable_state()
            optimizer = self.dist.optimizer_state(self.model_unwrapped, self.opt)
        if self.is_main and not done:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{self.step:06d}-", dir=final.parent))
            self.dist.write_adapter(self.model_unwrapped, tmp / "adapter", adapter)
            save_file({n: t.contiguous() for n, t in trained.items()}, str(tmp / "trainable.safetensors"))
            torch.save(self._state(optimizer), tmp / "trainer_state.pt")
            write_config(self.cfg, tmp / "config.yaml")
            self.dist.write_info(tmp, self.t.batch_size)
            replace_dir(tmp, final)  # atomic: a killed run leaves either the old or the new checkpoint
            for old in checkpoints(self.out)[:-KEEP]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self.last_ckpt = final
        self.acc.wait_for_everyone()
        return final

    def save_adapter(self, folder: Path) -> None:
        """The adapter's PEFT files (+ labels) into folder: rank 0 writes (FSDP: all gather first)."""
        gathered = self.dist.adapter_tensors(self.model_unwrapped)
        if self.is_main:
            self.dist.write_adapter(self.model_unwrapped, folder, gathered)
            self._save_extras(folder)

    def save_best(self, value: float) -> None:
        gathered = self.dist.adapter_tensors(self.model_unwrapped)  # every rank (FSDP)
        if not self.is_main:
            return
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-best-", dir=self.out))
        self.dist.write_adapter(self.model_unwrapped, tmp, gathered)
        self._save_extras(tmp)
        (tmp / "best.json").write_text(json.dumps({"step": self.step, self.metric: value}))
        replace_dir(tmp, self.out / "best")

    def _save_extras(self, folder: Path) -> None:
        """What an adapter folder needs beyond PEFT's files to be used alone: the label names."""
        if self.data.labels:
            (folder / "labels.json").write_text(json.dumps(self.data.labels))

    def load_weights(self, path: Path) -> None:
        """The checkpoint's trained tensors into this model (names and shapes must match)."""
        from safetensors.torch import load_file

        saved = load_file(str(path / "trainable.safetensors"))
        live = dict(self.model_unwrapped.named_parameters())
        missing = [n for n, _ in self.params if n not in saved]
        if missing:
            raise CheckpointMismatch(f"checkpoint {path} does not fit this model and method: it has no tensor "
                                     f"'{missing[0]}' ({len(missing)} missing); resume with the model and method the "
                                     "run was started with, or choose a fresh output_dir")
        extra = [n for n in saved if n not in live]
        for n, t in saved.items():
            if n in live and live[n].shape != t.shape:
                raise CheckpointMismatch(f"checkpoint {path} does not fit this method: tensor '{n}' is {tuple(t.shape)} "
                                         f"there but {tuple(live[n].shape)} here (was method.r or the model changed?); "
                                         "resume with the method the run was started with, or choose a fresh "
                                         "output_dir")
        if extra:
            raise CheckpointMismatch(f"checkpoint {path} trains tensors this set-up does not have ('{extra[0]}', "
                                     f"{len(extra)} in all): was the method changed? resume with the config the run "
                                     "was started with, or choose a fresh output_dir")
        for n, t in saved.items():  # in file order on every rank (FSDP: each takes its shard)
            self.dist.copy_into(live[n], t)

    def load_checkpoint(self, path: Path) -> None:
        self.load_weights(path)
        st = torch.load(path / "trainer_state.pt", weights_only=True)  # tensors and plain data only
        self.dist.load_optimizer_state(self.model_unwrapped, self.opt, st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"]["torch"])
        random.setstate(st["rng"]["python"])
        np.random.set_state(_numpy_rng_from_plain(st["rng"]["numpy"]))
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        for k in STATE_KEYS:
            if k in st:  # checkpoints from before sessions/elapsed were kept lack them
                setattr(self, k, st[k])
        if self.clock_budget is not None and st.get("budget_total_steps"):
            self.total_steps = max(st["budget_total_steps"], self.step)
        self.last_ckpt = path
        self.resumed_at = self.step


def _numpy_rng_to_plain(state: tuple) -> list:
    """numpy's RNG state as tensors and numbers, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = state
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _numpy_rng_from_plain(state: list) -> tuple:
    kind, keys, pos, has_gauss, gauss = state
    return kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss
