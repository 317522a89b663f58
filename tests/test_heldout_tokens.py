"""bench.heldout_tokens: the buckets a token falls in, the per-bucket sums of a forward's token losses,
and the tax split into buckets, all checked against values worked out by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import heldout_tokens as ht
from tests.data_fixtures import data_config, small_datasets, small_tokenizer  # noqa: F401


def test_bucket_edges_are_inclusive():
    counts = np.array([0, 1, 9, 10, 99, 100, 999, 1000, 50_000])
    assert ht.bucket_of(counts).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [ht.bucket_label(*b) for b in ht.BUCKETS] == ["0", "1-9", "10-99", "100-999", ">=1000"]


class _LabelLoss(torch.nn.Module):
    """A 'model' whose loss for each token is its label's id, routed nowhere (no MoE layer)."""

    def forward(self, tokens, position_ids, mask, labels):
        return labels.float()


class _Samples:
    def __init__(self, labels, loss_mask):
        self.labels, self.loss_mask = labels, loss_mask

    def __getitem__(self, i):
        n = len(self.labels[i])
        return {"tokens": np.zeros(n, dtype=np.int64), "labels": np.array(self.labels[i]),
                "loss_mask": np.array(self.loss_mask[i], dtype=np.float32),
                "position_ids": np.arange(n)}


def test_bucket_losses_sum_each_bucket_and_skip_masked_tokens():
    # Token ids 0..3 with training counts 0, 5, 50, 5000: buckets 0, 1, 2, 4.
    buckets = ht.bucket_of(np.array([0, 5, 50, 5000]))
    data = _Samples(labels=[[0, 1, 3], [2, 3, 3]], loss_mask=[[1, 1, 1], [1, 0, 1]])
    out = ht.bucket_losses(_LabelLoss(), data, 1, [0, 1], micro_batch_size=1, mask=None, buckets=buckets)
    # Bucket 0: label 0 once (loss 0); bucket 1: label 1 once (1); bucket 2: label 2 once (2);
    # bucket 4: label 3 twice unmasked (3 + 3), the masked one left out.
    assert out["tokens"] == [1, 1, 1, 0, 2]
    assert out["loss_sum"] == pytest.approx([0.0, 1.0, 2.0, 0.0, 6.0])


def _record(member, role, seed, sums, tokens):
    return {"member": member, "role": role, "seed": seed, "buckets": ["0", "rest"], "train_types": [3, 5],
            "domains": {"wiki": {"8": {"loss_sum": sums, "tokens": tokens}}}}


def test_report_splits_the_tax_into_bucket_contributions():
    members = [SimpleNamespace(name="elastic", role="elastic", specialists=None, overrides={}),
               SimpleNamespace(name="k8", role="specialist", specialists=None,
                               overrides={"matryoshka.strategy": "fixed", "matryoshka.ks": [8]})]
    spec = SimpleNamespace(eval=SimpleNamespace(curve_ks=[8]), members=members)
    # 10 tokens, 1 of them unseen. Seed 1: elastic 20 + 45 (mean 6.5), k8 15 + 45 (mean 6.0):
    # tax +0.5, all of it from the unseen bucket (+0.5) and none from the rest.
    # Seed 2: elastic 10 + 54, k8 10 + 50: tax +0.4, all from the rest.
    records = [_record("elastic", "elastic", 1, [20.0, 45.0], [1, 9]),
               _record("k8", "specialist", 1, [15.0, 45.0], [1, 9]),
               _record("elastic", "elastic", 2, [10.0, 54.0], [1, 9]),
               _record("k8", "specialist", 2, [10.0, 50.0], [1, 9])]
    markdown, data = ht.report(spec, records)
    by_bucket = data["taxes"]["elastic"]["k8"]["wiki"]["by_bucket"]
    assert by_bucket[0] == pytest.approx([0.5, 0.0])
    assert by_bucket[1] == pytest.approx([0.0, 0.4])
    assert "| elastic | k8 | 8 | wiki | 2 | +0.4500 ± 0.0707 | +0.2500 ± 0.3536 | +0.2000 ± 0.2828 |" in markdown
    assert "| wiki | 0.1000 | 0.9000 |" in markdown


def test_train_counts_count_each_training_document_of_every_corpus_once(
        tmp_path, small_tokenizer, small_datasets, single_process_mcore):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # A blend of 120 sonnets and 80 verses split 80 / 20: the training split holds the first 96
    # sonnets and the first 64 verses, whatever the blend's weights.
    blend = [(small_datasets["sonnets"][0], 0.9), (small_datasets["verses"][0], 0.1)]
    cfg = data_config(tmp_path, small_tokenizer, blend, **{"data.split": "80,20,0", "data.seq_length": 32})
    expected = np.zeros(600, dtype=np.int64)
    for (prefix, _), first in zip(blend, (96, 64)):
        docs = IndexedDataset(prefix)
        for i in range(first):
            np.add.at(expected, np.asarray(docs[i]), 1)
    counts = ht.train_counts(cfg, 600)
    assert counts.tolist() == expected.tolist()
