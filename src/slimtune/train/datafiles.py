"""Reading a user's data file into rows (plain dicts), or one `DataError` naming the file, the line
and the fix.

    .jsonl / .json   one JSON object per line, or a JSON array of objects
    .csv / .tsv      a header line, then one example per line (every value is text)
    .parquet         a table (pyarrow)
    .txt             one example per non-empty line, as {"text": line}
    + .gz / .bz2 / .xz around any text format

Text is UTF-8 (a byte-order mark is fine; UTF-16 with a BOM is read too). Nothing here goes through
`datasets.load_dataset`, which would copy every file into a cache folder first.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import math
import sys
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Unusable data; the message names the file, the row and the fix."""


SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
_OPEN = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}


def read_rows(path: str) -> list[dict[str, Any]]:
    """The file's examples as dicts; rows whose every value is empty are dropped."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{path}: is a folder, not a file; give the data file itself "
                        f"(one of {', '.join(SUFFIXES)})")
    if not p.is_file():
        raise DataError(f"{path}: file not found (data paths are relative to the config file or the working dir)")
    packed = p.suffix if p.suffix in _OPEN else ""
    kind = Path(p.stem).suffix if packed else p.suffix
    if kind not in SUFFIXES:
        raise DataError(f"{path}: unknown file type '{p.suffix}'; use {', '.join(SUFFIXES)} (optionally .gz/.bz2/.xz)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if packed:
        try:
            raw = _OPEN[packed](raw)
        except Exception as e:  # noqa: BLE001 - each codec raises its own type
            raise DataError(f"{path}: not a valid {packed} file ({type(e).__name__}: {e})") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; put at least one example in it")
    if kind == ".parquet":
        rows = _read_parquet(raw, path)
    else:
        text = decode(raw, path)
        if kind in (".jsonl", ".json"):
            rows = _read_json(text, path, kind)
        elif kind == ".txt":
            rows = [{"text": line} for line in text.splitlines() if line.strip()]
        else:
            rows = _read_csv(text, path, sniff_delimiter(text, "\t" if kind == ".tsv" else ","))
    rows = [r for r in rows if not all(_missing(v) for v in r.values())]
    if not rows:
        raise DataError(f"{path}: no examples in the file (every row is empty); put at least one example in it")
    return rows


def decode(raw: bytes, path: str) -> str:
    """UTF-8 (with or without a BOM) or BOM-marked UTF-16 -> str; anything else is named."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text: byte {raw[e.start]:#04x} at line {line} (offset {e.start}); "
                        "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`), or it is not a text "
                        "file at all") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise DataError(f"{path}: a NUL byte at line {line}: this looks like a binary file, not text data")
    return text


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def _read_json(text: str, path: str, kind: str) -> list[dict[str, Any]]:
    """JSON lines (one object per line) or a JSON array, parsed line by line so a broken row is
    reported with its line number."""
    head = text.lstrip()[:1]
    if head == "[" or (head == "{" and kind == ".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if head == "{":  # a .json file holding JSON lines
                return _read_json_lines(text, path)
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix that line") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read") from None
        inner = next(iter(data.values()), None) if isinstance(data, dict) and len(data) == 1 else None
        if isinstance(inner, list) and inner and all(isinstance(x, dict) and not {"role", "from"} & set(x)
                                                     for x in inner):  # {"data": [examples]}, not one chat row
            raise DataError(f"{path}: the file is one JSON object holding a list under {next(iter(data))!r}; save "
                            "that list alone (a JSON array of examples) or one object per line (JSONL)")
        rows = data if isinstance(data, list) else [data]
    else:
        rows = _read_json_lines(text, path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise DataError(f"{path}: row {i} is {type(r).__name__}, not an object; each example must be a JSON "
                            'object like {"text": ..., "label": ...}')
    return rows


def _read_json_lines(text: str, path: str) -> list[Any]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: row at line {i} is not valid JSON ({e.msg}, column {e.colno}): "
                            f"{line[:80]!r}; each line must be one JSON object") from None
        except RecursionError:
            raise DataError(f"{path}: line {i} is JSON nested too deeply to read") from None
    return rows


_SEPARATORS = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "'|' characters"}


def sniff_delimiter(text: str, default: str) -> str:
    """The separator of a .csv/.tsv whose header line does not contain the usual one: Excel writes
    ';' where the decimal mark is a comma, and a .csv may hold tabs. A header that holds the usual
    separator is read with it; else the one of , ; tab | it holds; with several, csv.Sniffer picks
    from the first lines."""
    header = text.lstrip("\ufeff").split("\n", 1)[0]
    others = [c for c in _SEPARATORS if c != default and c in header]
    if default in header or not others:
        return default
    if len(others) == 1:  # text;label: the one separator-like character in the header
        return others[0]
    sample = text[:65536]
    sample = sample[:sample.rfind("\n") + 1] or sample  # whole lines only
    try:
        return csv.Sniffer().sniff(sample, delimiters="".join(_SEPARATORS)).delimiter
    except csv.Error:  # no consistent separator: read as usual, the header check names the problem
        return default


def _read_csv(text: str, path: str, delimiter: str) -> list[dict[str, Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are data, not an error
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
        names = [h.strip() for h in header]
        if not any(names):
            raise DataError(f"{path}: the first line (the header) is empty; it must name the columns, e.g. text,label")
        other = next((c for c in _SEPARATORS if c != delimiter and len(names) == 1 and c in names[0]), None)
        if other is not None:  # the sniffer found no consistent separator on the first lines
            raise DataError(f"{path}: the header {names[0]!r} is one column holding {other!r}, but the lines do not "
                            f"split evenly on {other!r}; save the file with one separator throughout (comma for .csv, "
                            "tab for .tsv) and quote values that contain it")
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise DataError(f"{path}: column {dup!r} appears twice in the header {names}; rename one")
        if "" in names:
            raise DataError(f"{path}: the header {names} has an empty column name (column {names.index('') + 1}); "
                            "name every column")
        rows = []
        for fields in reader:
            if not fields:  # a blank line
                continue
            if len(fields) != len(names):
                if all(not f.strip() for f in fields):
                    continue
                raise DataError(f"{path}: line {reader.line_num} has {len(fields)} field(s) but the header has "
                                f"{len(names)} ({delimiter.join(names)}); quote values that contain "
                                f"{_SEPARATORS[delimiter]} (\"a{delimiter} b\") or fix the line"
                                + ("" if delimiter in ",\t" else f" (the file is read as {delimiter!r}-separated)"))
            rows.append(dict(zip(names, fields)))
    except csv.Error as e:
        raise DataError(f"{path}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} at line {reader.line_num}: {e}; "
                        "check the quotes on that line") from None
    except StopIteration:
        raise DataError(f"{path}: the file is empty; put a header line and at least one example in it") from None
    return rows


def _read_parquet(raw: bytes, path: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(raw)).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path}: could not be read as parquet ({type(e).__name__}: {str(e)[:200]}); check it is a "
                        "valid parquet file") from None
