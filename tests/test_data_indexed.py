"""Preprocessing into megatron-core indexed datasets, and checking them (data/indexed.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from mmoe_megatron.data.errors import DataError
from mmoe_megatron.data.indexed import check_indexed_dataset, preprocess, read_documents
from mmoe_megatron.data.tokenizer import load_tokenizer
from tests.data_fixtures import make_documents, small_datasets, small_tokenizer, write_jsonl  # noqa: F401


def test_documents_are_written_in_order_with_end_of_document(tmp_path, small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    docs = make_documents("sonnets", 20) + ["   "] + make_documents("verses", 10)
    shard_a = write_jsonl(str(tmp_path / "a.jsonl"), docs[:12])
    shard_b = write_jsonl(str(tmp_path / "b.jsonl"), docs[12:])
    prefix = str(tmp_path / "out" / "corpus_text_document")
    stats = preprocess([shard_a, shard_b], small_tokenizer, prefix, progress=False)

    kept = [d for d in docs if d.strip()]
    written = read_documents(prefix)
    assert [w.tolist() for w in written] == [tok.tokenize(d) + [tok.eod] for d in kept]
    assert [tok.detokenize(w[:-1].tolist()) for w in written] == kept
    assert written[0].dtype == np.uint16  # 512-piece vocabulary: 2 bytes per token
    assert stats.num_skipped == 1 and stats.total_documents == 30
    assert stats.total_tokens == sum(len(w) for w in written)
    side = json.load(open(f"{prefix}.json"))
    assert (side["vocab_size"], side["eod"], side["num_documents"]) == (512, 2, 30)
    summary = check_indexed_dataset(prefix)
    assert (summary.num_documents, summary.num_tokens) == (30, stats.total_tokens)
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


def test_output_is_identical_for_any_number_of_workers(tmp_path, small_tokenizer):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents("verses", 150, seed=5))
    out = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        stats = preprocess([corpus], small_tokenizer, prefix, num_workers=workers, chunk_size=4,
                           progress=False)
        assert stats.num_workers == workers
        out[workers] = (open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read())
    assert out[1] == out[2]


def test_document_split_is_disjoint_complete_and_keeps_duplicates_together(tmp_path, small_tokenizer):
    docs = make_documents("sonnets", 200, seed=2)
    docs += docs[:20]  # exact duplicates must land in the same split as their originals
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    prefix = str(tmp_path / "split_text_document")
    stats = preprocess([corpus], small_tokenizer, prefix, valid_fraction=0.2, progress=False)
    assert stats.outputs == {"train": f"{prefix}_train", "valid": f"{prefix}_valid"}
    train = [tuple(d) for d in read_documents(f"{prefix}_train")]
    valid = [tuple(d) for d in read_documents(f"{prefix}_valid")]
    assert not set(train) & set(valid)
    assert len(train) + len(valid) == len(docs)
    assert 0.1 < len(valid) / len(docs) < 0.3
    tok = load_tokenizer(small_tokenizer)
    for original in docs[:20]:
        ids = tuple(tok.tokenize(original) + [tok.eod])
        assert (ids in train) != (ids in valid)
        assert (train.count(ids), valid.count(ids)) in ((2, 0), (0, 2))


def test_no_documents_after_filtering_names_inputs_and_fix(tmp_path, small_tokenizer):
    corpus = write_jsonl(str(tmp_path / "short.jsonl"), ["a", "bb", "   "])
    prefix = str(tmp_path / "none")
    with pytest.raises(DataError, match=rf"no documents left after filtering {corpus} \(3 shorter "
                                        r"than --min-chars 5\); check --json-key.*lower --min-chars"):
        preprocess([corpus], small_tokenizer, prefix, min_chars=5, progress=False)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("none")]  # nothing half-written


def test_missing_inputs_and_tokenizer_are_named(tmp_path, small_tokenizer):
    with pytest.raises(DataError, match=r"nope.jsonl does not exist"):
        preprocess([str(tmp_path / "nope.jsonl")], small_tokenizer, str(tmp_path / "x"), progress=False)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), ["text"])
    with pytest.raises(DataError, match=r"tokenizer .*missing.model not found; train one"):
        preprocess([corpus], str(tmp_path / "missing.model"), str(tmp_path / "x"), progress=False)
    with pytest.raises(DataError, match=r"ends in .bin; give the prefix without it"):
        preprocess([corpus], small_tokenizer, str(tmp_path / "x.bin"), progress=False)


def _copy(prefix: str, dest: str) -> str:
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, dest + suffix)
    return dest


def test_prefix_without_idx_names_the_file_and_the_command(tmp_path, small_datasets):
    prefix = _copy(small_datasets["sonnets"][0], str(tmp_path / "data_text_document"))
    os.remove(prefix + ".idx")
    with pytest.raises(DataError, match=rf"dataset prefix {prefix}: {prefix}.idx not found") as err:
        check_indexed_dataset(prefix)
    assert f"tools/preprocess_data.py --input CORPUS --tokenizer TOKENIZER --output-prefix {prefix}" \
        in str(err.value)
    # A prefix given with its suffix, or a near miss, gets a pointer to the right name.
    good = _copy(small_datasets["sonnets"][0], str(tmp_path / "good_text_document"))
    with pytest.raises(DataError, match=r"ends in .idx; a prefix names both files, use .*good_text_document"):
        check_indexed_dataset(good + ".idx")
    with pytest.raises(DataError, match=r"found datasets: .*good_text_document"):
        check_indexed_dataset(str(tmp_path / "good"))


@pytest.mark.parametrize("damage", ["truncate", "header", "garbage_index", "bin_mismatch"])
def test_corrupted_index_names_the_file_and_the_fix(tmp_path, small_datasets, damage):
    prefix = _copy(small_datasets["verses"][0], str(tmp_path / "ds"))
    idx = bytearray(open(prefix + ".idx", "rb").read())
    if damage == "truncate":
        idx = idx[: len(idx) - 40]
    elif damage == "header":
        idx[:9] = b"NOTANIDX\x00"
    elif damage == "garbage_index":
        idx[-8:] = (10**9).to_bytes(8, "little")  # last document boundary past the end
    if damage == "bin_mismatch":
        with open(prefix + ".bin", "ab") as f:
            f.write(b"\x00\x00")
        pattern = rf"{prefix}.bin has \d+ bytes but {prefix}.idx describes .*Rebuild both"
    else:
        open(prefix + ".idx", "wb").write(bytes(idx))
        pattern = rf"{prefix}.idx is corrupted: .*Delete {prefix}.idx and {prefix}.bin and rebuild"
    with pytest.raises(DataError, match=pattern):
        check_indexed_dataset(prefix)


def test_dataset_without_documents_is_refused(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "empty_text_document")
    IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16).finalize(prefix + ".idx")
    with pytest.raises(DataError, match=rf"dataset {prefix} .* holds no documents; rebuild it"):
        check_indexed_dataset(prefix)


def test_cli_writes_split_datasets_and_reports_errors(tmp_path, small_tokenizer, capsys):
    from tools.preprocess_data import main

    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents("verses", 40))
    prefix = str(tmp_path / "cli_text_document")
    assert main(["--input", corpus, "--tokenizer", small_tokenizer, "--output-prefix", prefix,
                 "--workers", "1", "--valid-fraction", "0.25", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{prefix}_valid:" in out and "docs/s" in out and "bytes/token" in out
    assert check_indexed_dataset(f"{prefix}_train").num_documents + \
        check_indexed_dataset(f"{prefix}_valid").num_documents == 40
    assert main(["--input", str(tmp_path / "gone.jsonl"), "--tokenizer", small_tokenizer,
                 "--output-prefix", prefix, "--no-progress"]) == 2
    assert "gone.jsonl does not exist" in capsys.readouterr().err


def test_bad_record_fails_cleanly_with_parallel_workers(tmp_path, small_tokenizer):
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": d}) for d in make_documents("verses", 50)]
    lines.insert(37, '{"text": "unterminated')
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{corpus}:38: not valid JSON"):
        preprocess([str(corpus)], small_tokenizer, str(tmp_path / "out" / "x"), num_workers=2,
                   chunk_size=2, progress=False)
    assert os.listdir(tmp_path / "out") == []
