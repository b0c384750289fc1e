"""Files of images (and audio) named in data rows or laid out as class folders: the shared reading
rules of the media tasks. Not a task itself (it registers nothing).

    rows = folder_rows("photos/")              # [{"image": ".../photos/cat/1.jpg", "label": "cat"}, ...]
    path = media_path(row["image"], source)    # relative paths are relative to the data file
    refuse_media_text(rows, "text", source)    # a text column of file paths is a mistake, said so
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..datafiles import DataError

MEDIA_FORMATS = ("image_files", "audio_files", "speech", "vision_chat")  # data formats whose rows name files (data.py)
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_EXT = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus")


def folder_rows(folder: str, label_column: str = "label") -> list[dict[str, Any]]:
    """One row per file in a folder holding a subfolder per class (the subfolder's name is the label):
    images ({"image": path}) or, when the folder holds audio files only, audio ({"audio": path})."""
    root = Path(folder)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        from ..datafiles import SUFFIXES

        raise DataError(f"{folder}: is a folder, not a file; give the data file itself (one of {', '.join(SUFFIXES)}), "
                        "or a folder of images with a subfolder per class (photos/cat/*.jpg, photos/dog/*.jpg)")
    files = [(d, f) for d in classes for f in sorted(d.rglob("*")) if f.is_file()]
    audio = any(f.suffix.lower() in AUDIO_EXT for _, f in files) and \
        not any(f.suffix.lower() in IMAGE_EXT for _, f in files)
    column, exts = ("audio", AUDIO_EXT) if audio else ("image", IMAGE_EXT)
    rows = [{column: str(f.resolve()), label_column: d.name} for d, f in files if f.suffix.lower() in exts]
    found = sorted({r[label_column] for r in rows})
    if len(found) < 2:
        what = f"one class folder ({found[0]!r})" if found else "no class folder with files"
        raise DataError(f"{folder}: {what} holding {'/'.join(exts[:4])} files; a classifier needs a subfolder per "
                        "class, at least 2 (photos/cat/*.jpg, photos/dog/*.jpg)")
    return rows


def media_path(value: Any, source: str) -> Path:
    """A row's file path: absolute as given, else relative to the data file's folder (or the folder itself)."""
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        return p
    base = Path(source)
    return (base if base.is_dir() else base.parent) / p


def looks_like_paths(values: list[Any], exts: tuple[str, ...]) -> bool:
    """Most of these values are file names with one of these extensions."""
    vals = [str(v).strip().lower() for v in values[:50] if v is not None]
    return bool(vals) and sum(v.endswith(exts) and "\n" not in v for v in vals) >= 0.8 * len(vals)


def refuse_media_text(rows: list[dict[str, Any]], column: str, source: str) -> None:
    """A text column of image / audio file names would train a text model on the paths (whose folder
    names often give the class away): refused, with the fix."""
    vals = [r.get(column) for r in rows]
    for exts, what, col, task in ((IMAGE_EXT, "image", "image", "image_classification"),
                                  (AUDIO_EXT, "audio", "audio", "audio_classification or speech_recognition")):
        if looks_like_paths(vals, exts):
            raise DataError(f"{source}: the text column {column!r} holds {what} file paths (e.g. {str(vals[0])!r}), "
                            f"so a text model would learn from the file names; rename the column to {col!r} and "
                            f"train an {what} model (task: {task}), or point data.text_column at real text")


def refuse_media_labels(rows: list[dict[str, Any]], column: str, source: str) -> None:
    """A label column of image / audio file names (columns swapped, or the path put where the class
    goes) would make every file its own class: refused, with the fix."""
    vals = [r.get(column) for r in rows]
    for exts, what in ((IMAGE_EXT, "image"), (AUDIO_EXT, "audio")):
        if looks_like_paths(vals, exts):
            raise DataError(f"{source}: the label column {column!r} holds {what} file paths (e.g. {str(vals[0])!r}), "
                            f"not class names; put the file paths in an {what!r} column and each file's class in "
                            f"{column!r} (or set data.label_column to the column with the classes)")
