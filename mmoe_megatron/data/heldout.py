"""A held-out text domain: technical documentation that no demo model trains on.

The demo corpus is Shakespeare and the King James Bible. To show how an elastic model behaves on
text outside its training distribution, `prepare_heldout()` builds a second corpus, software
documentation in reStructuredText, from the source archives of two PyPI packages (pinned
versions and SHA-256 digests): the user and developer manuals of Sphinx 8.2.3 (BSD-2-Clause) and
of Docutils 0.21.2 (public domain / BSD). One document per documentation file. It is tokenized
with the demo's tokenizer, so every demo model can be evaluated on it:

    data/heldout/
      _downloads/                   the source archives
      docs.jsonl                    {"text", "source", "title"} per file
      docs_text_document.{bin,idx}  the indexed dataset (evaluation only; suites name it under
                                    eval.heldout)
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from typing import Optional

from mmoe_megatron.data.demo import Source, download_sources

HELDOUT_SOURCES = {
    "sphinx": Source(
        "sphinx==8.2.3", "sphinx-8.2.3.tar.gz",
        "398ad29dee7f63a75888314e9424d40f52ce5a6a87ae88e7071e80af296ec348", "BSD-2-Clause",
    ),
    "docutils": Source(
        "docutils==0.21.2", "docutils-0.21.2.tar.gz",
        "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f", "public domain / BSD-2-Clause",
    ),
}
# Documentation trees inside each archive (after the top-level folder).
_DOC_TREE = {"sphinx": re.compile(r"^[^/]+/doc/.+\.rst$"),
             "docutils": re.compile(r"^[^/]+/docs/.+\.(txt|rst)$")}
_MIN_BYTES = 500  # index stubs and one-line includes are not documents
CORPUS_VERSION = 1


def heldout_documents(archives: dict[str, str]) -> list[dict]:
    """Every documentation file of the archives as a document, in archive order."""
    docs = []
    for name, path in archives.items():
        with tarfile.open(path) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if not (member.isfile() and _DOC_TREE[name].match(member.name)):
                    continue
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n"))
                text = re.sub(r"\n{3,}", "\n\n", text).strip()
                if len(text.encode("utf-8")) >= _MIN_BYTES:
                    docs.append({"text": text, "source": name, "title": member.name.split("/", 1)[1]})
    return docs


def prepare_heldout(tokenizer: str, out_dir: str = "data/heldout", num_workers: Optional[int] = None,
                    progress: bool = True) -> dict:
    """Download, cut and tokenize the held-out corpus with `tokenizer`; idempotent. Returns the
    manifest (documents, tokens, the tokenizer's digest)."""
    from mmoe_megatron.data.corpus import write_jsonl
    from mmoe_megatron.data.indexed import preprocess
    from mmoe_megatron.data.tokenizer import file_sha256

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    prefix = os.path.join(out_dir, "docs_text_document")
    key = {"version": CORPUS_VERSION, "archives": {n: s.sha256 for n, s in HELDOUT_SOURCES.items()},
           "tokenizer_sha256": file_sha256(tokenizer)}
    if os.path.isfile(manifest_path) and os.path.isfile(f"{prefix}.idx"):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("key") == key:
            return manifest
    archives = download_sources(os.path.join(out_dir, "_downloads"), HELDOUT_SOURCES)
    docs = heldout_documents(archives)
    corpus = os.path.join(out_dir, "docs.jsonl")
    write_jsonl(corpus, docs)
    stats = preprocess([corpus], tokenizer, prefix, num_workers=num_workers or os.cpu_count() or 1,
                       progress=progress)
    manifest = {
        "key": key, "prefix": prefix,
        "num_documents": stats.total_documents,
        "num_documents_per_source": {n: sum(d["source"] == n for d in docs) for n in HELDOUT_SOURCES},
        "num_tokens": stats.total_tokens, "num_text_bytes": stats.num_text_bytes,
        "bytes_per_token": round(stats.num_text_bytes / max(1, stats.total_tokens - stats.total_documents), 4),
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest
