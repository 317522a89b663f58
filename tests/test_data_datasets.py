"""Datasets from the config through megatron-core (mmoe_megatron/data/datasets.py)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from mmoe_megatron.data import build_datasets, load_tokenizer, resolve_vocab_size
from mmoe_megatron.data.datasets import train_split_tokens
from mmoe_megatron.data.errors import DataError
from mmoe_megatron.data.indexed import preprocess, read_documents
from tests.data_fixtures import (  # noqa: F401
    data_config,
    make_documents,
    small_datasets,
    small_tokenizer,
    write_jsonl,
)
from tests.dist import run_distributed

SEQ = 16


def _cfg(tmp_path, tokenizer, blend, **overrides):
    return data_config(tmp_path, tokenizer, blend, **{"data.seq_length": SEQ, **overrides})


def test_samples_reassemble_the_source_documents_in_order(tmp_path, small_tokenizer, small_datasets,
                                                          single_process_mcore):
    """text -> tokens -> dataset -> samples: un-shuffling the samples gives back the token stream of
    the documents in the dataset's document order, and detokenising it gives the source texts."""
    prefix, docs = small_datasets["sonnets"]
    tok = load_tokenizer(small_tokenizer)
    cfg = _cfg(tmp_path, small_tokenizer, [(prefix, 1.0)], **{"data.split": "100,0,0"})
    doc_tokens = [tok.tokenize(d) + [tok.eod] for d in docs]
    num_samples = (sum(map(len, doc_tokens)) - 1) // SEQ  # exactly one epoch
    train, valid, test = build_datasets(cfg, num_samples, 0, 0)
    assert valid is None and test is None and len(train) == num_samples

    by_position = {}
    for i in range(len(train)):
        item = train[i]
        assert set(item) >= {"tokens", "labels", "loss_mask", "position_ids"}
        assert item["tokens"].shape == (SEQ,) and item["labels"].shape == (SEQ,)
        assert item["tokens"][1:].tolist() == item["labels"][:-1].tolist()
        assert item["position_ids"].tolist() == list(range(SEQ)) and item["loss_mask"].min() == 1
        by_position[int(train.shuffle_index[i])] = item
    stream = [t for p in range(num_samples) for t in by_position[p]["tokens"].tolist()]
    stream.append(int(by_position[num_samples - 1]["labels"][-1]))

    order = [int(d) for d in train.document_index]
    assert sorted(order) == list(range(len(docs)))  # one epoch: every document once
    expected = [t for d in order for t in doc_tokens[d]]
    assert stream == expected[: len(stream)]
    pieces, current = [], []
    for t in stream:
        if t == tok.eod:
            pieces.append(tok.detokenize(current))
            current = []
        else:
            current.append(t)
    assert len(pieces) >= len(docs) - 1
    assert pieces == [docs[d] for d in order[: len(pieces)]]


def _source_of(sample: list[int], eod: int, streams: dict[str, bytes]) -> set[str]:
    """Sources whose documents contain every run (>= 4 tokens) of the sample between EODs."""
    runs, current = [], []
    for t in sample + [eod]:
        if t == eod:
            if len(current) >= 4:
                runs.append(np.asarray(current, dtype=np.uint16).tobytes())
            current = []
        else:
            current.append(t)
    return {name for name, stream in streams.items() if all(run in stream for run in runs)}


def test_blend_samples_in_proportion_to_weights(tmp_path, small_tokenizer, small_datasets,
                                                single_process_mcore):
    from megatron.core.datasets.blended_dataset import BlendedDataset

    weights = {"sonnets": 0.7, "verses": 0.3}
    cfg = _cfg(tmp_path, small_tokenizer,
               [(small_datasets[n][0], w) for n, w in weights.items()], **{"data.split": "100,0,0"})
    num = 2000
    train, _, _ = build_datasets(cfg, num, 0, 0)
    assert isinstance(train, BlendedDataset) and len(train) == num
    eod = load_tokenizer(small_tokenizer).eod
    # Each source's documents as one byte string (uint16 ids, EOD separated) to search samples in.
    streams = {
        name: b"".join(d.tobytes() for d in read_documents(small_datasets[name][0]))
        for name in weights
    }
    names = list(weights)
    counts = np.zeros(len(names))
    for i in range(num):
        item = train[i]
        name = names[int(item["dataset_id"])]
        counts[int(item["dataset_id"])] += 1
        sample = item["tokens"].tolist() + [int(item["labels"][-1])]
        if i < 300:  # the sample's text really comes from the dataset it is attributed to
            assert name in _source_of(sample, eod, streams)
        n = i + 1
        if n in (100, 500, num):
            for j, w in enumerate(weights.values()):
                # Three standard deviations of a binomial draw; megatron's deterministic
                # interleaving is far tighter, a wrong weighting (e.g. 0.5) far outside.
                assert abs(counts[j] / n - w) <= 3 * math.sqrt(w * (1 - w) / n), (n, counts)
    assert abs(counts[0] / num - 0.7) < 0.005


def test_splits_are_disjoint_by_document(tmp_path, small_tokenizer, small_datasets, single_process_mcore):
    prefix, docs = small_datasets["sonnets"]
    cfg = _cfg(tmp_path, small_tokenizer, [(prefix, 1.0)], **{"data.split": "60,20,20"})
    splits = build_datasets(cfg, 200, 50, 50)
    used = []
    for ds in splits:
        ids = set()
        for i in range(len(ds)):
            ids.update(int(d) for d in ds._query_document_sample_shuffle_indices(i)[1])
        used.append(ids)
        assert ids <= set(int(x) for x in ds.indices)
    assert not (used[0] & used[1] or used[0] & used[2] or used[1] & used[2])
    assert sorted(int(x) for ds in splits for x in ds.indices) == list(range(len(docs)))
    assert [len(ds.indices) for ds in splits] == [72, 24, 24]


def test_train_fraction_trains_on_the_first_documents_and_keeps_validation(
    tmp_path, small_tokenizer, small_datasets, single_process_mcore
):
    """data.train_fraction 0.5: the train split is the first half of its 72 documents, repeated
    to the same number of samples; validation and test are the same documents and samples."""
    prefix = small_datasets["sonnets"][0]
    full = build_datasets(_cfg(tmp_path, small_tokenizer, [(prefix, 1.0)], **{"data.split": "60,20,20"}),
                          600, 50, 50)
    half = build_datasets(_cfg(tmp_path, small_tokenizer, [(prefix, 1.0)],
                               **{"data.split": "60,20,20", "data.train_fraction": 0.5}), 600, 50, 50)
    assert [int(x) for x in half[0].indices] == [int(x) for x in full[0].indices][:36]
    assert len(half[0]) >= 600 and len(full[0]) >= 600
    used = {int(d) for i in range(len(half[0]))
            for d in half[0]._query_document_sample_shuffle_indices(i)[1]}
    assert used == set(range(36))
    # Fewer documents for the same samples: more passes over each (3 epochs of 212 samples each
    # against 2 of 417).
    assert (half[0].document_index.size // 36, full[0].document_index.size // 72) == (3, 2)
    for h, f in zip(half[1:], full[1:]):
        assert [int(x) for x in h.indices] == [int(x) for x in f.indices]
        assert all(np.array_equal(h[i]["tokens"], f[i]["tokens"]) for i in range(len(f)))

    # Sharing data.blend with a separate validation set: the cut applies to the train documents.
    verses = small_datasets["verses"][0]
    train, _, _ = build_datasets(_cfg(tmp_path, small_tokenizer, [(prefix, 1.0)], **{
        "data.valid_blend": [{"prefix": verses, "weight": 1.0}], "data.split": "98,2,0",
        "data.train_fraction": 0.25}), 100, 20, 0)
    assert [int(x) for x in train.indices] == list(range(30))

    # The tokens one epoch over the train split reads, counted from the documents themselves.
    lengths = [len(doc) for doc in read_documents(prefix)]
    half_cfg = _cfg(tmp_path, small_tokenizer, [(prefix, 1.0)],
                    **{"data.split": "60,20,20", "data.train_fraction": 0.5})
    assert train_split_tokens(half_cfg) == [(prefix, 1.0, sum(lengths[:36]))]
    both = _cfg(tmp_path, small_tokenizer, [(prefix, 3.0), (verses, 1.0)], **{"data.split": "60,20,20"})
    verse_lengths = [len(doc) for doc in read_documents(verses)]
    assert train_split_tokens(both) == [(prefix, 0.75, sum(lengths[:72])),
                                        (verses, 0.25, sum(verse_lengths[:48]))]

    none_left = _cfg(tmp_path, small_tokenizer, [(prefix, 1.0)],
                     **{"data.split": "60,20,20", "data.train_fraction": 0.001})
    with pytest.raises(DataError, match=r"gives the train split none of the 120 documents.*"
                                        r"raise data.train_fraction"):
        build_datasets(none_left, 10, 10, 10)


def test_valid_blend_gives_validation_and_train_takes_all_of_blend(
    tmp_path, small_tokenizer, small_datasets, single_process_mcore
):
    sonnets, verses = small_datasets["sonnets"][0], small_datasets["verses"][0]
    cfg = _cfg(tmp_path, small_tokenizer, [(sonnets, 1.0)],
               **{"data.valid_blend": [{"prefix": verses, "weight": 1.0}], "data.split": "98,2,0"})
    train, valid, test = build_datasets(cfg, 100, 20, 0)
    assert test is None
    assert train.dataset_path == sonnets and len(train.indices) == 120
    assert valid.dataset_path == verses and len(valid.indices) == 80


def test_mock_data_is_megatrons_mock_dataset(tmp_path, single_process_mcore):
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    cfg = data_config(tmp_path, "unused.model", [], **{
        "data.mock": True, "model.vocab_size": 300, "data.seq_length": SEQ, "data.split": "98,2,0"})
    train, valid, test = build_datasets(cfg, 64, 8, 0)
    assert isinstance(train, MockGPTDataset) and isinstance(valid, MockGPTDataset) and test is None
    tokens = np.stack([train[i]["tokens"].numpy() for i in range(64)])
    assert tokens.shape == (64, SEQ) and tokens.max() < 300
    no_vocab = data_config(tmp_path, "unused.model", [], **{"data.mock": True})
    with pytest.raises(DataError, match=r"data.mock: true needs model.vocab_size"):
        resolve_vocab_size(no_vocab)


def test_vocab_size_comes_from_the_tokenizer_or_must_hold_it(tmp_path, small_tokenizer, small_datasets,
                                                           single_process_mcore):
    prefix = small_datasets["verses"][0]
    assert resolve_vocab_size(_cfg(tmp_path, small_tokenizer, [(prefix, 1.0)])) == 512
    assert resolve_vocab_size(_cfg(tmp_path, small_tokenizer, [(prefix, 1.0)],
                                   **{"model.vocab_size": 1000})) == 1000
    small = _cfg(tmp_path, small_tokenizer, [(prefix, 1.0)], **{"model.vocab_size": 500})
    with pytest.raises(DataError, match=rf"tokenizer {small_tokenizer} has 512 pieces but "
                                        r"model.vocab_size is 500 \(embedding padded to 512 rows\).*"
                                        r"Set model.vocab_size: null"):
        resolve_vocab_size(small)
    with pytest.raises(DataError, match=r"has 512 pieces but model.vocab_size is 500"):
        build_datasets(small, 10, 10, 0)
    missing = _cfg(tmp_path, str(tmp_path / "no" / "tokenizer.model"), [(prefix, 1.0)])
    with pytest.raises(DataError, match=r"no/tokenizer.model not found; train one with"):
        resolve_vocab_size(missing)


def test_bad_blend_entries_name_the_field_file_and_fix(tmp_path, small_tokenizer, small_datasets,
                                                     single_process_mcore):
    good = small_datasets["verses"][0]
    missing = str(tmp_path / "typo_text_document")
    cfg = _cfg(tmp_path, small_tokenizer, [(good, 0.5), (missing, 0.5)])
    with pytest.raises(DataError, match=rf"data.blend\[1\].prefix: dataset prefix {missing}: "
                                        rf"{missing}.idx not found.*tools/preprocess_data.py"):
        build_datasets(cfg, 10, 10, 0)

    # 80 documents: a 0.5 % validation ratio gives validation none (megatron would loop forever).
    tiny_split = _cfg(tmp_path, small_tokenizer, [(good, 1.0)], **{"data.split": "99.5,0.5,0"})
    with pytest.raises(DataError, match=r"data.blend\[0\].prefix: data.split gives the validation "
                                        r"split none of the 80 documents.*data.valid_blend"):
        build_datasets(tiny_split, 10, 10, 0)

    valid_only = _cfg(tmp_path, small_tokenizer, [(good, 1.0)], **{
        "data.split": "0,1,0", "data.valid_blend": [{"prefix": good, "weight": 1.0}]})
    with pytest.raises(DataError, match=r"data.split '0,1,0': with data.valid_blend.*both 0"):
        build_datasets(valid_only, 10, 10, 0)


def test_dataset_from_another_tokenizer_is_refused(tmp_path, small_tokenizer, single_process_mcore):
    from mmoe_megatron.data.tokenizer import train_tokenizer

    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents("verses", 40, seed=9))
    other = str(tmp_path / "other" / "tokenizer.model")
    train_tokenizer([corpus], other, 400)
    prefix = str(tmp_path / "other_text_document")
    preprocess([corpus], other, prefix, progress=False)
    cfg = _cfg(tmp_path, small_tokenizer, [(prefix, 1.0)])
    with pytest.raises(DataError, match=rf"was tokenized with {other}, a different model than "
                                        rf"data.tokenizer {small_tokenizer}; re-run"):
        build_datasets(cfg, 10, 10, 0)


def _build_on_rank(rank, world_size, cfg_overrides, tokenizer, blend, tmp):
    import pathlib

    import torch.distributed as dist

    from mmoe_megatron import compat

    compat.apply_all()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = _cfg(pathlib.Path(tmp), tokenizer, blend, **cfg_overrides)
    train, valid, _ = build_datasets(cfg, 300, 40, 0)
    return {"train": [train[i]["tokens"] for i in range(0, 300, 7)],
            "valid": [valid[i]["tokens"] for i in range(0, len(valid), 3)]}


@pytest.mark.slow
def test_every_rank_of_a_two_rank_job_gets_the_single_process_datasets(
    tmp_path, small_tokenizer, small_datasets, single_process_mcore
):
    import torch

    blend = [(small_datasets["sonnets"][0], 0.6), (small_datasets["verses"][0], 0.4)]
    overrides = {"data.split": "90,10,0"}
    cfg = _cfg(tmp_path / "single", small_tokenizer, blend, **overrides)
    train, valid, _ = build_datasets(cfg, 300, 40, 0)
    expected = {"train": [train[i]["tokens"] for i in range(0, 300, 7)],
                "valid": [valid[i]["tokens"] for i in range(0, len(valid), 3)]}
    # Both ranks build into one fresh cache: rank 0 writes the indices, rank 1 reads them.
    shutil.rmtree(tmp_path / "multi", ignore_errors=True)
    results = run_distributed(_build_on_rank, world_size=2, cfg_overrides=overrides,
                              tokenizer=small_tokenizer, blend=blend, tmp=str(tmp_path / "multi"))
    for rank_result in results:
        for split in ("train", "valid"):
            assert len(rank_result[split]) == len(expected[split])
            for got, want in zip(rank_result[split], expected[split]):
                assert torch.equal(got, want)
