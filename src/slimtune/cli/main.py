"""`slimtune` command line: train / eval / generate / merge / inspect.

    slimtune train                                  # the shipped default run (offline, minutes on 2 CPU cores)
    slimtune train examples/minilm_rotten_tomatoes.yaml train.lr=1e-4 method.r=16
    slimtune eval runs/default                      # a run folder: its config + best adapter
    slimtune generate --adapter runs/default/best --system "" "Text: A clumsy, overlong mess.
    Is this text a movie's plot summary or a critic's review? Answer plot or review."
    slimtune merge --adapter runs/default/best --out merged/
    slimtune inspect smollm2-135m --method lora --task causal_lm
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # slimtune never downloads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _quiet_hf():
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


# ---- train ------------------------------------------------------------------------------------------

def cmd_train(a) -> int:
    from ..train.config import load_config
    from ..train.run import run_train

    overrides = list(a.overrides)
    config = a.config
    if config and "=" in config and not Path(config).exists():  # `slimtune train key=value` (no file)
        overrides.insert(0, config)
        config = None
    if a.resume:
        overrides.append("resume=true")
    if a.output_dir:
        overrides.append(f"output_dir={a.output_dir}")
    cfg = load_config(config, overrides)
    if config is None:
        print(f"no config given: running the shipped default (LoRA on SmolLM2-135M-Instruct: plot summary or "
              f"critic's review? on Rotten Tomatoes texts). `slimtune train --help` shows how to pass your own. Output: {cfg.output_dir}")
    t0 = time.time()
    run_train(cfg, progress=not a.no_progress)
    print(f"done in {time.time() - t0:.1f} s")
    return 0


# ---- eval -------------------------------------------------------------------------------------------

def _run_dir_config(target: str | None, overrides: list[str]):
    from ..train.config import load_config

    if target and Path(target).is_dir() and (Path(target) / "config.yaml").is_file():
        cfg = load_config(str(Path(target) / "config.yaml"), overrides + ["resume=false"])
        best = Path(target) / "best"
        return cfg, str(best if best.is_dir() else Path(target) / "adapter")
    return load_config(target, overrides), None


def cmd_eval(a) -> int:
    import torch

    from .. import PeftModel, get_peft_model
    from ..train.job import setup
    from ..train.trainer import Trainer, _fmt

    cfg, adapter = _run_dir_config(a.target, list(a.overrides))
    adapter = a.adapter or adapter
    s = setup(cfg, print)
    if adapter:
        model = PeftModel.from_pretrained(s["model"], adapter, is_trainable=True)
        print(f"evaluating {cfg.model} + adapter {adapter}")
    else:  # a fresh adapter is the identity (LoRA B = 0): this measures the base model
        torch.manual_seed(cfg.train.seed)
        model = get_peft_model(s["model"], s["adapter_config"])
        print(f"evaluating {cfg.model} without a trained adapter (zero-shot)")
    tr = Trainer(cfg.model_copy(update={"output_dir": a.out or "/tmp/slimtune-eval"}), model, s["tokenizer"],
                 s["data"], s["task"], progress=False)
    samples: list = []
    res = tr.evaluate()
    if s["task"] == "causal_lm" and s["data"].eval_raw:
        tr.generated_accuracy(samples)
    print(f"{s['data'].source}: {len(s['data'].eval)} held-out examples")
    print(_fmt(res))
    for ref, pred in samples:
        print(f"  reference {ref!r:30} generated {pred!r}")
    return 0


# ---- generate ---------------------------------------------------------------------------------------

def _load_base(model_name: str | None, adapter: str | None, task: str | None = None):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..train import models

    path = None
    cfgj = {}
    if adapter:
        p = Path(adapter) / "adapter_config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no adapter_config.json in '{adapter}': pass the folder `train` wrote "
                                    "(runs/NAME/best or runs/NAME/adapter)")
        cfgj = json.loads(p.read_text())
    if model_name:
        path = models.resolve(model_name)
    elif cfgj.get("base_model_name_or_path") and Path(cfgj["base_model_name_or_path"]).exists():
        path = cfgj["base_model_name_or_path"]
    else:
        raise FileNotFoundError("which base model? pass --model (a builtin name or folder); the adapter's "
                                "base_model_name_or_path is missing or not on this machine")
    tok_dir = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path
    tok = AutoTokenizer.from_pretrained(tok_dir)
    task = task or cfgj.get("task_type") or "CAUSAL_LM"
    if task == "SEQ_CLS":
        n = _num_labels(adapter) if adapter else 2
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tok, path, task


def _num_labels(adapter: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return f.get_slice(k).get_shape()[0]
    return 2


def cmd_generate(a) -> int:
    import torch

    from .. import PeftModel

    _quiet_hf()
    adapters = a.adapter or []
    model, tok, path, task = _load_base(a.model, adapters[0] if adapters else None)
    if task != "CAUSAL_LM":
        return _err(f"generate needs a causal LM adapter; {adapters[0]} is {task} (use `slimtune eval`)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if a.chat or (a.chat is None and getattr(tok, "chat_template", None)):
        from ..train.data import ensure_chat_template

        ensure_chat_template(tok)
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(a.prompt, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    names = []
    if adapters:
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        names.append("a0")
        for i, ad in enumerate(adapters[1:], 1):
            model.load_adapter(ad, adapter_name=f"a{i}")
            names.append(f"a{i}")
    kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0, pad_token_id=tok.pad_token_id)
    if a.temperature > 0:
        kw.update(temperature=a.temperature, top_p=0.95)
    torch.manual_seed(a.seed)
    n_in = enc["input_ids"].shape[1]
    runs = [("base model", None)] if (a.compare_base or not names) else []
    runs += [(f"adapter {adapters[i]}", n) for i, n in enumerate(names)]
    for label, name in runs:
        with torch.no_grad():
            if name is None and names:
                with model.disable_adapter():
                    out = model.generate(**enc, **kw)
            elif name is None:
                out = model.generate(**enc, **kw)
            else:
                model.set_adapter(name)
                out = model.generate(**enc, **kw)
        text = tok.decode(out[0, n_in:], skip_special_tokens=True).strip()
        print(f"[{label}]\n{text}\n" if len(runs) > 1 else text)
    return 0


# ---- merge ------------------------------------------------------------------------------------------

def cmd_merge(a) -> int:
    import torch

    from .. import PeftModel, get_method
    from ..config import AdapterConfig

    _quiet_hf()
    cfg = AdapterConfig.from_pretrained(a.adapter)
    spec = get_method(cfg.method)
    if not spec.mergeable:
        return _err(f"{spec.name} adapters cannot be merged into the base weights (they add tokens or "
                    "activations); load them with PeftModel.from_pretrained instead")
    model, tok, path, task = _load_base(a.model, a.adapter)
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


# ---- inspect ----------------------------------------------------------------------------------------

def cmd_inspect(a) -> int:
    import torch
    import torch.nn as nn

    from .. import get_peft_model
    from ..train import job, models
    from ..train.config import load_config

    _quiet_hf()
    task = a.task
    if a.model == "digits-cnn":
        model, task = models.digits_cnn(), "image_classification"
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        path = models.resolve(a.model)
        hf_cfg = AutoConfig.from_pretrained(path)
        if task == "auto":
            task = "classification" if any(x.endswith(("Model", "ForMaskedLM")) and "Causal" not in x
                                           for x in (hf_cfg.architectures or [])) and \
                not getattr(hf_cfg, "is_decoder", False) and hf_cfg.model_type in job.QKV and \
                hf_cfg.model_type not in ("llama", "gpt2") else "causal_lm"
        cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=torch.float32, **({"num_labels": a.num_labels} if task == "classification" else {}))
    total = sum(p.numel() for p in model.parameters())
    print(f"{a.model}: {type(model).__name__}, {total:,d} parameters, task {task}")
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


# ---- entry ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimtune", description="Parameter-efficient fine-tuning: train, evaluate, "
                                "generate, merge and inspect, offline.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    t = sub.add_parser("train", help="train an adapter from a YAML config (none: the shipped default run)",
                       description="Train an adapter. CONFIG is a YAML file (model, task, method, data, train, eval, "
                       "output_dir); key=value pairs override it with dotted paths (train.lr=1e-4 method.r=16 "
                       "data.max_train=500). With no CONFIG: the offline default run (LoRA on SmolLM2-135M-Instruct, "
                       "plot summary vs critic's review on Rotten Tomatoes texts), printing the held-out metric before -> after.")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key=value overrides (dotted paths)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--output-dir", help="same as output_dir=...")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="measure a model (+ adapter) on a config's held-out data",
                       description="Evaluate on the held-out split of a config's data. TARGET is a run folder "
                       "(uses its config.yaml and best adapter) or a YAML config; none: the default config.")
    e.add_argument("target", nargs="?", help="run folder or YAML config")
    e.add_argument("overrides", nargs="*", help="key=value overrides")
    e.add_argument("--adapter", help="adapter folder (default: RUN/best); none for a YAML: the base model")
    e.add_argument("--out", help="scratch folder for eval outputs")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="prompt -> text with one or several adapters (or a chat turn)",
                       description="Generate text from a prompt. Several --adapter flags print one answer per "
                       "adapter (and --compare-base the base model's). Instruct models get the prompt as a chat "
                       "turn through their chat template (--no-chat to send it raw).")
    g.add_argument("prompt", help="the prompt (a user turn with --chat)")
    g.add_argument("--model", help="base model (builtin name or folder); default: the adapter's base")
    g.add_argument("--adapter", action="append", help="adapter folder; repeat for several")
    g.add_argument("--chat", dest="chat", action="store_true", default=None, help="wrap as a chat turn")
    g.add_argument("--no-chat", dest="chat", action="store_false", help="send the prompt as raw text")
    g.add_argument("--system", help="system message for --chat")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compare-base", action="store_true", help="also print the base model's answer")
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("merge", help="merge an adapter into its base: a standalone transformers model folder",
                       description="Merge a (mergeable) adapter into the base weights and write a folder that "
                       "plain transformers loads (AutoModelFor*.from_pretrained), tokenizer included.")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--out", required=True, help="output folder (written atomically)")
    m.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.set_defaults(fn=cmd_merge)

    i = sub.add_parser("inspect", help="module tree, suggested targets and trainable %% for a config, no training",
                       description="Show a model's module tree with shapes, the adaptable layers, what `method:` "
                       "would choose for the task, and the trainable-parameter count and %%.")
    i.add_argument("model", help="builtin name (smollm2-135m, minilm, digits-cnn) or folder")
    i.add_argument("overrides", nargs="*", help="method.* overrides, e.g. method.r=32")
    i.add_argument("--method", default="lora", help="method name (see the list below)")
    i.add_argument("--task", default="auto", choices=["auto", "causal_lm", "classification", "image_classification"])
    i.add_argument("--num-labels", type=int, default=2)
    i.add_argument("--config", help="take method settings from this YAML")
    i.add_argument("--depth", type=int, default=6, help="tree depth to print")
    i.set_defaults(fn=cmd_inspect)

    sub.add_parser("bench", help="slimtune vs HF PEFT side by side: ms/step, memory, ratios (see `slimtune bench -h`)",
                   add_help=False)  # its own parser: slimtune.bench.main
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from ..bench import main as bench_main

        return bench_main(argv[1:]) or 0
    p = build_parser()
    a, extra = p.parse_known_args(argv)
    # key=value overrides may come after options (`train cfg.yaml --no-progress train.lr=1e-4`)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(a, "overrides")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        a.overrides = list(a.overrides) + extra
    if not getattr(a, "cmd", None):
        p.print_help()
        return 0
    if a.cmd == "inspect" and getattr(a, "method", None) is None:
        a.method = "lora"
    from ..train.config import JobConfigError
    from ..train.data import DataError
    from ..train.trainer import TrainingDiverged

    try:
        return a.fn(a) or 0
    except (JobConfigError, DataError, TrainingDiverged, FileNotFoundError) as e:
        return _err(str(e))
    except KeyError as e:  # unknown method / metric: KeyError quotes; print plain
        return _err(e.args[0] if e.args else str(e))
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; `slimtune train ... --resume` continues", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
