"""Turn a validated JobConfig into (tokenizer, base model, adapter config, data): the set-up half of
`slimtune train`; `trainer.py` is the loop.

`method: lora` with nothing else picks rank, alpha and targets from the task and model size and says
why (classification: r=8, alpha=16 on query/value; generation: r=16, alpha=32 on q/k/v; larger
models get a larger rank). Keys the user sets are never overridden.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import typing
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .. import families
from ..registry import get_method, make_config
from . import models, tasks
from .config import JobConfig, JobConfigError
from .data import Prepared, collate, ensure_chat_template, prepare

# q/k/v names per family, for the generation default (PEFT's family defaults cover q/v only)
QKV = {"llama": ["q_proj", "k_proj", "v_proj"], "bert": ["query", "key", "value"], "gpt2": ["c_attn"],
       "t5": ["q", "k", "v"], "distilbert": ["q_lin", "k_lin", "v_lin"]}
for _t in ("mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "olmo", "granite", "smollm3", "gpt_neo"):
    QKV[_t] = QKV["llama"]
for _t in ("roberta", "xlm-roberta", "electra", "albert"):
    QKV[_t] = QKV["bert"]


# the YAML shapes of method keys whose config field is typed Any (names, indices, patterns)
_NAMES = Union[str, list[str]]
SHAPES = {"target_modules": _NAMES, "exclude_modules": _NAMES, "modules_to_save": Optional[list[str]],
          "feedforward_modules": _NAMES, "attention_modules": _NAMES, "layers_pattern": _NAMES,
          "layers_to_transform": Optional[Union[int, list[int]]], "layers": list[int], "blocks": list[int],
          "heads": Union[list[int], dict[str, list[int]]], "init_lora_weights": Union[bool, str]}

ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
           "target": "target_modules", "modules": "target_modules"}


def resolve_task(cfg: JobConfig, fmt: str | None, path: str | None = None) -> str:
    """The task's name: the config's, else the one the model decides (an image classifier), else the
    one the data format implies (tasks/__init__.py)."""
    if cfg.task != "auto":
        return cfg.task
    own = tasks.task_for_model(cfg.model_name(), path)
    return (own or tasks.task_for_format(fmt)).name


@contextlib.contextmanager
def hf_quiet():
    """transformers' load banners off while a model loads (e.g. "LOAD REPORT ... classifier MISSING"
    for a head the adapter brings or the job trains): the job says what it loaded in its own words."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(cfg: JobConfig, path: str | None):
    return tasks.load_tokenizer(cfg.model_name(), path)


def load_model(cfg: JobConfig, path: str | None, task: str, num_labels: int | None, log=print,
               labels: list[str] | None = None) -> nn.Module:
    from .resources import BASE_DTYPE, resolve_precision

    spec = tasks.get_task(task)
    # The frozen base in the training precision (bf16 halves its memory on GPU); the trained
    # parameters are upcast to fp32 after injection (`upcast_trainable`), as PEFT does.
    dtype = BASE_DTYPE[resolve_precision(cfg.train.precision)]
    kw = quantize_kwargs(cfg, task, dtype)  # model.quantize: bitsandbytes layers on load (slimtune.quant)
    m = spec.load_model(cfg, path, num_labels, dtype, kw, labels, log)
    if kw:
        from ..quant import guard_cpu_repack, quantized_size
        from ..quant.config import detach_from_checkpoint

        guard_cpu_repack(m)  # before the job's first (eval) forward: see quant/prepare.py
        detach_from_checkpoint(m)  # drop the dense checkpoint's resident pages (the linears are quantized)
        size = quantized_size(m)
        if size is not None:
            log(size.line())
    return m


def quantize_kwargs(cfg: JobConfig, task: str, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained's quantization_config (and device placement on GPU) for `model.quantize`."""
    opt = cfg.model_options()
    if opt.quantize == "none":
        return {}
    from ..quant.config import DTYPES, load_kwargs
    from ..quant.prepare import refuse_method

    refuse_method(get_method(cfg.method_name()).name)  # full / layerwise / ...: refused before loading anything
    compute = dtype if opt.compute_dtype == "auto" else DTYPES[opt.compute_dtype]
    heads = list(tasks.get_task(task).heads)
    skip = (["lm_head"] + heads) if heads else None  # a trained head must stay dense
    return load_kwargs(opt.quantize, opt.double_quant, compute, skip)


def upcast_trainable(model: nn.Module) -> int:
    """Trained parameters in fp32 on a half-precision base: AdamW steps of ~1e-4 relative size
    vanish in bf16's 8-bit mantissa. Autocast runs the forward in half precision; the fused LoRA
    paths cast the adapters per call. Returns how many tensors were cast.

    A module whose parameters are only partly trained (BitFit: a LayerNorm's bias trains, its
    weight stays frozen) gets its frozen 1-D siblings upcast too: CPU autocast does not cover
    `layer_norm` / `group_norm`, which take their weight and bias in one dtype (a bf16 weight beside
    an fp32 bias is "expected scalar type BFloat16 but found Float"), and they accept a bf16 input
    with fp32 affine parameters. Those siblings are per-channel vectors as small as the trained
    bias; a frozen matrix (a Linear's weight beside its trained bias) stays half precision, since
    the ops that use matrices (linear, conv, matmul) are under autocast and cast their arguments."""
    n = 0
    for m in model.modules():
        own = [p for p in m._parameters.values() if p is not None]
        trained = any(p.requires_grad for p in own)
        for p in own:
            if p.dtype in (torch.bfloat16, torch.float16) and (p.requires_grad or (trained and p.dim() == 1)):
                p.data = p.data.float()
                n += 1
    return n


def _count(model: nn.Module) -> int:
    from ..quant.backend import param_count  # a 4-bit weight counts its unpacked size

    return sum(param_count(p) for p in model.parameters())


def auto_method(cfg: JobConfig, model: nn.Module, task: str, steps: int | None = None) -> tuple[Any, list[str]]:
    """The adapter config, and a line per choice made for the user (what and why). `steps`: the run's
    optimizer steps, which fill a method's `total_step` (AdaLoRA's rank budget schedule) left unset,
    so the schedule ends with the run whatever its length (compare's probes, a search's trials)."""
    name = cfg.method_name()
    try:
        spec = get_method(name)  # unknown method -> KeyError naming the closest
    except KeyError as e:
        raise JobConfigError(f"method: {e.args[0] if e.args else e}") from None
    kw = dict(cfg.method_kwargs())
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    why: list[str] = []
    task_spec = tasks.get_task(task)
    for k in kw:  # the YAML-facing check: name the closest key (and common aliases) before the registry
        if k not in fields and k not in task_spec.task_keys:  # task_keys: the task's own switches
            import difflib

            close = ALIASES.get(k) if ALIASES.get(k) in fields else None
            close = close or next(iter(difflib.get_close_matches(k, sorted(fields), n=1, cutoff=0.4)), None)
            hint = f"did you mean 'method.{close}'?" if close else f"valid keys: {', '.join(sorted(fields))}"
            raise JobConfigError(f"method block: unknown key 'method.{k}' for {spec.name}; {hint}")
    check_types(spec, kw)
    task_spec.adapter_defaults(model, kw, fields, why)
    if spec.name == "lora":
        n = _count(model)
        big = n > 1_000_000_000
        huge = n > 6_000_000_000
        gen = task_spec.generates
        r = (64 if huge else 32 if big else 16) if gen else (32 if big else 8)
        size = f"{n / 1e6:.0f}M params"
        if "r" not in kw:
            kw["r"] = r
            why.append(f"r={r}: {'generation' if gen else 'classification'} on a {size} model"
                       + (" (larger models get a larger rank)" if big else ""))
        if "lora_alpha" not in kw:
            kw["lora_alpha"] = 2 * kw["r"]
            why.append(f"lora_alpha={kw['lora_alpha']}: 2*r, the usual scale of 2")
        if "target_modules" not in kw:
            mt = families.model_type(model)
            if gen and mt in QKV:
                kw["target_modules"] = QKV[mt]
                why.append(f"target_modules={QKV[mt]}: query/key/value attention projections for generation ({mt})")
            elif families.default_lora_targets(model):
                kw["target_modules"] = families.default_lora_targets(model)
                why.append(f"target_modules={kw['target_modules']}: " + (f"query/value attention (PEFT's default for {mt})"
                           if mt else f"{type(model).__name__}'s own default"))
            else:
                names = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
                kw["target_modules"] = sorted({p.split(".")[-1] for p in names})
                why.append(f"target_modules={kw['target_modules']}: every Linear/Conv layer (no family default for "
                           f"{type(model).__name__})")
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if (gen and "layers_to_transform" not in kw and not torch.cuda.is_available() and n_layers
                and n_layers >= 24 and isinstance(kw.get("target_modules"), list)):
            first = n_layers - n_layers // 3
            kw["layers_to_transform"] = list(range(first, n_layers))
            why.append(f"layers_to_transform={first}..{n_layers - 1}: on CPU only the top third of the {n_layers} "
                       "blocks get adapters, so the backward pass stops there (SmolLM2-135M on 2 cores: steps "
                       "measured 1.44x faster than adapting every block); "
                       "set method.layers_to_transform=null to adapt all")
    if steps is not None and "total_step" in fields and kw.get("total_step") is None:
        kw["total_step"] = steps
        why.append(f"total_step={steps}: the run's optimizer steps (the rank budget schedule ends with the run)")
    try:
        return make_config(spec.name, **kw), why
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise JobConfigError(f"method block ({spec.name}): {e}") from None


def check_types(spec: Any, kw: dict[str, Any]) -> None:
    """Each method key's value against its config field's type (pydantic, lax: 16 for 16.0 is fine),
    so `method.alpha_pattern: 0` is a message, not an AttributeError deep inside the method."""
    from pydantic import TypeAdapter, ValidationError

    try:
        hints = typing.get_type_hints(spec.config_cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: the config's own checks remain
        hints = {}
    for k, v in kw.items():
        hint = SHAPES.get(k) if hints.get(k) in (None, Any) else hints[k]
        if hint is None or hint is Any:
            continue
        if k == "target_modules" and isinstance(v, list) and any(isinstance(x, type) for x in v):
            continue  # module types (Python API, not YAML)
        try:
            TypeAdapter(hint).validate_python(v)
        except ValidationError as e:
            want = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise JobConfigError(f"method block ({spec.name}): method.{k} = {v!r} should be {want} "
                                 f"({e.errors()[0]['msg'].lower()})") from None
        except Exception:  # noqa: BLE001 - a type pydantic cannot check: the config's own checks remain
            continue


def apply_method(model: nn.Module, adapter_cfg: Any):
    """get_peft_model, with a target that matches nothing said in the config's words: the entry, the
    closest names, and the short layer names this model has (not every full path)."""
    from .. import get_peft_model
    from ..config import ConfigError
    from ..targeting import TargetError

    try:
        return get_peft_model(model, adapter_cfg)
    except TargetError as e:
        msg = str(e).split(" Module names that would match:")[0].rstrip(" ")
        msg = msg if msg.endswith(("?", ".")) else msg + "."
        leaves = sorted({n.split(".")[-1] for n, m in model.named_modules()
                         if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)) or type(m).__name__ == "Conv1D"})
        shown = ", ".join(leaves[:20]) + (f" (+{len(leaves) - 20} more)" if len(leaves) > 20 else "")
        raise JobConfigError(f"method.target_modules: {msg} Layer names in {type(model).__name__}: {shown}; or "
                             "'all-linear' (`slimtune inspect MODEL` shows the tree)") from None
    except re.error as e:
        raise JobConfigError(f"method block ({adapter_cfg.method}): a module pattern {e.pattern!r} is not a valid "
                             f"regular expression ({e}); a string target is a full-match regex, a list holds names") from None
    except (ConfigError, ValueError, TypeError) as e:
        raise JobConfigError(f"method block ({adapter_cfg.method}): {e}") from None


def setup(cfg: JobConfig, log=print) -> dict[str, Any]:
    """Everything the trainer needs, built from the config. The task is the config's, else the model's
    (an image classifier decides it), else the data's format decides it after reading."""
    path = None if cfg.model_name() in tasks.torch_models() else models.resolve(cfg.model_name(), log)
    pre = tasks.get_task(cfg.task) if cfg.task != "auto" else tasks.task_for_model(cfg.model_name(), path)
    proc = (pre or tasks.get_task("causal_lm")).load_processor(cfg, path)  # text models: the tokenizer
    # the data decides the format (and the label count) before the model is built
    from .objectives.hooks import prepare_data  # dpo / kto / grpo ...: TRL's formats; None for sft

    data: Prepared = prepare_data(cfg, proc, log) or prepare(cfg.data, proc, pre.name if pre else "auto",
                                                             cfg.train.seed, log)
    spec = pre or tasks.task_for_format(data.format)
    if pre is None and not spec.accepts_model(cfg.model_name(), tasks.hf_config(path)):
        raise JobConfigError(f"{data.source}: the data is {data.format} data for task {spec.name}, but model "
                             f"'{cfg.model_name()}' is not a model for that task; use a {spec.kind} (a folder saved "
                             "with save_pretrained), or other data for this model")
    task = spec.name
    spec.after_data(proc, data)
    num_labels = cfg.num_labels or (len(data.labels) if data.labels else None)
    if cfg.num_labels and data.labels and cfg.num_labels < len(data.labels):
        raise JobConfigError(f"num_labels={cfg.num_labels} but the data has {len(data.labels)} classes "
                             f"{data.labels}; remove num_labels (it follows the data) or raise it")
    model = load_model(cfg, path, task, num_labels, log, data.labels)
    spec.configure(model, proc, data, num_labels)
    from .checks import plan
    from .distributed import _env_int

    steps = plan(cfg.train, len(data.train), _env_int("WORLD_SIZE", 1)).total_steps
    adapter_cfg, why = auto_method(cfg, model, task, steps)
    return {"tokenizer": proc, "model": model, "adapter_config": adapter_cfg, "why": why, "data": data,
            "task": task, "model_path": path}


def score_for_selection(adapter_cfg: Any, model: nn.Module, data: Prepared, cfg: JobConfig, tok, log=print) -> Any:
    """Scores for a method that chooses its trainable part from data (sparse `selection: fisher`,
    heads `top_k`), measured on the plain model over `train.score_batches` seeded training batches."""
    n = min(len(data.train), cfg.train.score_batches * cfg.train.batch_size)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.train.seed))[:n].tolist()
    pad = getattr(tok, "pad_token_id", None) or 0  # an image processor has none
    dev = next(model.parameters()).device
    bs = cfg.train.batch_size
    batches = [{k: v.to(dev) for k, v in collate([data.train[i] for i in order[j:j + bs]], pad).items()}
               for j in range(0, n, bs)]
    t0 = time.time()
    scored = adapter_cfg.with_scores(model, batches)
    log(f"method {adapter_cfg.method}: scored on {len(batches)} batches ({n} training examples) "
        f"in {time.time() - t0:.1f} s")
    return scored
