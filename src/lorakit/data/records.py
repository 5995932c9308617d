"""Text data files record by record: which forms of file are read, and which line breaks one.

``datasets`` reads csv / tsv / json / jsonl files, compressed or not, fast; when one record of many
thousands is malformed its error does not say where ("An error occurred while generating the
dataset"). :func:`find_bad_record` reads the files again with the standard library, only after
``datasets`` has failed, and names the first malformed record by its file and line.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: Compressed forms of text files that ``datasets`` (and :func:`open_text`) decompress while reading.
COMPRESSIONS: dict[str, Callable[..., IO[str]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
#: The file formats by their (uncompressed) suffix: the ``datasets`` builder that reads each.
BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
#: Spreadsheets are not read (no reader is installed); the message says how to export one.
SPREADSHEETS = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")
#: What works, as error messages name it.
READABLE = (
    ".csv / .tsv / .json / .jsonl / .parquet files (the text ones also .gz / .bz2 / .xz compressed), "
    "a folder of such files, or an image folder"
)


def split_suffix(path: str | Path) -> tuple[str, str]:
    """``(format suffix, compression suffix)`` of a file name: ``reviews.csv.gz`` -> (".csv", ".gz")."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), ""


def is_data_file(path: Path) -> bool:
    """A file :data:`BUILDERS` reads (a shard of a folder of data files)."""
    fmt, comp = split_suffix(path)
    return path.is_file() and fmt in BUILDERS and not (fmt == ".parquet" and comp)


def open_text(path: str | Path) -> IO[str]:
    """The file as UTF-8 text (a leading byte-order mark dropped), decompressed by its suffix."""
    opener = COMPRESSIONS.get(split_suffix(path)[1])
    if opener is None:
        return open(path, encoding="utf-8-sig", newline="")
    return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8-sig", newline="")


@dataclass(frozen=True)
class BadRecord:
    """Where a file stops being readable and why."""

    file: str
    where: str  # "line 12", or "record 3" of a JSON array
    reason: str
    text: str = ""  # the start of that line, to show

    def message(self, key: str) -> str:
        shown = self.text.strip()
        shown = f" ({shown[:60] + ('...' if len(shown) > 60 else '')!r})" if shown else ""
        return f"{key}: '{self.file}' {self.where}: {self.reason}{shown}; fix or remove it"


def find_bad_record(files: list[str], builder: str, delimiter: str = ",") -> BadRecord | None:
    """The first malformed record of ``files`` read as ``builder`` (``csv`` or ``json``), or None when
    every record is well formed (the failure lies elsewhere)."""
    find = {"csv": _bad_csv_record, "json": _bad_json_record}.get(builder)
    if find is None:
        return None
    for f in files:
        try:
            with open_text(f) as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError, EOFError, lzma.LZMAError):
            return None
        bad = find(f, text, delimiter)
        if bad is not None:
            return bad
    return None


def _bad_csv_record(file: str, text: str, delimiter: str) -> BadRecord | None:
    lines = text.splitlines()
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return None
        start = reader.line_num + 1
        for record in reader:
            if record and len(record) != len(header):
                return BadRecord(
                    file,
                    f"line {start}",
                    f"{len(record)} fields where the header has {len(header)} (a stray "
                    f"'{delimiter}' or quote?)",
                    lines[start - 1] if start <= len(lines) else "",
                )
            start = reader.line_num + 1
    except csv.Error as exc:
        shown = lines[start - 1] if start <= len(lines) else ""
        if "unexpected end of data" in str(exc) or reader.line_num >= len(lines):
            return BadRecord(file, f"line {start}", "a quote opened here is never closed", shown)
        spans = (
            f"; the record runs on to line {reader.line_num}: a quote left open?"
            if reader.line_num > start
            else ""
        )
        return BadRecord(file, f"line {start}", f"not valid csv ({exc}{spans})", shown)
    return None


def _bad_json_record(file: str, text: str, delimiter: str) -> BadRecord | None:
    stripped = text.lstrip()
    if not stripped:
        return None
    lines = text.splitlines()
    try:  # one JSON document: an array of records, or an object of columns
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        if stripped.startswith("["):
            return BadRecord(file, f"line {exc.lineno}", f"not valid JSON ({exc.msg})", lines[exc.lineno - 1])
    else:
        records = whole if isinstance(whole, list) else []
        odd = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if odd is None:
            return None
        return BadRecord(file, f"record {odd}", f"a JSON {type(records[odd]).__name__}, not an object")
    for number, line in enumerate(lines, 1):  # JSON lines: one record per line
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return BadRecord(file, f"line {number}", f"not valid JSON ({exc.msg}, column {exc.colno})", line)
        if not isinstance(record, dict):
            return BadRecord(file, f"line {number}", f"a JSON {type(record).__name__}, not an object", line)
    return None
