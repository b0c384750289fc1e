"""Vision-language (image + text in, text out): `AutoModelForImageTextToText` with its
`AutoProcessor`, trained on chat rows with `images: [paths]` and `<image>` placeholders (vlm_io.py:
counts checked per row, loss on the assistant tokens only, pixel batches joined per family).

Adapter placement (families): LoRA on the language model's attention and MLP projections by
default; `method.finetune_vision_layers: true` adds the vision tower's (and the projector's),
`finetune_language_layers: false` leaves the language model out — unsloth's two switches.

Held-out metrics: the loss on the answers, and greedy answers to (at most eval.max_examples of) the
held-out prompts against the references (exact match and token F1 of the normalised text); the
default selection metric is exact_match. `predict` answers chat rows with images (the last assistant turn is generated), or
an image / a folder of images with `--prompt`; `generate --image` answers one image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..datafiles import DataError
from . import register_task
from .base import Task

# model types whose checkpoints are vision-language models this task trains (tested: llava, idefics3)
VLM_TYPES = {"llava", "llava_next", "llava_onevision", "idefics2", "idefics3", "smolvlm", "paligemma", "qwen2_vl",
             "qwen2_5_vl", "mllama", "gemma3", "pixtral", "aya_vision", "mistral3"}
# the language model's attention / MLP projections (Llama-style names, which these families' LMs use)
LANGUAGE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# where the parts sit in transformers' VLM classes (model.language_model / vision_tower | vision_model / connector)
VISION_PARTS = ("vision_tower", "vision_model", "multi_modal_projector", "connector", "visual")
LANGUAGE_PARTS = ("language_model", "text_model")


def is_vlm(hf_cfg: Any) -> bool:
    if hf_cfg is None:
        return False
    archs = getattr(hf_cfg, "architectures", None) or []
    return hf_cfg.model_type in VLM_TYPES or any(a.endswith("ForImageTextToText") for a in archs)


def family_targets(model: nn.Module, vision: bool, language: bool) -> str:
    """A full-match regex over module names: the linear layers named like attention / MLP
    projections (or the vision tower's fc1 / fc2 / out_proj / projector linears) inside the parts
    switched on."""
    parts = ([*LANGUAGE_PARTS] if language else []) + ([*VISION_PARTS] if vision else [])
    if not parts:
        raise ValueError("finetune_vision_layers and finetune_language_layers are both false: nothing to adapt")
    leaves = LANGUAGE_TARGETS + (["fc1", "fc2", "out_proj", "linear_1", "linear_2", "proj", "qkv"] if vision else [])
    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(f".{p}." in f".{n}." for p in parts)}
    names = sorted(set(leaves) & found)
    if not names:
        raise ValueError(f"no linear layer named {leaves} inside {parts} of this model; set method.target_modules")
    return rf".*\b({'|'.join(parts)})\b.*\.({'|'.join(names)})"


@register_task
class ImageTextToText(Task):
    name = "image_text_to_text"
    kind = "vision-language model"
    formats = ("vision_chat",)
    data_hint = "chat rows ('messages') with an 'images' list of paths and one <image> placeholder per image"

    def check_format(self, fmt, keys, cfg, source) -> None:
        if fmt not in self.formats:
            raise DataError(f"{source}: task {self.name} needs {self.data_hint}; the rows have {sorted(keys)}"
                            + (f" ({fmt} data)" if fmt else ""))

    def owns_model(self, model_name: str, hf_cfg: Any) -> bool:
        return is_vlm(hf_cfg)

    def accepts_model(self, model_name: str, hf_cfg: Any) -> bool:
        return is_vlm(hf_cfg)

    def model_class(self, hf_cfg: Any = None):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def load_processor(self, cfg: Any, path: str | None) -> Any:
        from ..config import JobConfigError

        return vlm_processor(path, lambda msg: JobConfigError(f"model '{cfg.model_name()}': {msg}"))

    def describe(self, data: Any) -> str | None:
        return None

    # ---- the adapter -------------------------------------------------------------------------------
    def adapter_defaults(self, model: nn.Module, kw: dict[str, Any], fields: set[str], why: list[str]) -> None:
        """LoRA on the language model's attention + MLP unless target_modules is set; the switches
        (popped here: they are the task's, not the method's) add the vision tower or drop the LM."""
        from ..config import JobConfigError

        if "r" in fields and "r" not in kw:
            kw["r"] = 16
            why.append("r=16: a vision-language model generates (unsloth's vision default)")
        vision = kw.pop("finetune_vision_layers", False)
        language = kw.pop("finetune_language_layers", True)
        if "target_modules" in kw or "target_modules" not in fields:
            if vision or not language:
                raise JobConfigError("method.finetune_vision_layers / finetune_language_layers choose the default "
                                     "targets; with method.target_modules set (or a method without targets) remove them")
            return
        try:
            kw["target_modules"] = family_targets(model, bool(vision), bool(language))
        except ValueError as e:
            raise JobConfigError(f"method: {e}") from None
        what = " and ".join(x for x, on in (("the language model's attention/MLP", language),
                                            ("the vision tower and projector", vision)) if on)
        why.append(f"target_modules: {what} (method.finetune_vision_layers / finetune_language_layers switch them)")

    task_keys = ("finetune_vision_layers", "finetune_language_layers")

    # ---- evaluation --------------------------------------------------------------------------------
    def measured_metrics(self, ev: Any) -> list[str]:
        return ["eval_loss", "exact_match", "answer_f1"]

    def default_metric(self, ev: Any) -> str:
        return "exact_match"

    @torch.no_grad()
    def evaluate(self, ev: Any) -> dict[str, float]:
        """Loss over the held-out answers, then greedy answers to the held-out prompts."""
        from .vlm_io import answer_metrics, collate_vlm, generate_answers, load_images

        model = ev._eval_model()
        tot, n = 0.0, 0
        bs = ev.cfg.eval.batch_size
        pad = _pad_id(ev.tok)
        for i in range(0, len(ev.data.eval), bs):
            chunk = ev.data.eval[i:i + bs]
            batch = {k: v.to(ev.device) for k, v in collate_vlm(chunk, pad).items()}
            with ev.acc.autocast():
                out = model(**batch)
            k = int((batch["labels"][:, 1:] != -100).sum())
            tot += float(out["loss"]) * k
            n += k
        base = ev.model_unwrapped.get_base_model()
        rows = ev.data.eval[:ev.cfg.eval.max_examples]  # the generated answers: at most eval.max_examples of them
        hyps = generate_answers(base, ev.tok, [e["prompt"] for e in rows],
                                [load_images(e["images"], ev.data.source, j) for j, e in enumerate(rows, 1)],
                                ev.cfg.eval.max_new_tokens, bs)
        refs = [e["reference"] for e in rows]
        res = {"eval_loss": tot / max(n, 1), **answer_metrics(hyps, refs)}
        ev.last_samples = [{"prompt": e["prompt"], "reference": r, "generated": h} for e, r, h in zip(rows[:5], refs, hyps)]
        return res

    # ---- predict -----------------------------------------------------------------------------------
    def read_inputs(self, source: str) -> list[dict[str, Any]]:
        from ..datafiles import read_rows
        from .image_classification import read_image_inputs

        p = Path(source)
        if p.is_dir() or p.suffix.lower() in _image_ext():
            return read_image_inputs(source)
        rows = read_rows(source)
        return [{**r, "_source": source} for r in rows]

    @torch.no_grad()
    def predict(self, model, processor, rows, opts):
        """Each row plus `answer`: chat rows (the conversation up to its last assistant turn, which is
        generated), or image rows answered with opts["prompt"]."""
        from .vlm_io import generate_answers, load_images, messages_of, render, row_images

        model.eval()
        prompts, images = [], []
        for i, r in enumerate(rows, 1):
            src = r.get("_source", "input")
            if "image" in r and "messages" not in r:
                q = opts.get("prompt")
                if not q:
                    raise DataError("a vision-language model answers a question about each image: pass --prompt "
                                    "'What is in the image?' (or give chat rows with 'messages' and 'images')")
                msgs = [{"role": "user", "content": "<image>" + q}]
                paths = [r["image"]]
            else:
                msgs = messages_of(r, "messages", src, i)
                if msgs[-1]["role"] == "assistant":
                    msgs = msgs[:-1]
                paths = row_images({**r, "images": r.get("images")}, msgs, src, i)
            prompts.append(render(processor, msgs, True))
            images.append(load_images(paths, src, i))
        answers = generate_answers(model.get_base_model(), processor, prompts, images, opts["max_new_tokens"],
                                   opts["batch_size"])
        return [{**{k: v for k, v in r.items() if k != "_source"}, "answer": a} for r, a in zip(rows, answers)]

    def load_for_adapter(self, path: str, adapter: str | None, load_kwargs: dict | None) -> tuple[nn.Module, Any]:
        from ..job import hf_quiet

        proc_dir = adapter if adapter and (Path(adapter) / "processor_config.json").is_file() else path
        proc = vlm_processor(proc_dir, ValueError)
        with hf_quiet():
            model = self.model_class().from_pretrained(path, dtype=torch.float32, **(load_kwargs or {}))
        return model, proc


def _image_ext():
    from .media import IMAGE_EXT

    return IMAGE_EXT


def _pad_id(proc: Any) -> int:
    tok = getattr(proc, "tokenizer", proc)
    return tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0


def vlm_processor(path: str | None, error=ValueError):
    """The model folder's AutoProcessor (image processor + tokenizer + chat template), with a pad token."""
    from transformers import AutoProcessor

    from ..job import hf_quiet

    if path is None:
        raise error("a vision-language model needs its folder (config, weights, processor)")
    try:
        with hf_quiet():
            proc = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise error(f"no processor could be loaded from {path} ({str(e)[:200]}); the folder needs the model's "
                    "processor files (save_pretrained of its AutoProcessor)") from None
    tok = getattr(proc, "tokenizer", None)
    if tok is None or not hasattr(proc, "image_processor"):
        raise error(f"the processor in {path} is {type(proc).__name__}, not an image + text processor")
    if getattr(proc, "chat_template", None) is None:
        raise error(f"the processor in {path} has no chat template; save one with the processor (chat_template.jinja)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return proc


