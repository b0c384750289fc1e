"""The search space: the YAML `search:` section, its defaults per task and method, and how a trial
draws one configuration from it.

    search:                          # every key optional; a value is fixed, a list is a choice,
      methods: [lora, dora]          #   {low, high, log} a range
      r: [4, 8, 16, 32]              # LoRA / DoRA rank
      alpha_over_r: [0.5, 1, 2, 4]   # lora_alpha = alpha_over_r * r (the scale alpha / r, searched directly)
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # default: per method, a decade each side of METHOD_LR
      targets: [attention, mlp, all-linear]        # by role, found in each block (targets.py)
      layers: [all, top_half]        # or top_third, bottom_half, a list of block indices
      dropout: [0.0, 0.1]
      rslora: [false, true]          # LoRA / DoRA: scale alpha/sqrt(r)
      mlp_r_factor: [1, 0.5, 2]      # rank pattern: the MLP linears' rank is r * this, attention's r
      # how the search runs
      metric: accuracy               # the objective (default: train.metric, else the task's own)
      max_trainable_pct: 1.0         # trials above it are pruned before they train
      pruner: sha                    # sha (successive halving) | hyperband | none
      rungs: 4                       # evaluations per trial (the rungs where pruning may stop it)
      warmup_trials: 2               # trials that must reach a rung before any is pruned there
      startup_trials: 4              # random trials before TPE models the results

Each method takes the keys `METHOD_KEYS` lists: LoRA / DoRA all of them; LoHa / LoKr the rank, scale,
targets, layers and rank pattern; VeRA, OFT and AdaLoRA the targets and layers (their own sizes from
`METHOD_DEFAULTS`); every other method its `METHOD_DEFAULTS` and a searched learning rate.

The rank pattern (PEFT's `rank_pattern` / `alpha_pattern`): with targets all-linear, the MLP linears
get rank round(r * mlp_r_factor) and the attention linears r, at the same alpha/r, so the search can
give the wider MLP matrices more (or less) of the parameter budget. It is drawn only for trials whose
targets hold both roles (all-linear); other trials do not draw it. Every mistake (a key that does not
exist, an empty choice, low > high, a key no listed method uses, a space of one point) is one
`SearchError` naming the key, before any trial runs.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..train.config import JobConfigError
from . import targets as T


class SearchError(JobConfigError):
    """A compare / search request that cannot run; the message names the setting and the fix."""


# ---- per-method defaults (compare uses them too) ----------------------------------------------------

# Learning-rate centre per method: the lr probe's grid and the search's default range sit around it.
# Why: adapters that start at zero (LoRA B, bottleneck up-projections) or learn a few vectors take
# large steps; methods that edit base weights in place (full, layerwise, heads) need small ones; soft
# prompts need the largest. Set from this repo's measured runs (README methods table: full 1e-4,
# layerwise 1e-3 / 2e-4, prompt 3e-2 / 1e-2, LoRA 5e-3 / 5e-4 on MiniLM / SmolLM2).
METHOD_LR = {"lora": 1e-3, "dora": 1e-3, "ia3": 3e-3, "bottleneck": 1e-3, "prefix": 1e-2, "prompt": 1e-2,
             "p_tuning": 1e-2, "bitfit": 1e-3, "layerwise": 2e-4, "sparse": 1e-3, "heads": 2e-4,
             "singular": 3e-3, "full": 3e-5,
             # LoHa / LoKr: LyCORIS's usual 1e-3 range for its low-rank factors; VeRA trains only scaling
             # vectors over frozen random projections (its paper: 1e-2 and up); OFT's rotations start at
             # the identity and take LoRA-sized steps; AdaLoRA is LoRA with SVD triplets
             "loha": 1e-3, "lokr": 1e-3, "vera": 1e-2, "oft": 1e-3, "adalora": 1e-3}
DEFAULT_LR = 1e-3  # a method not in the table (a plug-in)

# What each method trains with when compare / search do not set its keys: the usual choice for each,
# stated here so every table is reproducible (scripts/methods_table.py uses the same).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "heads": {"heads": [0, 1]},
    "layerwise": {"last_n": 2},
    "bottleneck": {"adapter_type": "houlsby"},
    "prefix": {"num_virtual_tokens": 20, "init_weights": "zero"},
    "prompt": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20},
    "vera": {"r": 256},  # shared frozen projections: a large rank costs no trained parameters
    "oft": {"oft_block_size": 32},
    "adalora": {"init_r": 12, "target_r": 8},  # PEFT's defaults; total_step is the run's (method_block)
}

LORA_LIKE = ("lora", "dora")  # methods with r, alpha, targets, layers, dropout
LORA_KEYS = ("r", "alpha_over_r", "targets", "layers", "dropout", "rslora", "mlp_r_factor")
# the searched keys of each method that takes targets; the others train with METHOD_DEFAULTS
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "lora": LORA_KEYS, "dora": LORA_KEYS,
    "loha": ("r", "alpha_over_r", "targets", "layers", "mlp_r_factor"),
    "lokr": ("r", "alpha_over_r", "targets", "layers", "mlp_r_factor"),
    "vera": ("targets", "layers"), "oft": ("targets", "layers"), "adalora": ("targets", "layers"),
}
BOTH_ROLES = T.ALL_LINEAR  # the target set with attention and MLP linears: where a rank pattern applies


# ---- the YAML section -----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    low: float
    high: float
    log: bool = False


class SearchSection(_Strict):
    methods: Optional[Union[str, list[str]]] = None
    r: Optional[Union[int, list[int], Range]] = None
    alpha_over_r: Optional[Union[float, list[float], Range]] = None
    lr: Optional[Union[float, list[float], Range]] = None
    targets: Optional[Union[str, list[str]]] = None
    layers: Optional[Union[str, list[Union[str, list[int]]]]] = None
    dropout: Optional[Union[float, list[float], Range]] = None
    rslora: Optional[Union[bool, list[bool]]] = None  # LoRA's scale alpha/sqrt(r) instead of alpha/r
    mlp_r_factor: Optional[Union[float, list[float], Range]] = None  # rank pattern: MLP rank = r * this
    metric: Optional[str] = None
    max_trainable_pct: Optional[float] = Field(None, gt=0, le=100)
    pruner: Literal["sha", "hyperband", "none"] = "sha"
    rungs: int = Field(4, ge=1, le=100)
    warmup_trials: int = Field(2, ge=0)
    startup_trials: Optional[int] = Field(None, ge=0)
    reduction_factor: int = Field(3, ge=2)


SPACE_KEYS = ("methods",) + LORA_KEYS + ("lr",)


def parse_section(raw: dict[str, Any] | None, source: str = "search") -> SearchSection:
    try:
        return SearchSection.model_validate(raw or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"] if not str(p).startswith(("list[", "float", "int", "str", "Range"))]
            key = ".".join(loc)
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(loc[-1], list(SearchSection.model_fields), n=1)
                hint = f"; did you mean 'search.{close[0]}'?" if close else ""
                lines.append(f"{source}: unknown key 'search.{key}'{hint} (keys: {', '.join(SearchSection.model_fields)})")
            else:
                lines.append(f"{source}: 'search.{key}' = {err.get('input')!r}: {err['msg']}")
        raise SearchError("\n".join(dict.fromkeys(lines))) from None


# ---- distributions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """One searched value: a fixed value, a choice among values, or a float / int range."""
    kind: Literal["fixed", "choice", "float", "int"]
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False

    def size(self) -> float:
        if self.kind == "fixed":
            return 1
        if self.kind == "choice":
            return len(self.values)
        return math.inf if self.kind == "float" else self.high - self.low + 1

    def describe(self) -> str:
        if self.kind == "fixed":
            return repr(self.values[0])
        if self.kind == "choice":
            return "{" + ", ".join(str(v) for v in self.values) + "}"
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def _dist(key: str, v: Any, kind: str, check) -> Dist:
    """A YAML value -> Dist, each value checked by `check(value) -> error or None`."""
    if isinstance(v, Range):
        if v.low > v.high:
            raise SearchError(f"search.{key}: low {v.low:g} is above high {v.high:g}; swap them")
        if v.log and v.low <= 0:
            raise SearchError(f"search.{key}: a log range needs low > 0 (got {v.low:g})")
        for x in (v.low, v.high):
            if (why := check(x)) is not None:
                raise SearchError(f"search.{key}: {x:g} {why}")
        if v.low == v.high:
            return Dist("fixed", (int(v.low) if kind == "int" else v.low,))
        if kind == "int":
            if v.low != int(v.low) or v.high != int(v.high):
                raise SearchError(f"search.{key}: an integer range needs whole numbers (got {v.low:g}..{v.high:g})")
            return Dist("int", low=int(v.low), high=int(v.high), log=v.log)
        return Dist("float", low=float(v.low), high=float(v.high), log=v.log)
    vals = v if isinstance(v, list) else [v]
    if not vals:
        raise SearchError(f"search.{key} is an empty list: give at least one value (or remove the key for the default)")
    out = []
    for x in vals:
        if (why := check(x)) is not None:
            raise SearchError(f"search.{key}: {x!r} {why}")
        x = tuple(x) if isinstance(x, list) else x
        if x not in out:
            out.append(x)
    return Dist("fixed", (out[0],)) if len(out) == 1 else Dist("choice", tuple(out))


def _positive(x):
    return None if isinstance(x, (int, float)) and x > 0 else "must be a number above 0"


def _rank(x):
    return None if isinstance(x, int) and not isinstance(x, bool) and x >= 1 else "must be a whole number >= 1"


def _bool(x):
    return None if isinstance(x, bool) else "must be true or false"


def _dropout(x):
    return None if isinstance(x, (int, float)) and 0 <= x < 1 else "must be in [0, 1)"


def _target_set(x):
    return None if x in T.TARGET_SETS else f"is not a target set; choose from {', '.join(T.TARGET_SETS)}"


def _layer_choice(x):
    if isinstance(x, str):
        return None if x in T.LAYER_CHOICES else f"is not a layer choice; use {', '.join(T.LAYER_CHOICES)} or a list of block indices"
    if isinstance(x, list) and x and all(isinstance(i, int) and i >= 0 for i in x):
        return None
    return "must be a layer choice or a non-empty list of block indices (0, 1, ...)"


# ---- the space ------------------------------------------------------------------------------------

@dataclass
class Space:
    """The validated space: the methods, and per method its distributions under their trial names."""
    methods: tuple[str, ...]
    per_method: dict[str, dict[str, Dist]]
    names: dict[tuple[str, str], str]  # (method, key) -> the parameter's name in the study
    section: SearchSection

    def size(self) -> float:
        """Distinct configurations; the rank pattern counts only under the targets that hold both roles."""
        total = 0.0
        for dists in self.per_method.values():
            rest = math.prod(d.size() for k, d in dists.items() if k not in ("targets", "mlp_r_factor"))
            t = dists.get("targets")
            sets = t.values if t is not None else ()
            pattern = dists["mlp_r_factor"].size() if "mlp_r_factor" in dists else 1
            total += rest * (sum(pattern if v == BOTH_ROLES else 1 for v in sets) if sets else 1)
        return total

    def describe(self) -> list[str]:
        lines = [f"methods: {', '.join(self.methods)}"]
        for m in self.methods:  # a parameter every method shares once, a per-method one with its method
            for k, d in self.per_method[m].items():
                name = self.names[(m, k)]
                only = [o for o in self.methods if k in self.per_method[o]]
                lines.append(f"{name}: {d.describe()}" + ("" if "[" in name or len(only) == len(self.methods)
                                                          else f" ({', '.join(only)})"))
        return list(dict.fromkeys(lines))

    def to_dict(self) -> dict[str, Any]:
        """What the study stores to recognise its own space on resume."""
        return {m: {self.names[(m, k)]: d.describe() for k, d in self.per_method[m].items()} for m in self.methods}

    # -- a trial's draw --
    def sample(self, trial) -> dict[str, Any]:
        """Draw one configuration (define-by-run: only the chosen method's keys are drawn)."""
        m = self.methods[0] if len(self.methods) == 1 else trial.suggest_categorical("method", list(self.methods))
        params: dict[str, Any] = {"method": m}
        for key, d in self.per_method[m].items():
            name = self.names[(m, key)]
            if key == "mlp_r_factor" and params.get("targets") != BOTH_ROLES:
                continue  # one role targeted: no pattern to draw (define-by-run keeps TPE's model clean)
            if d.kind == "fixed":
                v = d.values[0]
            elif d.kind == "choice":
                labels = [_label(x) for x in d.values]
                v = d.values[labels.index(trial.suggest_categorical(name, labels))]
            elif d.kind == "int":
                v = trial.suggest_int(name, int(d.low), int(d.high), log=d.log)
            else:
                v = trial.suggest_float(name, d.low, d.high, log=d.log)
            params[key] = list(v) if isinstance(v, tuple) else v
        return params


def _label(x: Any) -> Any:
    """A choice as Optuna stores it (None, bool, int, float or str): block-index lists as text."""
    return ",".join(str(i) for i in x) if isinstance(x, tuple) else x


def build_space(section: SearchSection, task: str, blocks: T.Blocks | None = None) -> Space:
    """The space of a validated section for a task: defaults filled in, contradictions refused."""
    from ..registry import all_methods

    known = all_methods()
    raw = section.methods if section.methods is not None else list(LORA_LIKE)
    methods = [raw] if isinstance(raw, str) else list(raw)
    if not methods:
        raise SearchError("search.methods is an empty list: name at least one method (e.g. [lora]) or remove the key")
    for m in methods:
        if m not in known:
            close = difflib.get_close_matches(m, sorted(known), n=1)
            raise SearchError(f"search.methods: unknown method {m!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (methods: {', '.join(sorted(known))})")
    methods = list(dict.fromkeys(methods))
    for k in LORA_KEYS:
        if getattr(section, k) is not None and not any(k in METHOD_KEYS.get(m, ()) for m in methods):
            users = [m for m, ks in METHOD_KEYS.items() if k in ks]
            raise SearchError(f"search.{k} applies to {' / '.join(users)} only, but search.methods is "
                              f"{methods}; add one of them to search.methods or remove search.{k}")
    from ..train.tasks import get_task

    gen = get_task(task).generates  # a language model: the top-third layer choice too
    lora: dict[str, Dist] = {
        "r": _dist("r", section.r if section.r is not None else [4, 8, 16, 32], "int", _rank),
        "alpha_over_r": _dist("alpha_over_r", section.alpha_over_r if section.alpha_over_r is not None else [1.0, 2.0, 4.0],
                              "float", _positive),
        "targets": _dist("targets", section.targets if section.targets is not None else list(T.TARGET_SETS), "str",
                         _target_set),
        # generation on CPU: the top third is the job's own default (the backward stops there)
        "layers": _dist("layers", section.layers if section.layers is not None else
                        (["all", "top_half", "top_third"] if gen else ["all", "top_half"]), "str", _layer_choice),
        "dropout": _dist("dropout", section.dropout if section.dropout is not None else [0.0, 0.1], "float", _dropout),
        # rsLoRA (Kalajdzievski 2023): at high rank alpha/r shrinks the update; PEFT's MetaMathQA table has
        # rsLoRA r=64 at 51.3% vs LoRA r=32 47.8%
        "rslora": _dist("rslora", section.rslora if section.rslora is not None else [False, True], "bool", _bool),
        # AdaLoRA's lesson (Zhang et al. 2023): the MLP matrices (wider) repay more rank than attention's; the
        # pattern lets the search find that without AdaLoRA's allocation, at the same alpha/r. 1 first: the
        # plain config is the warm start's
        "mlp_r_factor": _dist("mlp_r_factor", section.mlp_r_factor if section.mlp_r_factor is not None
                              else [1.0, 0.5, 2.0], "float", _positive),
    }
    if blocks is not None:
        for ts in lora["targets"].values:
            for ly in lora["layers"].values:
                try:
                    T.check(blocks, ts, list(ly) if isinstance(ly, tuple) else ly)
                except ValueError as e:
                    raise SearchError(f"search.targets / search.layers: {e}") from None
    per_method: dict[str, dict[str, Dist]] = {}
    for m in methods:
        c = METHOD_LR.get(m, DEFAULT_LR)
        lr = _dist("lr", section.lr, "float", _positive) if section.lr is not None else \
            Dist("float", low=c / 10, high=c * 10, log=True)
        per_method[m] = {**{k: lora[k] for k in METHOD_KEYS.get(m, ())}, "lr": lr}
    names: dict[tuple[str, str], str] = {}
    for m in methods:
        for k, d in per_method[m].items():
            shared = all(per_method[o].get(k) in (None, d) for o in methods)
            names[(m, k)] = k if shared else f"{k}[{m}]"
    space = Space(tuple(methods), per_method, names, section)
    if space.size() == 1:
        raise SearchError("the search space holds one configuration (" + "; ".join(space.describe()) + "): nothing to "
                          "search. Widen a key of the search: section (e.g. search.lr: {low: 1e-4, high: 1e-2, log: "
                          "true}), or use slimtune train for a single run")
    return space


def method_block(params: dict[str, Any], blocks: T.Blocks | None, total_steps: int | None = None) -> dict[str, Any]:
    """A trial's params -> the job's `method:` block (`total_steps`: the run's, for AdaLoRA's schedule)."""
    m = params["method"]
    if m not in METHOD_KEYS:
        return {"name": m, **METHOD_DEFAULTS.get(m, {})}
    layers = params["layers"]
    if blocks is None:
        raise SearchError("target sets need the model's block structure")
    out: dict[str, Any] = {"name": m, **METHOD_DEFAULTS.get(m, {}),
                           "target_modules": T.target_modules(blocks, params["targets"], layers)}
    if m == "adalora":
        if total_steps is None:
            raise SearchError("adalora's rank schedule needs the run's total steps")
        out["total_step"] = int(total_steps)
    if "r" not in params:
        return out
    r = int(params["r"])
    a = float(params["alpha_over_r"])
    out["r"] = r
    out["lora_alpha" if m in LORA_LIKE else "alpha"] = a * r
    if m in LORA_LIKE:
        out.update(lora_dropout=float(params["dropout"]), use_rslora=bool(params.get("rslora", False)))
    f = float(params.get("mlp_r_factor", 1.0))
    if f != 1.0 and params["targets"] == BOTH_ROLES:
        r_mlp = max(1, round(r * f))
        key = f"(?:{T.target_modules(blocks, 'mlp', layers)})"  # exact paths: never matches an attention linear
        out["rank_pattern"] = {key: r_mlp}
        out["alpha_pattern"] = {key: a * r_mlp}
    return out
