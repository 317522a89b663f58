"""megatron-core indexed datasets (`<prefix>.bin` + `<prefix>.idx`): write them, check them.

    stats = preprocess(["corpus.jsonl"], "tok/tokenizer.model", "data/corpus_text_document",
                       num_workers=2)
    summary = check_indexed_dataset("data/corpus_text_document")

Writing goes through megatron-core's `IndexedDatasetBuilder`: one sequence per document (so
megatron's train/validation/test split, which cuts by sequence, cuts by document), each ending
in the tokenizer's end-of-document id. Workers tokenize in parallel; results come back in input
order, so the output is byte-identical for any number of workers. Files are written under
temporary names and renamed at the end, the `.idx` last: a prefix with an `.idx` is complete.
Beside them, `<prefix>.json` records the tokenizer (path, SHA-256, vocabulary size) and the counts.

With `valid_fraction > 0` each document goes to `<prefix>_train` or `<prefix>_valid` by a seeded
hash of its text, so the split is stable under reordering and exact duplicates never straddle it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from mmoe_megatron.data.corpus import RawDocument, TextMode, expand_inputs, input_bytes, iter_documents
from mmoe_megatron.data.errors import DataError
from mmoe_megatron.data.tokenizer import SentencePieceEncoder, file_sha256, is_sentencepiece

_INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron/core/datasets/indexed_dataset.py:47
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}  # indexed_dataset.DType


@dataclass
class PreprocessStats:
    outputs: dict[str, str]
    """Split name ("all", or "train" and "valid") -> dataset prefix written."""
    num_documents: dict[str, int]
    num_tokens: dict[str, int]
    """Tokens written per output, end-of-document tokens included."""
    num_skipped: int
    """Documents dropped as shorter than min_chars (after stripping whitespace)."""
    num_text_bytes: int
    """UTF-8 bytes of the kept documents' text."""
    num_workers: int
    seconds: float
    append_eod: bool = True
    inputs: list[str] = field(default_factory=list)

    @property
    def total_documents(self) -> int:
        return sum(self.num_documents.values())

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens.values())

    def summary(self) -> str:
        docs, tokens, s = self.total_documents, self.total_tokens, max(self.seconds, 1e-9)
        text_tokens = tokens - (docs if self.append_eod else 0)  # bytes/token of the text alone
        return (
            f"{docs:,} documents ({self.num_skipped:,} skipped), {tokens:,} tokens, "
            f"{self.num_text_bytes / 1e6:.2f} MB of text, "
            f"{self.num_text_bytes / max(text_tokens, 1):.3f} bytes/token; "
            f"{s:.1f} s with {self.num_workers} worker(s): {docs / s:,.0f} docs/s, "
            f"{tokens / s:,.0f} tokens/s, {self.num_text_bytes / s / 1e6:.2f} MB/s"
        )


# --- worker side: imports sentencepiece and numpy only ---------------------------------------

_encoder = None
_options: dict = {}


def _init_worker(tokenizer_path: str, options: dict) -> None:
    global _encoder, _options
    _options = options
    if is_sentencepiece(tokenizer_path):
        _encoder = SentencePieceEncoder(tokenizer_path)
    else:  # any other library megatron-core can load (imports torch: slower to start)
        from mmoe_megatron.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        tok.encode = tok.tokenize
        _encoder = tok


def _split_key(text: str, seed: int) -> float:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


def _encode(doc: RawDocument) -> tuple:
    """-> (token ids or None when filtered out, text bytes, input bytes, split key in [0, 1))."""
    text, opts = doc.text, _options
    if len(text.strip()) < opts["min_chars"]:
        return None, 0, doc.num_input_bytes, 0.0
    ids = _encoder.encode(text)
    if opts["append_eod"]:
        ids.append(_encoder.eod)
    return (np.asarray(ids, dtype=opts["dtype"]), len(text.encode("utf-8")), doc.num_input_bytes,
            _split_key(text, opts["seed"]))


# --- writer side -----------------------------------------------------------------------------


class _Output:
    """One dataset being written under temporary names."""

    def __init__(self, prefix: str, dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.builder = IndexedDatasetBuilder(f"{prefix}.bin.tmp", dtype=dtype)
        self.num_documents = 0
        self.num_tokens = 0
        self.num_text_bytes = 0

    def add(self, ids: np.ndarray, num_text_bytes: int) -> None:
        self.builder.add_document(ids, [ids.size])
        self.num_documents += 1
        self.num_tokens += int(ids.size)
        self.num_text_bytes += num_text_bytes

    def commit(self, sidecar: dict) -> None:
        self.builder.finalize(f"{self.prefix}.idx.tmp")
        os.replace(f"{self.prefix}.bin.tmp", f"{self.prefix}.bin")
        with open(f"{self.prefix}.json.tmp", "w") as f:
            json.dump(sidecar, f, indent=2)
        os.replace(f"{self.prefix}.json.tmp", f"{self.prefix}.json")
        os.replace(f"{self.prefix}.idx.tmp", f"{self.prefix}.idx")

    def abort(self) -> None:
        self.builder.data_file.close()
        for suffix in (".bin.tmp", ".idx.tmp", ".json.tmp"):
            if os.path.exists(self.prefix + suffix):
                os.remove(self.prefix + suffix)


def _rates(outputs: dict, seconds: float) -> str:
    docs = sum(o.num_documents for o in outputs.values())
    tokens = sum(o.num_tokens for o in outputs.values())
    return f"{docs / max(seconds, 1e-9):,.0f} docs/s, {tokens / max(seconds, 1e-9):,.0f} tok/s"


def _progress_bar(enabled: bool, total: Optional[int]):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled,
                desc="tokenizing", dynamic_ncols=True, mininterval=0.5)


def preprocess(
    inputs: Sequence[str],
    tokenizer_path: str,
    output_prefix: str,
    json_key: str = "text",
    text_mode: TextMode = "file",
    num_workers: int = 1,
    append_eod: bool = True,
    min_chars: int = 1,
    valid_fraction: float = 0.0,
    seed: int = 1234,
    chunk_size: int = 16,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize the documents of `inputs` into indexed dataset(s) at `output_prefix`.

    `num_workers` processes tokenize (1 = in this process). Documents whose stripped text is
    shorter than `min_chars` are skipped. Raises `DataError` when no document (or none for one
    of the splits) remains.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid fraction {valid_fraction} must be in [0, 1)")
    if num_workers < 1:
        raise DataError(f"--workers {num_workers}: need at least 1")
    for suffix in (".bin", ".idx"):
        if output_prefix.endswith(suffix):
            raise DataError(
                f"output prefix {output_prefix} ends in {suffix}; give the prefix without it "
                f"({output_prefix[: -len(suffix)]})"
            )
    paths = expand_inputs(inputs)
    encoder = SentencePieceEncoder(tokenizer_path) if is_sentencepiece(tokenizer_path) else None
    if encoder is None:
        from mmoe_megatron.data.tokenizer import load_tokenizer

        encoder = load_tokenizer(tokenizer_path)
    vocab_size, eod = encoder.vocab_size, encoder.eod
    # What megatron-LM's preprocess_data.py picks: 2 bytes per token below 65,500 pieces.
    dtype = np.uint16 if vocab_size < 65500 else np.int32

    names = ["train", "valid"] if valid_fraction > 0 else ["all"]
    prefixes = {n: output_prefix if n == "all" else f"{output_prefix}_{n}" for n in names}
    outputs = {n: _Output(p, dtype) for n, p in prefixes.items()}
    skipped = 0
    start = time.perf_counter()
    jobs = iter_documents(paths, json_key, text_mode)
    options = {"min_chars": min_chars, "append_eod": append_eod, "seed": seed, "dtype": dtype}
    pool = None
    try:
        if num_workers > 1:
            # spawn, not fork: the caller may hold threads (torch, gloo) that fork would copy
            # mid-lock. Workers import only sentencepiece and numpy, so they start in ~0.2 s.
            pool = mp.get_context("spawn").Pool(
                num_workers, _init_worker, (tokenizer_path, options)
            )
            results = pool.imap(_encode, jobs, chunksize=chunk_size)
        else:
            _init_worker(tokenizer_path, options)
            results = map(_encode, jobs)
        bar = _progress_bar(progress, input_bytes(paths))
        last = start
        with bar:
            for ids, num_text_bytes, num_input_bytes, key in results:
                bar.update(num_input_bytes)
                if ids is None:
                    skipped += 1
                    continue
                name = names[0] if len(names) == 1 else ("valid" if key < valid_fraction else "train")
                outputs[name].add(ids, num_text_bytes)
                now = time.perf_counter()
                if now - last > 0.5:
                    last = now
                    bar.set_postfix_str(_rates(outputs, now - start), refresh=False)
            bar.set_postfix_str(_rates(outputs, time.perf_counter() - start))
        for name, out in outputs.items():
            if out.num_documents == 0:
                what = "documents" if name == "all" else f"documents in the {name} split"
                fix = (
                    "check --json-key / --text-mode and lower --min-chars"
                    if name == "all" or sum(o.num_documents for o in outputs.values()) == 0
                    else "raise --valid-fraction or give more documents"
                )
                raise DataError(
                    f"no {what} left after filtering {', '.join(paths)} "
                    f"({skipped} shorter than --min-chars {min_chars}); {fix}"
                )
        seconds = time.perf_counter() - start
        tokenizer_sha = file_sha256(tokenizer_path)
        for name, out in outputs.items():
            out.commit({
                "tokenizer": os.path.abspath(tokenizer_path),
                "tokenizer_sha256": tokenizer_sha,
                "vocab_size": vocab_size,
                "eod": eod,
                "append_eod": append_eod,
                "num_documents": out.num_documents,
                "num_tokens": out.num_tokens,
                "num_text_bytes": out.num_text_bytes,
                "split": name,
                "valid_fraction": valid_fraction,
                "seed": seed,
                "inputs": [os.path.abspath(p) for p in paths],
            })
    except BaseException:
        for out in outputs.values():
            out.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return PreprocessStats(
        outputs=prefixes,
        num_documents={n: o.num_documents for n, o in outputs.items()},
        num_tokens={n: o.num_tokens for n, o in outputs.items()},
        num_skipped=skipped,
        num_text_bytes=sum(o.num_text_bytes for o in outputs.values()),
        num_workers=num_workers,
        seconds=seconds,
        append_eod=append_eod,
        inputs=list(paths),
    )


# --- checking a dataset before megatron-core reads it ---------------------------------------


@dataclass(frozen=True)
class IndexSummary:
    prefix: str
    num_documents: int
    num_tokens: int
    dtype: str
    sidecar: Optional[dict]
    """`<prefix>.json` as written by `preprocess`; None for datasets made by other tools."""


def _rebuild_hint(prefix: str) -> str:
    return (f"`python tools/preprocess_data.py --input CORPUS --tokenizer TOKENIZER "
            f"--output-prefix {prefix}`")


def check_indexed_dataset(prefix: str) -> IndexSummary:
    """Check `<prefix>.idx` / `<prefix>.bin` against each other; raise `DataError` naming the file
    and the fix for a missing file, a corrupted or truncated index, or a dataset with no documents.

    megatron-core itself only asserts on the header and would otherwise read past the end.
    """
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            raise DataError(
                f"dataset prefix {prefix} ends in {suffix}; a prefix names both files, use "
                f"{prefix[: -len(suffix)]}"
            )
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    for path, other in ((idx_path, bin_path), (bin_path, idx_path)):
        if not os.path.isfile(path):
            directory = os.path.dirname(os.path.abspath(prefix))
            stem = os.path.basename(prefix)
            near = sorted(
                os.path.join(os.path.dirname(prefix), n[:-4]) for n in os.listdir(directory)
                if n.endswith(".idx") and (n.startswith(stem) or stem.startswith(n[:-4]))
            ) if os.path.isdir(directory) else []
            hint = f" (found datasets: {', '.join(near)})" if near else ""
            state = "without" if os.path.isfile(other) else "and no"
            raise DataError(
                f"dataset prefix {prefix}: {path} not found ({state} {os.path.basename(other)})"
                f"{hint}; create the dataset with {_rebuild_hint(prefix)} or fix the prefix in "
                "data.blend / data.valid_blend"
            )

    def corrupt(problem: str) -> DataError:
        return DataError(
            f"{idx_path} is corrupted: {problem}; it was not fully written by megatron-core's "
            f"IndexedDatasetBuilder. Delete {prefix}.idx and {prefix}.bin and rebuild with "
            f"{_rebuild_hint(prefix)}"
        )

    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES:
        raise corrupt(f"{idx_size} bytes, shorter than the {_HEADER_BYTES}-byte header")
    if header[:9] != _INDEX_HEADER:
        raise corrupt(f"wrong magic bytes {header[:9]!r} (expected {_INDEX_HEADER!r})")
    version, code, num_sequences, num_doc_indices = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise corrupt(f"format version {version}, expected 1")
    if code not in _DTYPES:
        raise corrupt(f"unknown token dtype code {code}")
    expected = _HEADER_BYTES + 4 * num_sequences + 8 * num_sequences + 8 * num_doc_indices
    if idx_size != expected:
        raise corrupt(
            f"{idx_size} bytes where {num_sequences} sequences and {num_doc_indices - 1} "
            f"documents need {expected} (truncated or overwritten)"
        )
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=num_sequences, offset=_HEADER_BYTES)
    doc_index = np.frombuffer(
        mm, dtype=np.int64, count=num_doc_indices, offset=_HEADER_BYTES + 12 * num_sequences
    )
    if num_doc_indices < 1 or doc_index[0] != 0 or doc_index[-1] != num_sequences or np.any(
        np.diff(doc_index) < 0
    ):
        raise corrupt("its document index is not an increasing list from 0 to the sequence count")
    if np.any(lengths < 0):
        raise corrupt("negative sequence lengths")
    num_tokens = int(lengths.sum(dtype=np.int64))
    itemsize = np.dtype(_DTYPES[code]).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != num_tokens * itemsize:
        raise DataError(
            f"{bin_path} has {bin_size} bytes but {idx_path} describes {num_tokens} tokens of "
            f"{itemsize} bytes ({num_tokens * itemsize}); the pair comes from different runs or "
            f"one is truncated. Rebuild both with {_rebuild_hint(prefix)}"
        )
    if num_doc_indices - 1 == 0 or num_tokens == 0:
        raise DataError(
            f"dataset {prefix} ({idx_path}) holds no documents; rebuild it from a non-empty corpus "
            f"with {_rebuild_hint(prefix)} or remove it from data.blend"
        )
    sidecar = None
    if os.path.isfile(f"{prefix}.json"):
        with open(f"{prefix}.json") as f:
            sidecar = json.load(f)
    return IndexSummary(prefix, int(num_doc_indices - 1), num_tokens, np.dtype(_DTYPES[code]).name,
                        sidecar)


def dataset_fingerprint(prefixes: Sequence[str]) -> str:
    """Short hash of the `.idx` files' bytes and the `.bin` sizes.

    megatron-core keys its sample-index cache on paths and settings, not on file contents; a
    dataset rebuilt in place would silently reuse indices made for the old one. Keying the cache
    directory on this fingerprint makes a rebuilt dataset get fresh indices.
    """
    h = hashlib.sha256()
    for prefix in prefixes:
        h.update(prefix.encode() + b"\0")
        h.update(str(os.path.getsize(f"{prefix}.bin")).encode() + b"\0")
        with open(f"{prefix}.idx", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def read_documents(prefix: str) -> list[np.ndarray]:
    """Every document's token ids (for tests and inspection; loads the whole dataset)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_indexed_dataset(prefix)
    dataset = IndexedDataset(prefix)
    return [np.array(dataset[i]) for i in range(len(dataset))]
