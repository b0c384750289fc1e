"""Benchmark rows for the methods beyond LoRA (issue 26): LoHa, LoKr, VeRA and OFT, each in HF PEFT
and in slimtune on the same model, batch and targets (presets.TARGETS), as training scenarios
`peft_<method>` / `slimtune_<method>` (run them with `--scenarios frozen,peft_loha,slimtune_loha,...`).

Settings per method, the same in both libraries: LoHa and LoKr at the preset's r and alpha (16, 32),
VeRA at PEFT's default r=256, OFT at PEFT's default oft_block_size=32.
"""
from __future__ import annotations

from typing import Callable

from .presets import TARGETS, Preset

METHODS: dict[str, tuple[str, Callable[[Preset], dict]]] = {
    # method -> (config class name, shared in peft and slimtune; its keyword arguments for a preset)
    "loha": ("LoHaConfig", lambda p: dict(r=p.r, alpha=p.alpha)),
    "lokr": ("LoKrConfig", lambda p: dict(r=p.r, alpha=p.alpha)),
    "vera": ("VeraConfig", lambda p: dict(r=256)),
    "oft": ("OFTConfig", lambda p: dict(oft_block_size=32)),
}


def _setup(lib: str, method: str) -> Callable:
    def setup(model, p: Preset):
        import importlib

        mod = importlib.import_module(lib)
        cls_name, kw = METHODS[method]
        pm = mod.get_peft_model(model, getattr(mod, cls_name)(target_modules=list(TARGETS), **kw(p)))
        params = [q for q in pm.parameters() if q.requires_grad]
        return pm, params, lambda: pm.unload()
    return setup


METHOD_SETUPS: dict[str, Callable] = {f"{lib}_{m}": _setup("peft" if lib == "peft" else "slimtune", m)
                                      for m in METHODS for lib in ("peft", "slimtune")}
