"""GRPO's reward functions, named in YAML (`train.rewards`), called TRL's way:

    fn(prompts=[...], completions=[...], **columns) -> one number per completion

where columns are the data's other columns (e.g. `answer`), one value per completion.

    exact_match            1.0 when the completion's first word (or the whole stripped text) equals
                           the row's `answer` (case-insensitive), else 0.0; {name: exact_match, column: ...}
    regex                  1.0 when `pattern` matches (re.search) the completion; {name: regex, pattern: ...}
    length                 -|words - target| / target: closest to `target` words scores 0 (the best)
    "package.module:func"  the user's own function (importable from the working directory)

A function that cannot be imported, raises, or returns something that is not one number per
completion is one RewardError naming it and the fix.
"""
from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import JobConfigError


class RewardError(JobConfigError):
    """A reward function that cannot be used; the message names it and the fix."""


def _norm(s: Any) -> str:
    return " ".join(str(s).strip().lower().split())


def exact_match(column: str = "answer") -> Callable[..., list[float]]:
    def exact_match(prompts, completions, **cols) -> list[float]:
        if column not in cols:
            raise RewardError(f"reward exact_match compares with the '{column}' column, which the data does not have "
                              f"(columns: {sorted(cols)}); add it or set {{name: exact_match, column: ...}}")
        out = []
        for c, a in zip(completions, cols[column]):
            words = re.findall(r"[\w'-]+", str(c).lower())
            out.append(float(_norm(c) == _norm(a) or (bool(words) and words[0] == _norm(a))))
        return out
    return exact_match


def regex(pattern: str) -> Callable[..., list[float]]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise RewardError(f"reward regex: pattern {pattern!r} is not a valid regular expression ({e})") from None

    def regex(prompts, completions, **cols) -> list[float]:
        return [float(rx.search(str(c)) is not None) for c in completions]
    return regex


def length(target: int = 8) -> Callable[..., list[float]]:
    if not isinstance(target, int) or target < 1:
        raise RewardError(f"reward length: target {target!r} must be a positive whole number of words")

    def length(prompts, completions, **cols) -> list[float]:
        return [-abs(len(str(c).split()) - target) / target for c in completions]
    return length


BUILTINS: dict[str, Callable[..., Callable]] = {"exact_match": exact_match, "regex": regex, "length": length}


def _import(spec: str) -> Callable:
    mod, _, fn = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        f = getattr(importlib.import_module(mod), fn)
    except ImportError as e:
        raise RewardError(f"reward '{spec}': module '{mod}' cannot be imported ({e}); put {mod}.py in the working "
                          "directory or install it") from None
    except AttributeError:
        raise RewardError(f"reward '{spec}': module '{mod}' has no function '{fn}'") from None
    if not callable(f):
        raise RewardError(f"reward '{spec}' is not a function")
    return f


def build(specs: list[str | dict[str, Any]]) -> list[tuple[str, Callable]]:
    """(name, function) per entry of train.rewards."""
    out = []
    for s in specs:
        kw = dict(s) if isinstance(s, dict) else {"name": s}
        name = str(kw.pop("name", ""))
        if ":" in name:
            if kw:
                raise RewardError(f"reward '{name}': a module:function reward takes no options (got {sorted(kw)})")
            out.append((name, _import(name)))
        elif name in BUILTINS:
            try:
                out.append((name, BUILTINS[name](**kw)))
            except TypeError as e:
                raise RewardError(f"reward {name}: {e}; see docs/objectives.md for its options") from None
        else:
            raise RewardError(f"reward {name!r} is not a built-in ({', '.join(BUILTINS)}) nor a 'module:function'; "
                              "name one of those")
    if not out:
        raise RewardError("train.rewards is empty: GRPO needs at least one reward function")
    return out


def score(funcs: list[tuple[str, Callable]], prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> torch.Tensor:
    """(N, F) rewards: one column per function, each checked (a number per completion)."""
    cols = []
    for name, f in funcs:
        try:
            r = f(prompts=prompts, completions=completions, **columns)
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code: say which function and what it raised
            raise RewardError(f"reward '{name}' raised {type(e).__name__}: {e}; fix the function (it is called as "
                              "fn(prompts=..., completions=..., **columns))") from None
        if not isinstance(r, (list, tuple)) or len(r) != len(completions):
            raise RewardError(f"reward '{name}' returned {type(r).__name__}"
                              + (f" of {len(r)}" if isinstance(r, (list, tuple)) else "")
                              + f"; it must return a list of {len(completions)} numbers, one per completion")
        bad = next((x for x in r if isinstance(x, bool) or not isinstance(x, (int, float))
                    or not math.isfinite(x)), "ok")
        if bad != "ok":
            raise RewardError(f"reward '{name}' returned {bad!r}, not a finite number; return one float per completion")
        cols.append(torch.tensor([float(x) for x in r], dtype=torch.float32))
    return torch.stack(cols, dim=1)
