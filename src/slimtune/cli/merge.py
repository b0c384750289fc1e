"""`slimtune merge --adapter A --out DIR`: the adapter folded into its base, a plain transformers folder."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import adapter_folder, load_base, quiet_hf
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
    m.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"],
                   help="quantize the base on load as it was trained (QLoRA); the merge dequantizes it exactly: "
                   "dequantize(W_q) + ΔW. Default: what the adapter's run used (its config.yaml), else none")
    m.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                   help="4-bit: double quantization of the block scales (default: the run's, else on)")
    m.add_argument("--compute-dtype", choices=["fp32", "bf16", "fp16"], help="4-bit compute dtype (default: the run's, else fp32)")
    m.add_argument("--requantize", action="store_true",
                   help="quantize the merged linears again like the base (lossy: prints the measured output "
                   "difference vs the unmerged model on a probe batch) and save a quantized model")
    m.set_defaults(fn=run)


def run(a) -> int:
    import torch

    from .. import PeftModel, get_method
    from ..config import AdapterConfig

    quiet_hf()
    adapter = adapter_folder(a.adapter)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out '{out}' is a file; give a folder for the merged model")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CommandError(f"--out '{out}' is a folder with other files in it (not a merged model); merge replaces "
                           "the whole folder, so give a new or empty one")
    cfg = AdapterConfig.from_pretrained(adapter)
    try:
        spec = get_method(cfg.method)
    except KeyError as e:
        raise CommandError(f"{adapter}: {e.args[0]}") from None
    if not spec.mergeable:
        raise CommandError(f"{spec.name} adapters cannot be merged into the base weights (they add tokens or "
                    "activations); load them with PeftModel.from_pretrained instead")
    from ..quant.config import merge_quantization

    quant, note = merge_quantization(adapter, a.quantize, a.double_quant, a.compute_dtype)
    if a.requantize and quant is None:
        raise CommandError("--requantize needs a quantized base: pass --quantize nf4|fp4|int8 (or merge the "
                           "adapter of a run that trained with model.quantize)")
    model, tok, path, task = load_base(a.model, adapter, load_kwargs=quant)
    if note:
        print(note)
    pm = PeftModel.from_pretrained(model, adapter)
    if a.requantize:
        from ..quant import merge_and_requantize

        probe = tok(["The film opens on a quiet street.", "A clumsy, overlong mess of a movie."],
                    return_tensors="pt", padding=True).to(next(model.parameters()).device)
        merged, _ = merge_and_requantize(pm, dict(probe))  # prints what re-quantizing cost
    else:
        merged = pm.merge_and_unload(safe_merge=True)  # a quantized base: dequantize(W_q) + ΔW, exact
        if a.dtype != "float32" or next(merged.parameters()).dtype != torch.float32:
            merged = merged.to(getattr(torch, a.dtype))
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    from ..train.tasks import task_for_adapter

    how = task_for_adapter(task, path).save_merged(merged, tok, tmp, path)
    aside = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():  # aside first, so there is never a moment without a model folder
        os.replace(out, aside)
    os.replace(tmp, out)
    if aside.exists():
        import shutil

        shutil.rmtree(aside)
    what = "re-quantized" if a.requantize else a.dtype
    print(f"merged {adapter} into {path} -> {out} ({what}); load it with {how.format(out=out)}")
    return 0
