"""The adapters a server knows, which of them are in memory, and where each one runs.

    base model (untouched) ─┬─ lane ("mix", lora): PeftModel over a view that shares the base's weights;
                            │      adapters that pass the mixed-batch probe run together, one forward
                            ├─ lane ("solo", lora): adapters with modules_to_save (each has its own head)
                            ├─ lane ("mix", prompt): prompt tuning etc.; the probe fails, one adapter per forward
                            └─ lane ("own", NAME): an in-place method (bitfit, full, ...): its own copy of the weights

A *lane* is one `PeftModel`; slimtune holds one method per PeftModel, so each method gets its lane.
Views share every parameter and buffer with the base model (`copy.deepcopy` with a memo of them),
so a lane costs only its adapters; in-place methods write into the weights, so they get a copy.

*Known* adapters (from --adapter, --adapters-dir, or /v1/load_lora_adapter) are what /v1/models lists;
at most `max_loaded` are *resident*; the least recently used unpinned one is evicted and loaded
again from its folder on its next request. Rows in the running batch pin their adapter.

Everything that touches a model runs on the engine thread (`Engine.call`); `list`/`get` may run
anywhere (a lock guards the table).
"""
from __future__ import annotations

import copy
import inspect
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from ..compat import cache_arg
from ..config import AdapterConfig
from ..methods.lora_layers import BASE_ADAPTER
from .paths import AdapterPathRefused, AdapterRoots

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class AdapterError(Exception):
    """Base of the registry's errors; the message says what and how to fix it."""


class AdapterNotFound(AdapterError):
    pass


class AdapterExists(AdapterError):
    pass


class AdapterRefused(AdapterError):
    """An API load from a path outside the allowed roots, or one that is not there (the same message)."""


class AdapterLoadError(AdapterError):
    """The folder exists but does not load into this base model (corrupt, other model, other task)."""


def shared_view(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose parameters and buffers are the very same tensors.

    Injecting adapters replaces modules of the copy only, so the base model stays as it was and a
    lane adds only its adapters' memory."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class Placement(NamedTuple):
    """Where a row runs: `key` names its batch (rows with equal keys share forwards)."""

    key: tuple
    model: nn.Module  # what the engine calls (the lane's transformers model, or the base)
    lane: "Lane | None"
    solo: str | None  # adapter to make active (a batch of its own); None: a mixed batch / the base
    offset: int  # virtual-token columns in front of every cached row (prompt-learning methods)
    cache_name: str  # the forward's name for the KV cache ('cache' or 'past_key_values')
    logits_to_keep: bool  # the forward can skip the LM head for all but the last position
    keep_by_index: bool  # and may be given that position as an index tensor (forward.ModelCall)


def _placement(key: tuple, model: nn.Module, lane, solo, offset: int) -> Placement:
    params = inspect.signature(model.forward).parameters
    cfg = getattr(model, "config", None)
    # Gemma 4's KV-shared layers skip every position but the kept ones for an int logits_to_keep only
    cfgs = (cfg, getattr(cfg, "text_config", None))
    kv_shared = any(getattr(c, "num_kv_shared_layers", 0) for c in cfgs if c is not None)
    return Placement(key, model, lane, solo, offset, cache_arg(model) or "past_key_values", "logits_to_keep" in params,
                     not kv_shared)


class Lane:
    """One PeftModel (one method) over a view or a copy of the base model."""

    def __init__(self, peft, key: tuple) -> None:
        self.peft = peft
        self.tuner = peft.base_model
        self.hf = self.tuner.model
        self.key = key
        self.rows = 0  # rows of the running batch that use this lane (base rows included)
        self.active = peft.active_adapter
        self.mixed = _placement(("mix", id(self)), self.hf, self, None, 0)

    def activate(self, name: str) -> None:
        if self.active != name:
            self.peft.set_adapter(name)
            self.active = name

    def names(self) -> list[str]:
        return list(self.peft.peft_config)

    def order(self) -> dict[str, int]:
        """{adapter: its place among the lane's adapters}: the order of the slots in the layers'
        stacks of every adapter (load order), which the engine keeps a mixed batch's rows in."""
        return {n: i for i, n in enumerate(self.peft.peft_config)}


@dataclass
class Entry:
    name: str
    path: str
    source: str  # "cli", "dir" or "api"
    created: int = field(default_factory=lambda: int(time.time()))
    method: str | None = None
    resident: bool = False
    mixable: bool = False  # passed the probe: runs in the lane's mixed batch
    offset: int = 0
    pins: int = 0
    last_used: float = 0.0
    doomed: bool = False  # unloaded while pinned: deleted when its last row leaves
    lane: Lane | None = None
    solo: Placement | None = None
    uid: int = 0  # new at every load: the prefix cache's key for this adapter's KV


class Registry:
    def __init__(self, base: nn.Module, base_name: str, max_loaded: int = 16, adapters_dir: str | None = None,
                 allow_paths: list[str] | tuple[str, ...] = (), text: bool = True) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded}: at least one adapter must fit in memory")
        self.base = base.eval()
        self.base_name = base_name
        self.max_loaded = max_loaded
        self.adapters_dir = adapters_dir
        # a text base: CAUSAL_LM adapters, rows mixed in a batch when the probe passes; a speech base
        # (speech.py): its task's adapters (no PEFT task_type), one adapter per forward
        self.text = text
        # what API loads may read (symlinks resolved): --adapters-dir, then each --allow-adapter-path
        self.roots = AdapterRoots([adapters_dir or "", *allow_paths])
        self._entries: dict[str, Entry] = {}
        self._hidden: set[str] = set()  # --adapters-dir folders unloaded through the API
        self._broken: dict[str, float] = {}  # dir folder -> mtime of a config that failed to load
        self._lanes: dict[tuple, Lane] = {}
        self._lock = threading.RLock()
        self.plain = _placement(("base",), self.base, None, None, 0)
        self.loads = self.evictions = 0  # counters for /metrics
        self._uids = itertools.count(1)  # 0 is the base model
        # bumped at every load and drop (attempted or done): the only ways a served adapter's weights
        # change. Mixed batches pass it to the LoRA layers (tuner.mixed_batch's weights_epoch), which
        # then reuse their stacks without checking every adapter tensor at each new batch
        self.generation = 0

    # ---- any thread ---------------------------------------------------------------------------
    def list(self) -> list[Entry]:
        """Every adapter a request may name now, in name order (dir folders found at call time)."""
        with self._lock:
            if self.adapters_dir and os.path.isdir(self.adapters_dir):
                for name in sorted(os.listdir(self.adapters_dir)):
                    self._discover(name)
            return sorted((e for e in self._entries.values() if not e.doomed), key=lambda e: e.name)

    def get(self, name: str) -> Entry | None:
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                e = self._discover(name)
            return None if e is None or e.doomed else e

    def _discover(self, name: str) -> Entry | None:
        if name in self._entries or name in self._hidden or not self.adapters_dir:
            return self._entries.get(name)
        if not NAME_RE.match(name) or "/" in name or name.startswith("."):
            return None
        path = os.path.join(self.adapters_dir, name)
        cfg = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(cfg) or self._broken.get(path) == os.path.getmtime(cfg):
            return None
        e = self._entries[name] = Entry(name, path, "dir")
        return e

    def resident_count(self) -> int:
        with self._lock:
            return sum(e.resident for e in self._entries.values())

    # ---- engine thread ------------------------------------------------------------------------
    def add(self, name: str, path: str, source: str = "cli") -> Entry:
        """Register and load now (so a bad folder is an error here, not at the first request). A path
        from the API must lie inside the allowed roots (paths.py); the operator's --adapter need not."""
        self.check_name(name)
        with self._lock:
            if self.get(name) is not None:
                raise AdapterExists(f"an adapter named '{name}' is already loaded; unload it first or pick another name")
            if source == "api":
                try:
                    path = self.roots.resolve(path)
                except AdapterPathRefused as e:
                    raise AdapterRefused(str(e)) from None
            elif not os.path.isdir(path):
                raise AdapterLoadError(f"adapter folder '{path}' does not exist on the server")
            e = Entry(name, os.path.abspath(path), source)
            self._load(e)  # raises: nothing registered, the served set is as it was
            self._entries[name] = e
            self._hidden.discard(name)
            self._evict(keep=e)
            return e

    def remove(self, name: str) -> None:
        with self._lock:
            e = self.get(name)
            if e is None:
                raise AdapterNotFound(f"no adapter named '{name}' is loaded")
            if e.source == "dir":
                self._hidden.add(name)
            if e.pins:
                e.doomed = True  # its running rows finish first
            else:
                self._drop(e)
                del self._entries[name]

    def check_name(self, name: str) -> None:
        if not NAME_RE.match(name) or name in (BASE_ADAPTER, self.base_name):
            raise AdapterError(f"adapter name '{name}' is not allowed: use letters, digits and ._:/@+- (at most 128), "
                               f"not the base model's name '{self.base_name}'")

    def acquire(self, name: str) -> Placement | None:
        """Pin the row's adapter (loading it if needed) and say where it runs; None when every
        resident adapter is pinned and none can be evicted yet (the request waits)."""
        with self._lock:
            if name == BASE_ADAPTER:
                pl = self._base_placement()
                if pl.lane is not None:
                    pl.lane.rows += 1
                return pl
            e = self.get(name)
            if e is None:
                raise AdapterNotFound(f"no adapter named '{name}'")
            if not e.resident:
                if self.resident_count() >= self.max_loaded and not self._evictable(None):
                    return None
                try:
                    self._load(e)
                except AdapterLoadError:
                    if e.source == "dir":  # hide it until its config changes; the served set is as before
                        self._broken[e.path] = os.path.getmtime(os.path.join(e.path, "adapter_config.json"))
                        del self._entries[name]
                    raise
                self._evict(keep=e)
            e.pins += 1
            e.last_used = time.monotonic()
            e.lane.rows += 1
            return e.lane.mixed if e.mixable else e.solo

    def owner(self, name: str) -> int:
        """Who computed a row's KV: 0 for the base, else the adapter's load id (engine thread, pinned)."""
        if name == BASE_ADAPTER:
            return 0
        e = self._entries.get(name)
        return e.uid if e is not None else -1

    def release(self, name: str, pl: Placement) -> None:
        with self._lock:
            if pl.lane is not None:
                pl.lane.rows -= 1
            if name != BASE_ADAPTER:
                e = self._entries.get(name)
                if e is not None:
                    e.pins -= 1
                    if e.doomed and e.pins == 0:
                        self._drop(e)
                        del self._entries[name]
            if pl.lane is not None:
                self._maybe_close(pl.lane)

    def _base_placement(self) -> Placement:
        """Base rows join a lane's mixed batch (as "__base__" rows) when one exists, else the plain base."""
        for lane in self._lanes.values():
            if lane.key[0] == "mix" and any(e.mixable and e.lane is lane for e in self._entries.values()):
                return lane.mixed
        return self.plain

    def _evictable(self, keep: Entry | None) -> list[Entry]:
        return sorted((e for e in self._entries.values() if e.resident and e.pins == 0 and e is not keep),
                      key=lambda e: e.last_used)

    def _evict(self, keep: Entry) -> None:
        while self.resident_count() > self.max_loaded:
            cands = self._evictable(keep)
            if not cands:
                return
            self._drop(cands[0])
            self.evictions += 1

    def _drop(self, e: Entry) -> None:
        """Take a resident adapter out of memory (it stays known unless the caller removes it)."""
        if not e.resident:
            return
        self.generation += 1
        lane = e.lane
        lane.peft.delete_adapter(e.name)
        lane.active = lane.peft.active_adapter if lane.names() else None
        e.resident, e.lane, e.solo = False, None, None
        self._maybe_close(lane)

    def _maybe_close(self, lane: Lane) -> None:
        if not lane.names() and lane.rows == 0 and self._lanes.get(lane.key) is lane:
            del self._lanes[lane.key]

    def _load(self, e: Entry) -> None:
        from ..methods._prompt_common import PromptLearningConfig
        from ..methods._select import InPlaceTuner
        from ..model import PeftModel
        from ..registry import get_method

        self.generation += 1  # before anything: a failed load scrubs what it added, a change all the same
        try:
            cfg = AdapterConfig.from_pretrained(e.path)
            spec = get_method(cfg.method)
            if cfg.task_type not in ((None, "CAUSAL_LM") if self.text else (None,)):
                raise AdapterLoadError(f"adapter '{e.name}' is a {cfg.task_type} adapter; this server "
                                       + ("generates text and serves CAUSAL_LM adapters only" if self.text else
                                          "transcribes speech and serves its speech base's adapters only"))
            inplace = issubclass(spec.tuner_cls, InPlaceTuner)
            # a layer holds either DoRA or plain LoRA adapters (dora.py), so DoRA gets a lane of its own
            variant = "dora" if getattr(cfg, "use_dora", False) else ""
            kind = "solo" if getattr(cfg, "modules_to_save", None) else "mix"
            key = ("own", e.name) if inplace else (kind, spec.name, variant)
            lane = self._lanes.get(key)
            if lane is None:
                view = copy.deepcopy(self.base) if inplace else shared_view(self.base)
                peft = PeftModel.from_pretrained(view, e.path, adapter_name=e.name)
                lane = Lane(peft.eval(), key)
            else:
                try:
                    lane.peft.load_adapter(e.path, adapter_name=e.name)
                except Exception:
                    _scrub(lane, e.name)
                    raise
                lane.peft.eval()
        except AdapterLoadError:
            raise
        except Exception as err:  # noqa: BLE001 - the boundary: any failure leaves the served set as it was
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise AdapterLoadError(f"adapter '{e.name}' at {e.path} could not be loaded: {msg}") from err
        self._lanes[key] = lane
        e.method, e.lane, e.resident = spec.name, lane, True
        e.offset = cfg.total_virtual_tokens if isinstance(cfg, PromptLearningConfig) else 0
        e.mixable = self.text and key[0] == "mix" and probe_mixable(lane, e.name)
        e.solo = _placement(("solo", id(lane), e.name), lane.hf, lane, e.name, e.offset)
        e.uid = next(self._uids)
        self.loads += 1


def _scrub(lane: Lane, name: str) -> None:
    """Remove whatever a failed load left of `name` in the lane (an injection can fail half-way)."""
    from ..inject import adapter_layers, save_wrappers

    if name in lane.peft.peft_config:
        lane.peft.delete_adapter(name)
    for _, m in list(adapter_layers(lane.hf)) + list(save_wrappers(lane.hf)):
        m.delete_adapter(name)
    lane.active = None  # set again before the next solo forward


def probe_mixable(lane: Lane, name: str) -> bool:
    """Whether `name` runs correctly as rows of a mixed batch: a 2-row mixed forward [name, base]
    must give what the adapter alone and the base alone give. Methods that refuse mixed batches
    (prompt learning, IA3, DoRA, ...) raise here and are served one adapter per forward."""
    vocab = int(getattr(getattr(lane.hf, "config", None), "vocab_size", 8) or 8)
    ids = (torch.arange(1, 5) % vocab).expand(2, 4).to(next(lane.hf.parameters()).device)
    with torch.no_grad():
        try:
            with lane.tuner.mixed_batch([name, BASE_ADAPTER]):
                mixed = lane.hf(input_ids=ids, use_cache=False).logits.float()
        except (ValueError, NotImplementedError, RuntimeError, TypeError):
            return False
        lane.activate(name)
        alone = lane.hf(input_ids=ids[:1], use_cache=False).logits.float()
        with lane.tuner.disable_adapter():
            base = lane.hf(input_ids=ids[:1], use_cache=False).logits.float()
    tol = 1e-3 * float(base.abs().max()) + 1e-5
    return bool((mixed[0] - alone[0]).abs().max() <= tol and (mixed[1] - base[0]).abs().max() <= tol)
