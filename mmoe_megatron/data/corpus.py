"""Reading a text corpus: JSONL with a text field, or plain-text files, possibly many shards.

    paths = expand_inputs(["data/shards/", "extra/*.jsonl.gz", "notes.txt"])
    for doc in iter_documents(paths, json_key="text", text_mode="file"):
        ...

Order is deterministic: inputs in the order given, each directory or glob sorted by path, each
file front to back. Every problem (a missing or empty file, a line that is not JSON, a record
without the text field, bytes that are not UTF-8) raises `DataError` naming the file (and line)
and the fix.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

from mmoe_megatron.data.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
TextMode = Literal["file", "paragraph", "line"]
TEXT_MODES = ("file", "paragraph", "line")


def _kind(path: str) -> str | None:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _supported() -> str:
    return ", ".join(JSON_SUFFIXES + TEXT_SUFFIXES) + " (each optionally .gz)"


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files named by `inputs`: files as given, directories searched recursively, globs expanded.

    Raises `DataError` for an input that matches nothing, a file of unknown type, or an empty file.
    """
    if not inputs:
        raise DataError("no input files given; pass at least one file, directory or glob")
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if _kind(name)
            )
            if not found:
                raise DataError(
                    f"input directory {item} holds no corpus files; expected {_supported()}"
                )
        elif os.path.isfile(item):
            if _kind(item) is None:
                raise DataError(
                    f"input {item}: unknown file type; rename it to one of {_supported()}"
                )
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p) and _kind(p))
            if not found:
                raise DataError(
                    f"input {item} does not exist (or, as a glob, matches no {_supported()} "
                    "file); check the path"
                )
        paths.extend(found)
    for path in paths:
        if os.path.getsize(path) == 0:
            raise DataError(f"input file {path} is empty; regenerate it or leave it out of the inputs")
    return paths


def _open_text(path: str):
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    # Strict decoding: a corpus in another encoding should fail loudly, not train on U+FFFD.
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


@dataclass(frozen=True)
class RawDocument:
    text: str
    num_input_bytes: int
    """Bytes of the input file this document came from (for progress reporting)."""


def _iter_json(path: str, json_key: str) -> Iterator[RawDocument]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            size = len(line.encode("utf-8"))
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({err.msg}); a JSONL corpus holds one JSON "
                    "object per line"
                ) from None
            if not isinstance(record, dict) or json_key not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}:{lineno}: no field {json_key!r} in the record (it has {fields}); "
                    "pass the name of the text field with --json-key"
                )
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: field {json_key!r} is a {type(text).__name__}, not a string; "
                    "pass the name of the text field with --json-key"
                )
            yield RawDocument(text, size)


def _iter_text(path: str, text_mode: str) -> Iterator[RawDocument]:
    with _open_text(path) as f:
        if text_mode == "line":
            for line in f:
                yield RawDocument(line.rstrip("\r\n"), len(line.encode("utf-8")))
            return
        content = f.read()
    size = len(content.encode("utf-8"))
    if text_mode == "file":
        yield RawDocument(content, size)
        return
    # paragraph: documents separated by one or more blank lines.
    content = content.replace("\r\n", "\n")
    parts = list(_split_paragraphs(content))
    for i, part in enumerate(parts):
        yield RawDocument(part, size // len(parts) + (size % len(parts) if i == 0 else 0))


def _split_paragraphs(content: str) -> Iterator[str]:
    block: list[str] = []
    for line in content.split("\n"):
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def iter_documents(
    paths: Sequence[str], json_key: str = "text", text_mode: TextMode = "file"
) -> Iterator[RawDocument]:
    """Every document of `paths` (from `expand_inputs`) in order.

    JSONL: one document per line, the string in `json_key`. Plain text: `text_mode` file (the whole
    file is one document), paragraph (blank lines separate documents) or line.
    """
    if text_mode not in TEXT_MODES:
        raise DataError(f"text mode {text_mode!r} is not one of {TEXT_MODES}")
    for path in paths:
        kind = _kind(path)
        try:
            if kind == "json":
                yield from _iter_json(path, json_key)
            else:
                yield from _iter_text(path, text_mode)
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: not UTF-8 at byte {err.start} ({err.reason}); convert the file, e.g. "
                f"`iconv -f latin1 -t utf-8 {path} > fixed{os.path.splitext(path)[1]}`"
            ) from None
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: cannot be read ({err}); check the file is complete") from None


def input_bytes(paths: Sequence[str]) -> int | None:
    """Total size of uncompressed inputs (progress total); None when any input is gzipped."""
    if any(p.endswith(".gz") for p in paths):
        return None
    return sum(os.path.getsize(p) for p in paths)


def write_jsonl(path: str, docs: Sequence[dict]) -> None:
    """Write records one per line, atomically (a crash never leaves a half-written corpus)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
