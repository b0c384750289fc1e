"""Adapter configs: typed dataclasses that read and write PEFT's `adapter_config.json`.

Every method's config subclasses `AdapterConfig`. Field names follow HF PEFT so a config file
moves between the two libraries unchanged; keys this version does not know are dropped with a
warning that names them (a newer file must not crash an older reader).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .peft_types import PeftType

CONFIG_NAME = "adapter_config.json"
ANY = object()  # marks PEFT metadata fields whose value never matters


class ConfigError(ValueError):
    """A config value or file that cannot be used; the message says which and how to fix it."""


@dataclass
class AdapterConfig:
    """Fields every method shares (PEFT's `PeftConfig`)."""

    peft_type: ClassVar[PeftType | str] = ""  # PEFT's type (an enum; .value is written to disk: "LORA", ...)
    method: ClassVar[str] = ""  # slimtune's short name ("lora", ...), the registry key
    # Keys slimtune adds that PEFT does not know: only written when set, so PEFT reads our files.
    slimtune_only: ClassVar[tuple[str, ...]] = ()
    # PEFT fields slimtune does not implement -> the value at which they change nothing
    # (ANY: metadata that never matters). At that value they load silently; otherwise loading
    # fails, since the adapter would compute something else here.
    peft_only: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None  # CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, ...: picks default heads
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False  # True freezes the adapter (what PEFT writes on save)

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that add inputs (prompt, P-, prefix tuning) instead of swapping layers."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:  # PEFT's flag; slimtune has no adaption-prompt method
        return False

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in self.slimtune_only and v in (None, [], {}, ()):
                continue
            if isinstance(v, (set, tuple)):
                v = sorted(v) if isinstance(v, set) else list(v)
            out[f.name] = v
        out["peft_type"] = getattr(self.peft_type, "value", self.peft_type)
        if isinstance(out.get("task_type"), enum.Enum):
            out["task_type"] = out["task_type"].value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config", strict: bool = False) -> "AdapterConfig":
        """Build from a dict. Unknown keys warn (files from newer versions) or, with strict, raise."""
        data = dict(data)
        data.pop("peft_type", None)
        peft_only = {"auto_mapping": ANY, "peft_version": ANY, **cls.peft_only}
        for k in [k for k in data if k in peft_only]:
            neutral, value = peft_only[k], data.pop(k)
            if neutral is not ANY and value != neutral and value not in (None, {}, [], False):
                raise ConfigError(f"{source}: {k}={value!r} is a PEFT feature slimtune does not implement; "
                                  f"this adapter would compute something else here. Use PEFT for it, or retrain without {k}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown and strict:
            k = unknown[0]
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{source}: unknown key '{k}' for {cls.__name__}{hint}")
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys {cls.__name__} does not know: {', '.join(unknown)} "
                "(written by a newer PEFT/slimtune, or misspelt)",
                stacklevel=3,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    @staticmethod
    def from_pretrained(directory: str | os.PathLike) -> "AdapterConfig":
        """Read `adapter_config.json` and build the config of the method it names."""
        from .registry import get_method

        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            hint = " (it is a file; pass its folder)" if os.path.isfile(directory) else ""
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in '{directory}'{hint}: pass the folder save_pretrained wrote"
            )
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); the file is corrupt: save the adapter again") from e
        if "peft_type" not in data:
            raise ConfigError(f"{path} has no 'peft_type': it is not an adapter config")
        spec = get_method(data["peft_type"])
        return spec.config_cls.from_dict(data, source=path)

    def for_loading(self) -> "AdapterConfig":
        """The config to build layers with when weights come from a file: methods override it to
        skip init work that the file replaces or that would alter the base (PiSSA, text init)."""
        return self

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def needs_scores(self) -> bool:
        """True when choosing what trains needs scores measured on data (Fisher masks, top-k heads)."""
        return False

    def with_scores(self, model: Any, batches: list) -> "AdapterConfig":
        """A copy carrying scores measured on the plain `model` over `batches` (inputs with labels);
        the training job calls it before get_peft_model when `needs_scores()`."""
        return self


def listify(x: Any) -> list | None:
    """PEFT allows str or list for module lists; normalise lists/sets/tuples, keep str/None."""
    if x is None or isinstance(x, str):
        return x
    return list(x)


def config_field(default: Any = None, **kw: Any) -> Any:
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), **kw)
    return field(default=default, **kw)
