"""`slimtune inspect MODEL`: module tree, adaptable layers, the method's choice and trainable %, no training."""
from __future__ import annotations

from .common import quiet_hf

HELP = "module tree, suggested targets and trainable % for a config, no training"


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help=HELP.replace("%", "%%"),
                       description="Show a model's module tree with shapes, the adaptable layers, what `method:` "
                       "would choose for the task, and the trainable-parameter count and %.")
    i.add_argument("model", help="builtin name (smollm2-135m, minilm, digits-cnn) or folder")
    i.add_argument("overrides", nargs="*", help="method.* overrides, e.g. method.r=32")
    i.add_argument("--method", default="lora", help="method name (see the list below)")
    i.add_argument("--task", default="auto", choices=["auto", "causal_lm", "classification", "image_classification",
                                                      "audio_classification", "speech_recognition", "image_text_to_text"],
                   help="the task (train/tasks/); auto: an image model's own, else classification for an encoder")
    i.add_argument("--num-labels", type=int, default=2)
    i.add_argument("--config", help="take method settings from this YAML")
    i.add_argument("--depth", type=int, default=6, help="tree depth to print")
    i.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"], default="none",
                   help="load the model quantized (bitsandbytes) and show its quantized size")
    i.set_defaults(fn=run)


def run(a) -> int:
    import torch
    import torch.nn as nn

    from .. import get_peft_model
    from ..train import job, models
    from ..train.config import load_config

    quiet_hf()
    from ..train.tasks import get_task, task_for_model, torch_models

    task = a.task
    if a.model in torch_models():  # a CNN the image task builds by name
        from ..train.tasks.image_classification import torch_model

        model, task = torch_model(a.model, a.num_labels), "image_classification"
    else:
        from transformers import AutoConfig

        path = models.resolve(a.model)
        hf_cfg = AutoConfig.from_pretrained(path)
        if task == "auto":
            owner = task_for_model(a.model, path)  # an image classifier decides its task
            task = owner.name if owner is not None else _text_task(hf_cfg)
        spec = get_task(task)
        kw = spec.model_kwargs(a.num_labels, None)
        if a.quantize != "none":
            from ..quant.config import load_kwargs

            kw.update(load_kwargs(a.quantize, skip_modules=(["lm_head", *spec.heads]) if spec.heads else None))
        with job.hf_quiet():
            model = spec.model_class(hf_cfg).from_pretrained(path, dtype=torch.float32, **kw)
    from ..quant import quantized_size
    from ..quant.backend import param_count

    total = sum(param_count(p) for p in model.parameters())
    print(f"{a.model}: {type(model).__name__}, {total:,d} parameters, task {task}")
    size = quantized_size(model)
    if size is not None:
        print(size.line())
    overrides = [f"model={a.model}", f"method={a.method}"] + (["data.builtin=rotten_tomatoes"]) + list(a.overrides)
    cfg = load_config(a.config, overrides) if a.config else load_config(None, overrides)
    adapter_cfg, why = job.auto_method(cfg, model, task)
    tm = getattr(adapter_cfg, "target_modules", None)
    targets = set([tm] if isinstance(tm, str) else tm or [])
    print("\nmodule tree (repeated blocks shown once; weight shapes are (out, in)):")
    seen_blocks = set()
    for name, m in model.named_modules():
        if not name:
            continue
        parts = name.split(".")
        # collapse numbered blocks after the first: layers.1.*, layers.2.* ...
        key = ".".join("N" if p.isdigit() else p for p in parts)
        if any(p.isdigit() and p != "0" for p in parts):
            continue
        depth = len(parts)
        if depth > a.depth:
            continue
        shape = ""
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and not list(m.children()):
            shape = f" {tuple(w.shape)}"
        n_blocks = ""
        if isinstance(m, nn.ModuleList):
            n_blocks = f" x{len(m)}"
        if key in seen_blocks:
            continue
        seen_blocks.add(key)
        mark = "  <- target" if parts[-1] in targets else ""
        print(f"  {'  ' * (depth - 1)}{parts[-1]}: {type(m).__name__}{shape}{n_blocks}{mark}")
    leaf_types: dict[str, set] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)) or type(m).__name__ == "Conv1D":
            leaf_types.setdefault(name.split(".")[-1], set()).add(type(m).__name__)
    print("\nadaptable leaf modules (name: type): " + ", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in leaf_types.items()))
    print(f"\nsuggested for {task}: " + ("; ".join(why) if why else f"{adapter_cfg.method} defaults"))
    pm = get_peft_model(model, adapter_cfg)
    t, tot = pm.get_nb_trainable_parameters()
    print(f"with {adapter_cfg.method} ({', '.join(f'{k}={v}' for k, v in adapter_cfg.to_dict().items() if k in ('r', 'lora_alpha', 'target_modules', 'task_type') and v is not None)}):")
    print(f"trainable params: {t:,d} || all params: {tot:,d} || trainable%: {100 * t / max(tot, 1):.4f}")
    return 0


def _text_task(hf_cfg) -> str:
    """A text model's likely task: classification for an encoder (BERT-like), else causal LM."""
    from ..train import job

    enc = any(x.endswith(("Model", "ForMaskedLM")) and "Causal" not in x for x in (hf_cfg.architectures or []))
    return "classification" if enc and not getattr(hf_cfg, "is_decoder", False) and hf_cfg.model_type in job.QKV and \
        hf_cfg.model_type not in ("llama", "gpt2") else "causal_lm"
