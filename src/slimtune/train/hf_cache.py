"""A packaged model's converted folder, also reachable by its Hub id through Hugging Face's cache.

An adapter trained here records its base by Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`), which is
right on other machines. Offline, `AutoModelForCausalLM.from_pretrained(adapter_folder)` and
`peft.AutoPeftModelForCausalLM` look that id up in the Hugging Face cache ($HF_HUB_CACHE, else
$HF_HOME/hub) and find nothing. So the job links its converted folder into the cache in the Hub's
own layout:

    models--HuggingFaceTB--SmolLM2-135M-Instruct/
        refs/main                   -> the snapshot's revision (40 hex digits, as the Hub's are)
        snapshots/<revision>/FILE   -> a symlink to FILE in slimtune's converted folder

The revision is derived from the source (the packaged file), so it never equals a Hub commit. A
cache entry that is not slimtune's (a real download) is left alone: transformers then uses it.
SLIMTUNE_HF_CACHE_LINK=0 turns the linking off.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

_SKIP = {".complete"}  # slimtune's own marker files, not the model's


def hub_cache_root() -> Path:
    """Where huggingface_hub (and so transformers and peft) look for downloaded models."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_dir(hub_id: str, root: Path | None = None) -> Path:
    return (root or hub_cache_root()) / ("models--" + hub_id.replace("/", "--"))


def revision_for(hub_id: str, source: str) -> str:
    """A commit-like revision naming slimtune's copy (huggingface_hub accepts only 40 hex digits)."""
    return hashlib.sha1(f"slimtune:{hub_id}:{source}".encode()).hexdigest()


def snapshot_of(hub_id: str, root: Path | None = None) -> Path | None:
    """The folder the cache's refs/main points at, or None when the id is not in the cache."""
    repo = repo_dir(hub_id, root)
    try:
        rev = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snap = repo / "snapshots" / rev
    return snap if (snap / "config.json").exists() else None


def is_slimtune_snapshot(hub_id: str, source: str, root: Path | None = None) -> bool:
    """Whether the cache's current snapshot of `hub_id` is the one slimtune made from `source`."""
    snap = snapshot_of(hub_id, root)
    return snap is not None and snap.name == revision_for(hub_id, source)


def is_link_to(snapshot: Path | None, folder: Path) -> bool:
    """Whether a cache snapshot is slimtune's link to `folder` (its config.json resolves there)."""
    if snapshot is None:
        return False
    try:
        return os.path.samefile(snapshot / "config.json", folder / "config.json")  # a symlink or a hard link
    except OSError:
        return False


def link_into_cache(hub_id: str, folder: Path, source: str, log=print) -> Path | None:
    """Make `hub_id` resolve offline to `folder`: the snapshot's path, or None when the cache holds
    another copy of that id (kept) or cannot be written (a warning, never an error: the job itself
    does not need the link)."""
    if os.environ.get("SLIMTUNE_HF_CACHE_LINK", "1") == "0":
        return None
    if log is print:  # a command's stdout may be its output (predict's JSONL): notes go to stderr
        log = functools.partial(print, file=sys.stderr)
    root = hub_cache_root()
    current = snapshot_of(hub_id, root)
    rev = revision_for(hub_id, source)
    if is_link_to(current, folder) and all((current / f.name).exists() for f in _files(folder)):
        return current
    if current is not None and current.name != rev:
        return None  # a real download of that id (or another tool's): transformers uses it as it is
    repo = repo_dir(hub_id, root)
    try:
        (repo / "snapshots").mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".slimtune-", dir=repo / "snapshots"))
        try:
            for f in _files(folder):
                _link(f, tmp / f.name)
            snap = repo / "snapshots" / rev
            if snap.exists() and not is_link_to(snap, folder):  # slimtune's, pointing at another folder
                shutil.rmtree(snap, ignore_errors=True)
            try:
                os.replace(tmp, snap)
            except OSError:
                if not is_link_to(snap, folder):  # not a concurrent run that linked the same folder first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ref_tmp = repo / "refs" / f".main.{os.getpid()}"
        ref_tmp.write_text(rev)
        os.replace(ref_tmp, repo / "refs" / "main")
    except OSError as e:
        log(f"warning: could not link {folder} into the Hugging Face cache as {hub_id} ({e.strerror or e}); "
            "transformers and peft will not find that id offline (slimtune itself is unaffected)")
        return None
    log(f"linked {folder} into the Hugging Face cache as {hub_id} ({repo}), so transformers and peft load "
        "adapters of it offline (SLIMTUNE_HF_CACHE_LINK=0 turns this off)")
    return repo / "snapshots" / rev


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name not in _SKIP)


def _link(src: Path, dst: Path) -> None:
    """A symlink (no copy of 500 MB of weights); a hard link or a copy where symlinks are refused."""
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
