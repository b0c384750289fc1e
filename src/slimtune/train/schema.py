"""The job's config schema: pydantic models of the YAML's blocks (data, train, eval, model, the job),
each field with its default and the reason for it. Reading YAML, applying overrides and turning a
validation error into one message are config.py's."""
from __future__ import annotations

import string
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class JobConfigError(ValueError):
    """A job config that cannot be used; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


FORMATS = ("auto", "classification", "instruction", "alpaca", "chat", "sharegpt", "text")


class DataConfig(_Strict):
    """Where the examples come from and how they become tokens (docs/data.md has one example per format)."""

    builtin: Optional[str] = None  # a packaged dataset (see `slimtune.train.datasets_offline.BUILTINS`)
    train: Optional[str] = None  # local .jsonl/.json/.csv/.tsv/.parquet; setting it alone is enough
    validation: Optional[str] = None  # none given: `val_fraction` of train is carved off (seeded)
    # auto: from the columns. alpaca = instruction; sharegpt = chat read from `conversations`
    # ({from: human|gpt|system, value}).
    format: Literal["auto", "classification", "instruction", "alpaca", "chat", "sharegpt", "text"] = "auto"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    labels: Optional[list[str]] = None  # classification label set; default: sorted labels of all rows
    messages_column: Optional[str] = None  # chat: "messages" (sharegpt: "conversations")
    output_column: str = "output"  # instruction data: the answer
    # Instruction data: the user turn, from any columns of the row, e.g. "Question: {question}".
    # None: "{instruction}" followed by a blank line and "{input}" when the row has an input.
    prompt_template: Optional[str] = None
    # Instruction data: render the prompt through the tokenizer's chat template (None: when it has
    # one, i.e. instruct models); false sends the prompt text as it is (the alpaca "### Instruction"
    # layout when no prompt_template is set).
    chat_template: Optional[bool] = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    # A held-out test split, apart from validation (which picks the best checkpoint, and in compare /
    # search the learning rate and the trials): `slimtune compare` / `search` measure it once, at the
    # end. A file, or `test_fraction` of train carved off (seeded) before validation is; 0 = none.
    test: Optional[str] = None
    test_fraction: float = Field(0.0, ge=0, lt=1)
    max_test: Optional[int] = Field(None, ge=1)
    # The seed of the carved validation and test splits, apart from train.seed: runs that differ only
    # in train.seed (a spread over seeds in `slimtune search` / `compare`) are measured on the same
    # validation and test examples, so the spread is the training's alone. 42 is train.seed's default,
    # so a config that leaves both alone splits exactly as before this key; null follows train.seed.
    split_seed: Optional[int] = 42
    max_length: int = Field(256, ge=8)
    max_train: Optional[int] = Field(None, ge=1)  # cap example counts (quick runs)
    max_eval: Optional[int] = Field(None, ge=1)
    system_prompt: Optional[str] = None  # for instruction data rendered through a chat template
    # Whisper (speech_recognition): pad clips to this many seconds instead of the model's 30 s window,
    # keeping the encoder's first 50/s positional embeddings. Why: the encoder's cost grows with the
    # window, and short clips (spoken words) need a few seconds; the digits example measures the
    # held-out WER at 2 s against 30 s (docs/speech.md). Longer clips are refused, not cut. None: 30 s.
    audio_window_s: Optional[int] = Field(None, ge=1, le=30)

    @field_validator("format")
    @classmethod
    def _alias(cls, v: str) -> str:
        return "instruction" if v == "alpaca" else v

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"not a valid template ({e}); write columns as {{column}} and a literal brace as "
                             "{{ or }}") from None
        bad = [f for f in fields if not f.isidentifier()]
        if bad or not fields:
            raise ValueError("needs at least one {column} placeholder naming a column of the rows"
                             + (f" ({bad[0]!r} is not a column name)" if bad else ""))
        return v

    def chat_column(self) -> str:
        return self.messages_column or ("conversations" if self.format == "sharegpt" else "messages")


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
    # auto: bf16/fp16 autocast on GPU; on CPU bf16 only where it computes it natively (AVX512-BF16 /
    # AMX: emulated bf16 measured 1.5x slower than fp32 on AVX2), else fp32 (resources.precision_choice)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    # A training-time budget (train/clock_budget.py): the run re-plans its length from its own steady
    # step time so that it trains budget_s seconds on budget_clock; compare / search --budget-minutes
    # set both. Why re-plan: a short timing run missed steady steps by 10-25% (issue 28). cpu = the
    # process's CPU seconds over its threads (the same compute on a busy machine; CPU runs only);
    # wall by default: what "seconds" means to a person. None: max_steps / epochs.
    budget_s: Optional[float] = Field(None, gt=0)
    budget_clock: Literal["cpu", "wall"] = "wall"
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
    # Causal LMs: the decoder, then the head only at labelled positions, chunk by chunk, never the
    # (tokens × vocab) logits (train/lm.py, kernels/chunked_ce.py). auto = on CPU where the model
    # allows (measured there); on forces it; off = the model's own forward and loss.
    chunked_ce: Literal["auto", "on", "off"] = "auto"
    # Padding-free training batches (train/packing.py): rows flattened, attention per row; the
    # chatterbot example's padded batches are 44% pads. auto = where the model's attention allows;
    # on = an error where it does not.
    packing: Literal["auto", "on", "off"] = "auto"
    # Keep the input of the first adapted block per example (train/prefix_cache.py) when the blocks
    # below are frozen and deterministic, and start there when an example comes again (later
    # epochs, later evaluations). Memory: tokens × hidden size × 4 bytes (56 MB for the default job).
    # on = an error where it cannot apply.
    prefix_cache: Literal["auto", "on", "off"] = "auto"
    prefix_cache_mb: float = Field(2048, ge=0)  # more than this goes to a file in the run folder
    # torch.compile every transformer block (compile_blocks.py): fused norms and activations, far
    # fewer kernel launches. Off by default: the first steps pay the compile (tens of seconds).
    # true = inductor's default mode; "reduce-overhead" adds CUDA graphs (GPU; fixed batch shapes
    # pay off, since each new shape records a new graph).
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune"]] = False
    # GPU: keep the tensors saved for backward in pinned CPU memory (speed.activation_offload),
    # for sequences whose activations do not fit; costs PCIe copies every step, so off by default.
    activation_offload: bool = False
    # ---- several processes (train/distributed.py; docs/distributed.md) ----
    # Launched by torchrun / accelerate launch with several processes: auto = DDP (every rank holds
    # the whole model; cheapest when it fits); fsdp = FSDP2 fully_shard per block (the frozen base
    # is split across ranks, so its memory falls with the world size). One process: ignored.
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    # Seconds a collective may wait for a peer before the run fails (a hung or stopped rank): long
    # enough for an eval or a save on the slowest rank, short enough that nobody waits forever.
    distributed_timeout: int = Field(600, ge=10)
    # ---- the objective (train/objectives/; docs/objectives.md) ----
    # sft: next-token loss on answers (or the classifier's); dpo / ipo / orpo / simpo: preference
    # pairs (prompt, chosen, rejected); kto: unpaired rows (prompt, completion, label); grpo: prompts
    # and reward functions. DPO / IPO / KTO's reference is the model with its adapters off.
    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo"] = "sft"
    # None: the objective's paper default (objectives/*.DEFAULT_BETA): DPO / KTO 0.1 (the papers'
    # value; larger keeps closer to the reference), IPO 0.1 (TRL's, its tau), ORPO 0.1 (the paper's
    # lambda), SimPO 2.0 (the paper's range 2.0-2.5 for its length-averaged rewards), GRPO 0.0 (no KL
    # term: DAPO / Dr GRPO found it unneeded, and it saves the reference forward)
    beta: Optional[float] = Field(None, ge=0)
    # conservative DPO / SimPO (cDPO): the probability a pair's labels are flipped; 0 trusts the labels
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    # DPO's pairwise loss: sigmoid (the DPO paper), hinge (SLiC), ipo (the IPO paper; `objective: ipo`)
    loss_type: Optional[Literal["sigmoid", "hinge", "ipo"]] = None
    # log-probs averaged over completion tokens instead of summed. None: the method's own choice (DPO /
    # KTO sum as their papers; IPO, ORPO and SimPO average, which removes their bias to long answers)
    length_normalize: Optional[bool] = None
    # DPO / IPO + this weight x the NLL of the chosen completions (RPO, Pang et al. 2024; TRL's loss_type
    # [sigmoid, sft] with loss_weights [1, w]): 0 is plain DPO; 1 keeps the chosen answers likely, which DPO
    # alone lets fall while it widens the margin (both log-probs can drop)
    sft_weight: float = Field(0.0, ge=0)
    simpo_gamma: float = Field(0.5, ge=0)  # SimPO's target margin gamma (TRL's default; gamma/beta 0.25 of the paper)
    # KTO: weights of desirable / undesirable rows; the paper keeps weight*count of the two in 1 to 4/3
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    # Reference log-probs computed once before training (the adapter loaded from a checkpoint, or any
    # start whose adapter-off model is not the reference): one pass over the data, no reference forward per step
    precompute_ref: bool = False
    max_prompt_length: Optional[int] = Field(None, ge=1)  # a longer prompt is an error naming the row; None: data.max_length - 1
    # GRPO: completions sampled per prompt (the group), how long they may be, the sampling temperature,
    # the PPO clip range (epsilon: DeepSeekMath's 0.2), and the reward functions (built-ins
    # exact_match / regex / length, or the user's module:function), weighted by reward_weights
    num_generations: int = Field(4, ge=2)
    max_completion_length: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    clip_epsilon: float = Field(0.2, gt=0)
    rewards: list[Union[str, dict[str, Any]]] = Field(default_factory=lambda: ["exact_match"])
    reward_weights: Optional[list[float]] = None

    # where metrics go besides metrics.jsonl (HF Trainer's names): tensorboard, mlflow, wandb, none, all (trackers.py)
    report_to: Union[str, list[str]] = ["tensorboard"]

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v: Any) -> Any:
        from .trackers import names

        names(v)  # unknown names and missing packages: one message before anything loads
        return v

    @field_validator("chunked_ce", "packing", "prefix_cache", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:  # YAML 1.1 reads a bare on / off as true / false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class EvalConfig(_Strict):
    generate: Optional[bool] = None  # generated-answer accuracy for LM tasks; None = when answers are short
    max_new_tokens: int = Field(8, ge=1)
    max_examples: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    samples: int = Field(3, ge=0)  # LM runs: validation prompts generated before and after training, for the report


class ModelConfig(_Strict):
    """`model: {name: ..., quantize: nf4}`: the model, optionally quantized on load (QLoRA, slimtune.quant)."""

    name: str = "smollm2-135m"  # builtin name or local HF folder
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"  # nf4: QLoRA's 4-bit type; int8: LLM.int8()
    double_quant: bool = True  # quantize the 4-bit block scales too: ~0.4 bit per weight saved (QLoRA's default)
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # the 4-bit matmul's dtype; auto = train.precision


class JobConfig(_Strict):
    model: Union[str, ModelConfig] = "smollm2-135m"  # a name, or {name, quantize, double_quant, compute_dtype}
    task: Literal["auto", "causal_lm", "classification", "image_classification", "audio_classification",
                  "speech_recognition", "image_text_to_text"] = "auto"  # train/tasks/
    method: Union[str, dict[str, Any]] = "lora"
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output_dir: str = "runs/slimtune"
    # true: the latest checkpoint in output_dir (the config must be the one the run started with);
    # or a checkpoint folder
    resume: Union[bool, str] = False
    # with resume: take only the checkpoint's trained weights and start a new run from them under
    # this config (fresh optimizer, schedule and step count); the old run moves to output_dir/previous
    resume_weights_only: bool = False
    overwrite: bool = False  # replace the run already in output_dir (its checkpoints, adapters, report)
    num_labels: Optional[int] = Field(None, ge=2)
    # the search space of `slimtune search` / `compare` (validated by slimtune.search.space; train ignores it)
    search: Optional[dict[str, Any]] = None

    def model_name(self) -> str:
        return self.model if isinstance(self.model, str) else self.model.name

    def model_options(self) -> ModelConfig:
        return ModelConfig(name=self.model) if isinstance(self.model, str) else self.model

    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else str(self.method.get("name", "lora"))

    def method_kwargs(self) -> dict[str, Any]:
        return {} if isinstance(self.method, str) else {k: v for k, v in self.method.items() if k != "name"}
