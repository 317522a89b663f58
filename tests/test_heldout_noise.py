"""bench.heldout_noise: the seed spreads it reports, computed by hand, and the distinct-sample count
that keeps a held-out evaluation from repeating tokens."""

from types import SimpleNamespace

import numpy as np
import pytest

from bench import heldout_noise as hn


def _record(member, seed, blocks):
    return {"member": member, "seed": seed, "block": 4, "num_samples": 4 * len(blocks),
            "blocks": {"wiki": {"1": list(blocks)}}}


def test_report_separates_block_noise_from_seed_spread():
    spec = SimpleNamespace(eval=SimpleNamespace(curve_ks=[1]),
                           members=[SimpleNamespace(name="a"), SimpleNamespace(name="lone")])
    # Seed 1 is better on the first block and worse on the second: the two blocks disagree by 0.2
    # each, all samples together agree exactly.
    records = [_record("a", 1, [5.0, 5.4]), _record("a", 2, [5.2, 5.2]), _record("lone", 1, [9.0, 9.0])]
    markdown, data = hn.report(spec, records)
    cell = data["a"]["wiki"]["1"]
    spread = 0.2 / np.sqrt(2)  # sample standard deviation of two values 0.2 apart
    assert cell["suite"] == pytest.approx(spread)
    assert cell["one_block"] == pytest.approx(spread)
    assert cell["all"] == pytest.approx(0.0)
    assert cell["seeds"] == [1, 2]
    assert "lone" not in data and "| a | 2 | wiki |" in markdown


def test_report_needs_two_seeds_of_one_member():
    spec = SimpleNamespace(eval=SimpleNamespace(curve_ks=[1]), members=[SimpleNamespace(name="a")])
    with pytest.raises(ValueError, match="two kept seeds"):
        hn.report(spec, [_record("a", 1, [5.0])])


def test_distinct_samples_counts_whole_sequences(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "held")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for length in (10, 7, 4):  # 21 tokens: a sample of 5 needs 6 (its labels shift by one)
        builder.add_document(np.arange(length, dtype=np.uint16), [length])
    builder.finalize(prefix + ".idx")
    assert hn.distinct_samples(prefix, 5) == 4
    assert hn.distinct_samples(prefix, 20) == 1
    assert hn.distinct_samples(prefix, 21) == 0
