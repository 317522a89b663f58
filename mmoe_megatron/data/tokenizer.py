"""SentencePiece tokenizers: train one from corpus files, load one through megatron-core.

    train_tokenizer(["corpus.jsonl"], "data/tok/tokenizer.model", vocab_size=8192)
    tok = load_tokenizer("data/tok/tokenizer.model")   # megatron-core tokenizer object
    tok.vocab_size, tok.eod, tok.tokenize("text"), tok.detokenize(ids)

The trained model sits next to `tokenizer_metadata.json`, the file megatron-core's
`MegatronTokenizer.from_pretrained` reads (written by its own `write_metadata`); so one
tokenizer per directory. Special pieces: <unk>=0, <s>=1, </s>=2 (end of document: megatron-core
reads `eod` as SentencePiece's eos id), <pad>=3, then any user special tokens.

Defaults follow Llama's SentencePiece setup: identity normalisation, whitespace kept as is, digits
split, byte fallback, so decoding gives back exactly the encoded text. The trainer sees each
document cut into chunks of whole paragraphs (<= 4,000 characters) rather than single lines, so it
learns pieces that carry line breaks ('.\\n', ',\\n'): on the demo corpus 3.7 bytes per token
against 3.3 when trained on lines.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal, Optional, Sequence

from mmoe_megatron.data.corpus import TextMode, expand_inputs, input_bytes, iter_documents
from mmoe_megatron.data.errors import DataError

logger = logging.getLogger(__name__)

METADATA_FILE = "tokenizer_metadata.json"
# Chunks fed to the trainer; a chunk over max_sentence_length bytes would be skipped silently by
# SentencePiece, so the byte limit allows 4 UTF-8 bytes per character.
CHUNK_CHARS = 4000
MAX_SENTENCE_BYTES = 4 * CHUNK_CHARS


@dataclass
class TokenizerTrainStats:
    model_path: str
    vocab_size: int
    model_type: str
    num_documents: int
    num_train_bytes: int
    """UTF-8 bytes of text the trainer saw (after sampling)."""
    seconds: float
    inputs: list[str] = field(default_factory=list)


def _chunks(text: str, limit: int = CHUNK_CHARS) -> Iterator[str]:
    """Whole paragraphs (blank-line separated) packed up to `limit` characters; longer
    paragraphs are cut at line breaks, longer lines at `limit`."""
    current = ""
    for para in text.split("\n\n"):
        pieces = [para]
        if len(para) > limit:
            pieces = [line[i : i + limit] for line in para.split("\n") for i in range(0, max(len(line), 1), limit)]
        for piece in pieces:
            if current and len(current) + 2 + len(piece) > limit:
                yield current
                current = piece
            else:
                current = f"{current}\n\n{piece}" if current else piece
    if current.strip():
        yield current


def _keep(text: str, rate: float, seed: int) -> bool:
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < rate


def train_tokenizer(
    inputs: Sequence[str],
    output: str,
    vocab_size: int,
    model_type: Literal["bpe", "unigram"] = "bpe",
    byte_fallback: bool = True,
    special_tokens: Sequence[str] = (),
    character_coverage: float = 0.9995,
    json_key: str = "text",
    text_mode: TextMode = "file",
    max_train_bytes: int = 2_000_000_000,
    seed: int = 1234,
    num_threads: Optional[int] = None,
) -> TokenizerTrainStats:
    """Train a SentencePiece model on the documents of `inputs` and save it as `output`
    (a `.model` path) with megatron-core's metadata file beside it.

    Corpora over `max_train_bytes` are subsampled by document (a seeded hash of the text, so the
    sample is deterministic and spread over all shards); SentencePiece holds its input in memory.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model type {model_type!r}: choose bpe or unigram")
    num_special = 4 + len(special_tokens) + (256 if byte_fallback else 0)
    if vocab_size <= num_special:
        raise DataError(
            f"vocab size {vocab_size} leaves no room for learned pieces ({num_special} are special "
            "or byte pieces); choose a larger --vocab-size"
        )
    if not output.endswith(".model"):
        raise DataError(f"tokenizer output {output} must end in .model (SentencePiece's extension)")
    paths = expand_inputs(inputs)
    total = input_bytes(paths)
    rate = 1.0 if total is None else min(1.0, max_train_bytes / total)
    stats = {"docs": 0, "bytes": 0}

    reader_error: list[DataError] = []

    def sentences() -> Iterator[str]:
        try:
            for doc in iter_documents(paths, json_key=json_key, text_mode=text_mode):
                if not doc.text.strip() or not _keep(doc.text, rate, seed):
                    continue
                if stats["bytes"] >= max_train_bytes:
                    return
                stats["docs"] += 1
                stats["bytes"] += len(doc.text.encode("utf-8"))
                yield from _chunks(doc.text)
        except DataError as err:
            # SentencePiece turns an exception in the iterator into a RuntimeError; keep ours.
            reader_error.append(err)
            raise

    start = time.perf_counter()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            user_defined_symbols=list(special_tokens),
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            train_extremely_large_corpus=False,
            num_threads=num_threads or min(16, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as err:
        if reader_error:
            raise reader_error[0] from None
        if stats["docs"] == 0:
            raise DataError(
                f"no non-empty documents in {', '.join(inputs)}; check the files and --json-key"
            ) from None
        message = str(err)
        if "required_chars" in message:
            fix = "raise --vocab-size or lower --character-coverage"
        elif "Vocabulary size too high" in message:
            fix = "the corpus is too small for this vocabulary: lower --vocab-size or add text"
        else:
            fix = "see SentencePiece's message above"
        raise DataError(f"SentencePiece training on {', '.join(inputs)} failed: {message}; {fix}") from None
    seconds = time.perf_counter() - start

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, output)
    write_metadata(output)
    result = TokenizerTrainStats(
        model_path=output, vocab_size=vocab_size, model_type=model_type,
        num_documents=stats["docs"], num_train_bytes=stats["bytes"], seconds=seconds,
        inputs=list(paths),
    )
    with open(os.path.splitext(output)[0] + "_training.json", "w") as f:
        json.dump(asdict(result), f, indent=2)
    return result


def write_metadata(model_path: str) -> str:
    """Write megatron-core's `tokenizer_metadata.json` for a SentencePiece model; returns its path."""
    from megatron.core.tokenizers import MegatronTokenizer

    MegatronTokenizer.write_metadata(
        tokenizer_path=model_path, tokenizer_library="sentencepiece", model_type="gpt", overwrite=True
    )
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), METADATA_FILE)


def _missing(path: str) -> DataError:
    return DataError(
        f"tokenizer {path} not found; train one with `python tools/train_tokenizer.py --input "
        f"CORPUS --output {path}` (for the demo: `python tools/prepare_demo_corpus.py`), or set "
        "data.tokenizer to an existing SentencePiece .model file"
    )


def _metadata(path: str) -> Optional[dict]:
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), METADATA_FILE)
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(
            f"{meta_path} is not valid JSON ({err}); delete it and run "
            f"`python tools/train_tokenizer.py --write-metadata {path}`"
        ) from None


def load_tokenizer(path: str):
    """The megatron-core tokenizer for `path` (`MegatronTokenizer.from_pretrained`).

    Uses `tokenizer_metadata.json` beside the model when present; a bare SentencePiece `.model`
    (one trained elsewhere) loads as SentencePiece. The object has `vocab_size`, `eod`,
    `tokenize(text)`, `detokenize(ids)` and `unique_identifiers` (megatron's dataset cache key).
    """
    from megatron.core.tokenizers import MegatronTokenizer

    if not os.path.isfile(path):
        raise _missing(path)
    metadata = _metadata(path)
    if metadata is None:
        if not path.endswith(".model"):
            raise DataError(
                f"tokenizer {path}: no {METADATA_FILE} beside it and not a SentencePiece .model; "
                f"write the metadata with megatron-core's MegatronTokenizer.write_metadata"
            )
        metadata = {"library": "sentencepiece", "model_type": "gpt"}
    try:
        tokenizer = MegatronTokenizer.from_pretrained(tokenizer_path=path, metadata_path=metadata)
    except (RuntimeError, OSError) as err:
        raise DataError(
            f"tokenizer {path} cannot be loaded ({err}); the file is damaged or not a "
            f"{metadata.get('library')} model: retrain it with tools/train_tokenizer.py"
        ) from None
    if tokenizer.eod is None or tokenizer.eod < 0:
        raise DataError(
            f"tokenizer {path} has no end-of-document token (SentencePiece eos_id is disabled); "
            "retrain it with tools/train_tokenizer.py, which reserves </s> as id 2"
        )
    return tokenizer


class SentencePieceEncoder:
    """Encoding only, without importing megatron-core or torch (seconds per worker process).

    Gives the same ids as `load_tokenizer(path).tokenize` for SentencePiece models (megatron's
    wrapper calls `encode_as_ids`; tests/test_data_tokenizer.py checks the equality).
    """

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise _missing(path)
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(path)
        except (RuntimeError, OSError) as err:
            raise DataError(
                f"tokenizer {path} is not a SentencePiece model ({err}); retrain it with "
                "tools/train_tokenizer.py"
            ) from None
        self.vocab_size = self.processor.get_piece_size()
        self.eod = self.processor.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode_as_ids(text)


def is_sentencepiece(path: str) -> bool:
    """True when `path` loads through megatron-core's SentencePiece library."""
    metadata = _metadata(path)
    return (metadata or {"library": "sentencepiece"}).get("library") == "sentencepiece"


def tokenizer_vocab_size(path: str) -> int:
    """Vocabulary size of the tokenizer at `path` (cheap for SentencePiece models)."""
    if is_sentencepiece(path):
        return SentencePieceEncoder(path).vocab_size
    return load_tokenizer(path).vocab_size


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
