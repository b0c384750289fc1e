"""The job's config: a pydantic schema, YAML in, dotted key=value overrides, one clear error.

    model: smollm2-135m            # builtin name or local HF folder
    task: auto                     # auto | causal_lm | classification | image_classification
    method: lora                   # or {name: lora, r: 16, target_modules: [q_proj, v_proj]}
    data: {builtin: rotten_tomatoes_lm}   # or {train: a.jsonl, validation: b.jsonl, format: instruction}
    train: {lr: 2e-4, epochs: 1, batch_size: 8}
    output_dir: runs/demo

Unknown keys and wrong types fail with one message naming the key and the closest valid key.
Overrides (`train.lr=1e-4 method.r=16`) set one nested dict key each; the result is validated by
the same schema, so an override can never sneak past it.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class JobConfigError(ValueError):
    """A job config that cannot be used; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    builtin: Optional[str] = None  # a packaged dataset (see `slimtune.train.datasets_offline.BUILTINS`)
    train: Optional[str] = None  # local .jsonl/.json/.csv/.parquet
    validation: Optional[str] = None  # none given: `val_fraction` of train is carved off (seeded)
    format: Literal["auto", "classification", "instruction", "chat", "text"] = "auto"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    labels: Optional[list[str]] = None  # classification label set; default: sorted labels of train
    messages_column: str = "messages"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(256, ge=8)
    max_train: Optional[int] = Field(None, ge=1)  # cap example counts (quick runs)
    max_eval: Optional[int] = Field(None, ge=1)
    system_prompt: Optional[str] = None  # for instruction data rendered through a chat template


class TrainConfig(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)  # optimizer steps; overrides epochs
    batch_size: int = Field(8, ge=1)  # per device
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    warmup_steps: Optional[int] = Field(None, ge=0)  # overrides warmup_ratio
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_every: Optional[int] = Field(None, ge=1)  # steps; None = at the end of each epoch
    save_every: Optional[int] = Field(None, ge=1)  # steps; None = at each eval
    log_every: int = Field(5, ge=1)
    metric: Optional[str] = None  # best-checkpoint metric; default accuracy (cls) / gen_accuracy or eval_loss (LM)
    early_stopping_patience: Optional[int] = Field(None, ge=1)  # evals without improvement
    cpu_threads: Optional[int] = Field(None, ge=1)  # None: the cores other processes leave free (see trainer)
    eval_before: bool = True  # measure the untrained model (the "before" of before -> after)
    # Batches that score weights / heads when the method chooses what trains from data (sparse
    # selection: fisher, heads top_k): 8 is enough for stable top-k choices at small cost.
    score_batches: int = Field(8, ge=1)
    # Causal LMs: loss through the head chunk by chunk, never the (tokens × vocab) logits (kernels/
    # chunked_ce.py). auto = on CPU where the model allows; on / off force it.
    chunked_ce: Literal["auto", "on", "off"] = "auto"
    # torch.compile every transformer block (compile_blocks.py): fused norms and activations, far
    # fewer kernel launches. Off by default: the first steps pay the compile (tens of seconds).
    # true = inductor's default mode; "reduce-overhead" adds CUDA graphs (GPU; fixed batch shapes
    # pay off, since each new shape records a new graph).
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune"]] = False
    # GPU: keep the tensors saved for backward in pinned CPU memory (speed.activation_offload),
    # for sequences whose activations do not fit; costs PCIe copies every step, so off by default.
    activation_offload: bool = False


class EvalConfig(_Strict):
    generate: Optional[bool] = None  # generated-answer accuracy for LM tasks; None = when answers are short
    max_new_tokens: int = Field(8, ge=1)
    max_examples: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)


class ModelConfig(_Strict):
    """`model: {name: ..., quantize: nf4}`: the model, optionally quantized on load (QLoRA, slimtune.quant)."""

    name: str = "smollm2-135m"  # builtin name or local HF folder
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"  # nf4: QLoRA's 4-bit type; int8: LLM.int8()
    double_quant: bool = True  # quantize the 4-bit block scales too: ~0.4 bit per weight saved (QLoRA's default)
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # the 4-bit matmul's dtype; auto = train.precision


class JobConfig(_Strict):
    model: Union[str, ModelConfig] = "smollm2-135m"  # a name, or {name, quantize, double_quant, compute_dtype}
    task: Literal["auto", "causal_lm", "classification", "image_classification"] = "auto"
    method: Union[str, dict[str, Any]] = "lora"
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output_dir: str = "runs/slimtune"
    resume: Union[bool, str] = False  # true: latest checkpoint in output_dir; or a checkpoint folder
    num_labels: Optional[int] = Field(None, ge=2)

    def model_name(self) -> str:
        return self.model if isinstance(self.model, str) else self.model.name

    def model_options(self) -> ModelConfig:
        return ModelConfig(name=self.model) if isinstance(self.model, str) else self.model

    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else str(self.method.get("name", "lora"))

    def method_kwargs(self) -> dict[str, Any]:
        return {} if isinstance(self.method, str) else {k: v for k, v in self.method.items() if k != "name"}


# ---- loading, overrides, errors -----------------------------------------------------------------

def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    cur: Any = model
    for part in loc:
        f = getattr(cur, "model_fields", {}).get(part) if isinstance(cur, type) else None
        if f is None:
            break
        ann = f.annotation
        ann = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None  # (a Union: its BaseModel member)
        if cur is None:
            return []
    return list(cur.model_fields) if isinstance(cur, type) and issubclass(cur, BaseModel) else []


def explain(err: ValidationError, source: str) -> str:
    """One message per problem: the dotted key, what is wrong, and the closest valid key."""
    lines = []
    errors = err.errors()
    tags = ("str", "dict[str,any]", "ModelConfig")  # union branches pydantic names in the location
    for e in errors:
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in tags))
        key = ".".join(str(p) for p in loc)
        if e["type"] == "string_type" and any(len(o["loc"]) > len(e["loc"]) and o["loc"][0] == e["loc"][0]
                                              for o in errors):
            continue  # `model: {...}` failed as a dict: its own error says why, not "should be a string"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(JobConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?" if close else ""
            lines.append(f"{source}: unknown key '{key}'{hint} (valid keys here: {', '.join(valid)})")
        else:
            lines.append(f"{source}: '{key}' = {e.get('input')!r}: {e['msg']}")
    # a union (method: str | dict) reports once per branch: keep distinct lines
    return "\n".join(dict.fromkeys(lines))


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` sets data["a"]["b"]["c"] (value parsed as YAML: 1e-4, true, [q, v])."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise JobConfigError(f"override '{item}' needs the form key=value, e.g. train.lr=1e-4")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        value = _parse_value(raw)
        cur = data
        for i, p in enumerate(parts[:-1]):
            nxt = cur.get(p)
            if isinstance(nxt, str) and p in ("method", "model"):  # method: lora + method.r=16 -> {name: lora, r: 16}
                nxt = {"name": nxt}
            elif isinstance(nxt, BaseModel):
                nxt = nxt.model_dump(exclude_unset=True)
            elif nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise JobConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is {nxt!r}, not a section")
            cur[p] = dict(nxt)
            cur = cur[p]
        cur[parts[-1]] = value
    return data


# What `slimtune train` with no config runs: LoRA on the packaged SmolLM2-135M-Instruct, taught to
# tell a movie's plot summary from a critic's review (Rotten Tomatoes data, balanced, one-word
# answers "plot" / "review"); held-out generated-answer accuracy measured before -> after.
# Why this task: zero-shot the model never answers with the label word (0.00) and ranks the two
# labels at chance (0.50); sentiment (fresh / rotten) did not move past the majority class within
# a few CPU minutes (measured: 0.18 -> 0.56, majority 0.61), plot-vs-review reached 0.98 at step 20 of a 40-step run.
DEFAULT_CONFIG: dict[str, Any] = {
    "model": "smollm2-135m",
    "method": "lora",  # rank/alpha/targets (and, on CPU, the blocks) chosen automatically and printed
    "data": {"builtin": "rotten_tomatoes_plot", "max_train": 240, "max_eval": 100, "max_length": 80,
             "system_prompt": ""},  # an empty system turn: SmolLM2's default one costs 16 tokens a row
    "train": {"epochs": 1, "batch_size": 8, "lr": 2e-3, "log_every": 5},
    "eval": {"max_new_tokens": 4, "max_examples": 100, "batch_size": 25},
    "output_dir": "runs/default",
}


def load_config(path: str | None = None, overrides: list[str] | None = None) -> JobConfig:
    import copy

    data: dict[str, Any] = copy.deepcopy(DEFAULT_CONFIG)
    source = "default config"
    if path:
        p = Path(path)
        if not p.is_file():
            raise JobConfigError(f"config file '{path}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise JobConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise JobConfigError(f"{path}: the top level must be a mapping of keys (model:, method:, data:, ...)")
        source = str(path)
        # relative data paths are relative to the config file
        d = data.get("data")
        if isinstance(d, dict):
            for k in ("train", "validation"):
                if isinstance(d.get(k), str) and not Path(d[k]).is_absolute() and (p.parent / d[k]).exists():
                    d[k] = str(p.parent / d[k])
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as e:
        raise JobConfigError(explain(e, source)) from None
    if cfg.data.builtin is None and cfg.data.train is None:
        raise JobConfigError(f"{source}: data needs 'builtin' (a packaged dataset) or 'train' (a local file)")
    return cfg
