"""bench.make_results: a ladder variant counts as the default only when every setting it overrides
is the schema's default, whatever config section the setting is in."""

import dataclasses

from bench.make_results import holds_a_seed_source, schema_default


def test_schema_default_reads_every_section():
    assert schema_default("matryoshka.normalization") == "topk_softmax"
    assert schema_default("matryoshka.seed") is None
    assert schema_default("data.seed") is None
    assert schema_default("matryoshka.ks") == [1, 2, 3, 4]
    assert schema_default("moe.aux_loss_coeff") == 1e-2


def test_schema_default_of_unknown_or_required_keys_matches_no_value():
    for key in ("matryoshka.no_such_field", "nosection.seed", "moe.num_experts", "seed"):
        assert schema_default(key) is dataclasses.MISSING


def test_members_that_fix_a_seed_source_are_no_default_candidates():
    assert holds_a_seed_source({"data.seed": 1})
    assert holds_a_seed_source({"matryoshka.seed": 1, "matryoshka.widths": [0.5, 1.0]})
    assert not holds_a_seed_source({"matryoshka.gate_temperature": "learned", "train.seed": 3})
