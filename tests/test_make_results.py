"""bench.make_results: a ladder variant counts as the default only when every setting it trains
with (its own and the suite's pins of `auto` settings) is what today's defaults resolve to,
whatever config section the setting is in."""

import dataclasses
import os

import pytest

from bench.make_results import default_settings, holds_a_seed_source, schema_default
from mmoe_megatron.evaluation.suite import load_suite
from tests.helpers import TINY


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


def ladder(tmp_path, members: str):
    """A ladder suite on tiny.yaml pinning the `auto` settings as the real ladder does, with
    the reference `elastic` and `members` (YAML list items); on synthetic data, so that a member
    at another's compute needs no tokenizer."""
    suite = tmp_path / "ladder.yaml"
    suite.write_text(f"""
name: ladder
base: {os.path.abspath(TINY)}
overrides:
  data.mock: true
  model.vocab_size: 256
  matryoshka.ks: [1, 2, 4, 8]
  matryoshka.gate_temperature: none
  matryoshka.widths: [1.0]
members:
  - {{name: elastic, role: elastic}}
{members}""")
    return load_suite(str(suite))


def test_a_variant_is_the_default_when_it_trains_as_the_auto_settings_resolve(tmp_path):
    spec = ladder(tmp_path, """\
  - {name: k2, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [2]}}
  - {name: widths, role: elastic, overrides: {matryoshka.widths: [0.25, 0.5, 0.75, 1.0]}}
  - name: both
    role: elastic
    overrides: {matryoshka.gate_temperature: learned, matryoshka.widths: [0.25, 0.5, 0.75, 1.0]}
  - name: both_k1grad_none
    role: elastic
    overrides: {matryoshka.gate_temperature: learned, matryoshka.widths: [0.25, 0.5, 0.75, 1.0],
                matryoshka.k1_router_grad: none}
""")
    pins, is_default = default_settings(spec)
    assert pins == {"matryoshka.gate_temperature": "none", "matryoshka.widths": [1.0]}
    # The reference trains with the pinned settings; one axis alone is not today's default either.
    assert [is_default(m) for m in ("elastic", "k2", "widths", "both", "both_k1grad_none")] == [
        False, False, False, True, False]


def test_a_candidate_is_compared_with_the_default_at_the_reference_compute(tmp_path):
    from bench.make_results import against, default_member

    spec = ladder(tmp_path, """\
  - {name: k8, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [8]}}
  - name: both_k8compute
    role: elastic
    overrides: {matryoshka.gate_temperature: learned, matryoshka.widths: [0.25, 0.5, 0.75, 1.0]}
    equal_compute_to: k8
  - name: both
    role: elastic
    overrides: {matryoshka.gate_temperature: learned, matryoshka.widths: [0.25, 0.5, 0.75, 1.0]}
    equal_compute_to: elastic
""")
    _, is_default = default_settings(spec)
    # Both train with today's defaults; only `both` does so at the reference's compute.
    assert is_default("both_k8compute") and is_default("both")
    assert default_member(spec, is_default, "elastic") == "both"
    # Differences to the same reference, per seed: the candidate against `both` is their difference,
    # over the seeds both have.
    candidate = {"per_seed": {"1": -0.020, "2": -0.030, "3": -0.010}}
    default = {"per_seed": {"1": -0.015, "2": -0.035}}
    assert against(candidate, default) == pytest.approx({"1": -0.005, "2": 0.005})


def test_a_suite_section_names_where_its_runs_trained_apart_from_where_it_was_assembled():
    from bench.make_results import machine_lines

    here = {"device": "cpu", "cpu": "Intel Xeon", "cpu_count": 2, "platform": "Linux", "python": "3.11.7",
            "torch": "2.13.0+cpu", "megatron_core": "0.16.1"}
    suite = {"machine": here, "data": {"comparison": {"provenance": [
        {"code_version": "f0882f7", "cpu": "AMD EPYC (AVX512)", "runs": 9},
        {"code_version": "f0882f7", "cpu": "Intel Xeon (AVX512)", "runs": 1},
        {"code_version": "39afaa8", "cpu": "AMD EPYC (AVX512)", "runs": 6}]}}}
    lines = machine_lines(suite)
    assert lines[0] == ("- runs trained on: 15 run(s) on AMD EPYC (AVX512), at 2 code versions; "
                        "1 run(s) on Intel Xeon (AVX512), at f0882f7")
    assert lines[1].startswith("- report assembled on: cpu / Intel Xeon (2 cores)")
    # A benchmark that measured on the machine it ran on keeps the one line.
    assert machine_lines({"machine": here, "data": {"rows": []}}) == [
        "- machine: cpu / Intel Xeon (2 cores), Linux, Python 3.11.7, torch 2.13.0+cpu, megatron-core 0.16.1"]


def test_a_variant_read_against_another_member_is_no_default_candidate(tmp_path):
    from bench.make_results import ladder_defaults_section

    ladder(tmp_path, """\
  - name: both
    role: elastic
    overrides: {matryoshka.gate_temperature: learned, matryoshka.widths: [0.25, 0.5, 0.75, 1.0]}
  - name: both_low_k
    role: elastic
    overrides: {matryoshka.gate_temperature: learned, matryoshka.widths: [0.25, 0.5, 0.75, 1.0],
                matryoshka.distribution: explicit, matryoshka.probs: [0.4, 0.3, 0.2, 0.1]}
    variant_of: both
""")
    entry = {"per_seed": {"1": -0.02, "2": -0.01, "3": -0.03}, "mean": -0.02, "std": 0.01,
             "better_on_every_seed": True, "decides": True}
    record = {"data": {"suite": str(tmp_path / "ladder.yaml"), "comparison": {"variants": {
        "reference": "elastic", "ks": ["1", "2", "4", "8"],
        "by_variant": {"both": {"valid": entry}, "both_low_k": {"valid": entry}},
        "against": {"both": "elastic", "both_low_k": "both"}}}}}
    text = ladder_defaults_section(record)
    # Its differences are to `both`, not to the reference the criterion names.
    assert "| both | " in text and "both_low_k" not in text
