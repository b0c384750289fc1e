"""`slimtune merge --adapter A --out DIR`: the adapter folded into its base, a plain transformers folder."""
from __future__ import annotations

import os
from pathlib import Path

from .common import load_base, quiet_hf
from .errors import CommandError

HELP = "merge an adapter into its base: a standalone transformers model folder"


def add_parser(sub) -> None:
    m = sub.add_parser("merge", help=HELP,
                       description="Merge a (mergeable) adapter into the base weights and write a folder that "
                       "plain transformers loads (AutoModelFor*.from_pretrained), tokenizer included.")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--out", required=True, help="output folder (written atomically)")
    m.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.set_defaults(fn=run)


def run(a) -> int:
    import torch

    from .. import PeftModel, get_method
    from ..config import AdapterConfig

    quiet_hf()
    cfg = AdapterConfig.from_pretrained(a.adapter)
    spec = get_method(cfg.method)
    if not spec.mergeable:
        raise CommandError(f"{spec.name} adapters cannot be merged into the base weights (they add tokens or "
                    "activations); load them with PeftModel.from_pretrained instead")
    model, tok, path, task = load_base(a.model, a.adapter)
    pm = PeftModel.from_pretrained(model, a.adapter)
    merged = pm.merge_and_unload(safe_merge=True)
    if a.dtype != "float32":
        merged = merged.to(getattr(torch, a.dtype))
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    merged.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"merged {a.adapter} into {path} -> {out} ({a.dtype}); load it with "
          f"transformers.{type(merged).__name__}.from_pretrained('{out}')")
    return 0
