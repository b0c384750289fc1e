"""The scheduler: one thread owns the model and runs continuous batching across adapters.

    submit() ─► waiting (FIFO, at most max_queue; else QueueFull -> 429)
                  │ on an idle engine, gathered while more keep arriving (admit_gap_ms / admit_wait_ms)
                  │ admitted at the next step while rows < max_batch and the prefill budget lasts
                  ▼
    every step:  run queued calls (adapter load/unload) ─► drop cancelled / timed-out rows
                 ─► prefill the admitted rows (one forward per batch they join) and join them
                 ─► one decode forward per running batch ─► drop finished rows ─► deliver tokens

A *batch* holds the rows that can share forwards (`Placement.key`): every mixable adapter of a
lane plus the base model's rows (as "__base__" rows, LoRA's mixed-batch path), or the rows of one
adapter that must run alone (modules_to_save, prompt learning, IA3, ...). Each batch keeps its
KV cache left-padded (kvcache.py): a row that finishes or whose client went away leaves at the
next step by index selection; new rows are prefilled by themselves and joined at the next decode
step, the rows of a mixed batch kept in the order of their lane's adapters (batch.py; the LoRA layers then
read their stack of adapters in place). Sampling, masks and positions are tensor ops over the batch; the Python per row is only the
hand-off of its token.

Tokens reach the HTTP side through `Handle`: the engine thread hands each asyncio loop all of a
step's events in one `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import kvcache
from .batch import Batch, Row, in_slot_order, left_pad
from .config import ServeConfig
from .handles import EngineStopped, Event, GenRequest, Handle, QueueFull  # noqa: F401 - re-exported
from .forward import ModelCall
from .prefix_cache import PrefixCache, prefix_tensors
from .registry import AdapterError, Registry
from . import logprobs, openmp, sampling

log = logging.getLogger("slimtune.serve")


class Engine:
    def __init__(self, registry: Registry, cfg: ServeConfig, eos_ids: list[int], pad_id: int, metrics=None) -> None:
        self.registry, self.cfg, self.metrics = registry, cfg, metrics
        self.device = next(registry.base.parameters()).device
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        self.pad_id = pad_id
        self.prefix = PrefixCache(cfg.prefix_cache_tokens, cfg.prefix_block)
        self._waiting: deque[Handle] = deque()
        self._ops: list[tuple[Callable[[], Any], Future]] = []
        self._batches: dict[tuple, Batch] = {}
        self._cv = threading.Condition()
        self.forward = ModelCall(registry, cfg, self.device)  # a batch's forward, on the model its rows are placed on
        self._out: list[tuple[Handle, Event]] = []
        self._thread: threading.Thread | None = None
        self._users = 0
        self._stopping = False
        self._checked_layout = False

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Start the engine thread; counted, so an app's lifespan and its owner can both start and
        stop it (the thread ends at the last stop)."""
        with self._cv:
            self._users += 1
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stopping = False
            if self.cfg.dedicated_cpus and not openmp.release_pool():  # the loading thread's OpenMP workers
                # go, so only the engine's spin (openmp.py); said, not silent, where that cannot be done
                log.warning("--dedicated-cpus did nothing: this process's OpenMP runtime is not libgomp or "
                            "cannot pause its threads (omp_pause_resource_all), so the loading thread's "
                            "workers stay; leave the flag off here")
            self._thread = threading.Thread(target=self._run, name="slimtune-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._users = max(self._users - 1, 0)
            if self._users:
                return
            self._stopping = True
            self._cv.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop | None = None, sink: Any = None,
               tag: int = 0) -> Handle:
        """Queue a request (any thread). With `loop`, events arrive on an asyncio.Queue (`sink` if
        given) as (tag, Event); without, on a thread-safe queue (`Handle.result()`)."""
        h = Handle(req, self, loop, sink, tag)
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.cfg.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.cfg.max_queue})")
            self._waiting.append(h)
            self._cv.notify_all()
        return h

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the engine thread between two steps (what changes the model goes through here)."""
        fut: Future = Future()
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            self._ops.append((fn, fut))
            self._cv.notify_all()
        return fut

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return sum(len(b.rows) for b in list(self._batches.values()))

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # this thread only; adapters are frozen for serving
        while True:
            with self._cv:
                while not (self._stopping or self._ops or self._waiting or self._batches):
                    self._cv.wait(timeout=1.0)
                if self._stopping:
                    break
            try:
                busy = self._step()
            except Exception as e:  # noqa: BLE001 - a bug must not take the server down: fail the rows
                log.exception("engine step failed")
                self._fail_all(e)
                busy = True
            self._flush()
            if not busy:  # waiting rows that cannot start yet (every adapter slot pinned)
                time.sleep(0.005)
        self.forward.exit()
        self._fail_all(EngineStopped("the server is shutting down"), finish="cancelled")
        self._flush()

    def _gather(self) -> None:
        """A new wave: with no row running, wait while requests keep arriving (each within
        `admit_gap_ms` of the one before, `admit_wait_ms` in all), so clients answered in the same
        step, who come back within a few ms of one another, share one prefill and one new batch
        rather than the first alone one step ahead of the rest. Running rows are never held up (with
        rows running, the step itself gathers what arrives during it), nor is a full batch, a queued
        model change or a shutdown."""
        gap, most = self.cfg.admit_gap_ms / 1e3, self.cfg.admit_wait_ms / 1e3
        if gap <= 0 or most <= 0 or self._batches:
            return
        end = time.perf_counter() + most
        with self._cv:
            n = len(self._waiting)
            while 0 < n < self.cfg.max_batch and not (self._ops or self._stopping):
                left = end - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(min(gap, left))
                if len(self._waiting) == n:
                    break  # nobody came within the gap: the wave is in
                n = len(self._waiting)

    def _step(self) -> bool:
        self._gather()
        t0 = time.perf_counter()
        with self._cv:
            ops, self._ops = self._ops, []
        for fn, fut in ops:
            self.forward.exit()  # a model change must not happen under a mixed batch
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)
        self._reap()
        admitted = self._admit()
        rows = 0
        for key in list(self._batches):
            b = self._batches[key]
            if b.rows:
                rows += len(b.rows)
                self._run_batch(b, self._decode)
            if not b.rows:
                del self._batches[key]
        if self.metrics is not None:
            self.metrics.engine_step(rows, time.perf_counter() - t0 if rows else None, len(self._waiting),
                                     self.running(), self.registry.resident_count())
        return bool(ops or admitted or rows)

    def _run_batch(self, b: Batch, fn, *args) -> None:
        try:
            fn(b, *args)
        except Exception as e:  # noqa: BLE001 - this batch fails, the others and the server go on
            log.exception("batch %s failed", b.pl.key)
            self.forward.exit()
            for r in b.rows:
                self._finish(r, Event([], "error", e))
            b.rows, b.names, b.cache = [], [], None

    def _reap(self) -> None:
        now = time.perf_counter()
        with self._cv:
            gone = [h for h in self._waiting if h.cancelled or (h.deadline and now > h.deadline)]
            for h in gone:
                self._waiting.remove(h)
        for h in gone:
            self._out.append((h, Event([], "cancelled" if h.cancelled else "timeout")))
        for b in self._batches.values():
            drop = [r.handle.cancelled or bool(r.handle.deadline and now > r.handle.deadline) for r in b.rows]
            if any(drop):
                for r, d in zip(b.rows, drop):
                    if d:
                        self._finish(r, Event([], "cancelled" if r.handle.cancelled else "timeout"))
                b.keep(torch.tensor([not d for d in drop], device=self.device))

    def _admit(self) -> int:
        room = self.cfg.max_batch - self.running()
        with self._cv:
            cands = list(self._waiting)[: max(room, 0) * 4]
        new: dict[tuple, list[Row]] = {}
        budget, taken = self.cfg.prefill_tokens, 0
        for h in cands:
            if room <= 0 or (taken and len(h.req.prompt) > budget) or (taken and h.req.echo):
                break  # (an echo row prefills alone: its forward keeps every position's logits, (S, V))
            try:
                pl = self.registry.acquire(h.req.adapter)
            except AdapterError as e:
                with self._cv:
                    self._waiting.remove(h)
                self._out.append((h, Event([], "error", e)))
                continue
            if pl is None:
                continue  # no adapter slot free yet: stays in the queue, in order
            with self._cv:
                self._waiting.remove(h)
            new.setdefault(pl.key, []).append(Row(h, pl, self.device))
            room, budget, taken = room - 1, budget - len(h.req.prompt), taken + 1
            if h.req.echo:
                break
        for key, rows in new.items():
            b = self._batches.get(key)
            if b is None:
                b = self._batches[key] = Batch(rows[0].placement)
            try:
                self._prefill(b, rows)
            except Exception as e:  # noqa: BLE001 - this batch fails, the others and the server go on
                log.exception("prefill of batch %s failed", key)
                self.forward.exit()
                for r in b.rows + [r for r in rows if all(r is not x for x in b.rows)]:
                    self._finish(r, Event([], "error", e))
                b.rows, b.names, b.cache = [], [], None
        return taken

    def _prefill(self, b: Batch, rows: list[Row]) -> None:
        from transformers import DynamicCache

        pl = b.pl
        rows = in_slot_order(pl, rows, [r.req.adapter for r in rows])
        # reuse cached prefix blocks (not with virtual tokens in front: their cache columns differ)
        use_pc = pl.offset == 0 and self.prefix.max_tokens > 0
        owners = [self.registry.owner(r.req.adapter) for r in rows]
        # an echo row needs logits at every prompt position: it computes its whole prompt
        found = [self.prefix.lookup(o, r.req.prompt) if use_pc and not r.req.echo else [] for o, r in zip(owners, rows)]
        cached = [len(f) * self.prefix.block for f in found]
        suffixes = [torch.tensor(r.req.prompt[c:], dtype=torch.long) for r, c in zip(rows, cached)]
        ids = left_pad(suffixes, self.pad_id).to(self.device)  # (B2, S)
        mask = left_pad([torch.ones_like(p) for p in suffixes], 0).to(self.device)
        cache = DynamicCache(config=pl.model.config)
        if any(cached):
            kv, pmask = prefix_tensors(found)  # (B2, H, P, D) per layer, (B2, P)
            for li, (k, v) in enumerate(kv):
                cache.update(k, v, li)
            mask = torch.cat([pmask, mask], dim=1)  # (B2, P + S): holes where a row's prefix is shorter
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)[:, -ids.shape[1]:]  # padding does not shift positions
        names = [r.req.adapter for r in rows]
        full = any(r.req.echo for r in rows)
        logits, cache = self.forward(pl, names, ids, mask, pos, cache, full=full)
        if self.metrics is not None:
            self.metrics.prefill_rows.observe(len(rows))
        plps = None
        if full:  # prompt log-probs of the echo rows: each prompt fills the last len(prompt) columns
            lg = logits[:, -ids.shape[1]:]
            plps = [logprobs.prompt_entries(lg[i, lg.shape[1] - len(r.req.prompt):], r.req.prompt, r.req.logprobs or 0)
                    if r.req.echo else None for i, r in enumerate(rows)]
            logits = lg[:, -1]
        if use_pc:
            width = mask.shape[1]
            for i, (o, r, c) in enumerate(zip(owners, rows, cached)):
                self.prefix.insert(o, r.req.prompt, c, cache, i, width - (len(r.req.prompt) - c))
            self.prefix.hit_tokens += sum(cached)
        self.prefix.computed_tokens += sum(len(x) for x in suffixes)
        if not self._checked_layout:
            kvcache.check_layout(cache)
            self._checked_layout = True
        dev = self.device
        t = sampling.row_state([r.req for r in rows], logits.shape[-1], dev)
        t.update({"n_gen": torch.ones(len(rows), dtype=torch.long, device=dev),
                  "max_new": torch.tensor([r.req.max_tokens for r in rows], device=dev),
                  "eos_ok": torch.tensor([not r.req.ignore_eos for r in rows], device=dev)})
        tok, forced, lps = sampling.choose(logits, t, [r.req for r in rows],
                                           [r.gen for r in rows if r.req.temperature > 0] or None)
        t["last"] = tok  # (B2,)
        now = time.perf_counter()
        for r in rows:
            r.handle.t_first = now
        # join: the new rows after the running ones, both caches ending on the same column
        if b.cache is None:
            b.cache, b.mask, b.t = cache, mask, t
        else:
            pad_old = kvcache.join(b.cache, cache, pl.offset)
            b.mask = torch.cat([F.pad(b.mask, (pad_old, 0)), F.pad(mask, (b.mask.shape[1] + pad_old - mask.shape[1], 0))])
            b.t = sampling.cat_rows(b.t, t)
        b.rows += rows
        b.names += names
        self._emit(b, len(b.rows) - len(rows), lps, plps, forced)
        b.put_in_slot_order()

    def _decode(self, b: Batch) -> None:
        n = len(b.rows)
        mask = torch.cat([b.mask, b.mask.new_ones(n, 1)], dim=1)  # (B, T+1)
        pos = mask.sum(dim=1, keepdim=True) - 1  # (B, 1)
        logits, b.cache = self.forward(b.pl, b.names, b.t["last"][:, None], mask, pos, b.cache)
        if self.metrics is not None:
            self.metrics.batch_adapters.observe(len(set(b.names)))
        b.mask = mask
        b.t["last"], forced, lps = sampling.choose(logits, b.t, [r.req for r in b.rows], b.generators())
        b.t["n_gen"] += 1
        self._emit(b, 0, lps, None, forced)

    def _emit(self, b: Batch, start: int, lps: list | None = None, plps: list | None = None,
              forced: list[bool] | None = None) -> None:
        """Hand rows[start:] their new token (and log-probs, prompt log-probs when asked); rows that
        hit EOS or max_tokens, or whose grammar is complete (`forced`), leave the batch."""
        t = {k: v[start:] for k, v in b.t.items()}
        tok = t["last"]
        eos = torch.isin(tok, self.eos) & t["eos_ok"]
        if forced is not None:
            eos = eos | torch.tensor(forced, device=self.device)
        done = eos | (t["n_gen"] >= t["max_new"])
        toks, dn, es = tok.tolist(), done.tolist(), eos.tolist()
        n = len(toks)
        for j, (r, tk, d, e) in enumerate(zip(b.rows[start:], toks, dn, es)):
            ev = Event([tk], ("stop" if e else "length") if d else None,
                       logprobs=[lps[j]] if lps is not None and lps[j] is not None else None,
                       prompt_logprobs=plps[j] if plps is not None and j < n else None)
            if d:
                self._finish(r, ev)
            else:
                self._out.append((r.handle, ev))
        if any(dn):
            keep = torch.cat([torch.ones(start, dtype=torch.bool, device=self.device), ~done])
            b.keep(keep)

    def _finish(self, r: Row, ev: Event) -> None:
        self._out.append((r.handle, ev))
        self.registry.release(r.req.adapter, r.placement)

    def _fail_all(self, e: BaseException, finish: str = "error") -> None:
        self.forward.exit()
        for b in self._batches.values():
            for r in b.rows:
                self._finish(r, Event([], finish, e if finish == "error" else None))
        self._batches.clear()
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for h in waiting:
            self._out.append((h, Event([], finish, e if finish == "error" else None)))

    def _flush(self) -> None:
        """Deliver this step's events: one call_soon_threadsafe per event loop."""
        out, self._out = self._out, []
        by_loop: dict[Any, list[tuple[Handle, Event]]] = {}
        for h, ev in out:
            if h.loop is None:
                h.queue.put((h.tag, ev))
            else:
                by_loop.setdefault(h.loop, []).append((h, ev))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed (server shut down)
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[Handle, Event]]) -> None:
    for h, ev in items:
        h.queue.put_nowait((h.tag, ev))
