"""bench.seed_sources: which members vary one source of randomness, and the report's stds, shares
and sum against values worked out by hand."""

from types import SimpleNamespace

import pytest

from bench import seed_sources as ss

BASE = {"matryoshka.gate_temperature": "learned"}


def _spec(*extra_members):
    members = [SimpleNamespace(name="elastic", overrides=dict(BASE)),
               SimpleNamespace(name="k8", overrides={"matryoshka.strategy": "fixed"}),
               SimpleNamespace(name="e_init", overrides={**BASE, "data.seed": 1, "matryoshka.seed": 1}),
               SimpleNamespace(name="e_draws", overrides={**BASE, "data.seed": 1, "model.init_seed": 1}),
               SimpleNamespace(name="e_data_only_fixed", overrides={**BASE, "data.seed": 1}),
               SimpleNamespace(name="k8_init", overrides={"matryoshka.strategy": "fixed", "data.seed": 1,
                                                          "matryoshka.seed": 1}),
               *extra_members]
    return SimpleNamespace(name="s", members=members, eval=SimpleNamespace(curve_ks=[1, 8]))


def test_variants_are_the_members_that_leave_one_source_to_the_seed():
    # e_data_only_fixed varies two sources and k8_init is another member's variant: neither counts.
    assert ss.one_source_variants(_spec(), "elastic") == {"init": "e_init", "draws": "e_draws"}
    # A variant that also changes a training setting is not a variant.
    other = SimpleNamespace(name="e_data", overrides={**BASE, "model.init_seed": 1, "matryoshka.seed": 1,
                                                      "optimizer.lr": 1e-3})
    assert "data" not in ss.one_source_variants(_spec(other), "elastic")
    # The init-only member under a second name (its runs, read against other specialists) is it.
    again = SimpleNamespace(name="e_init_again", overrides={**BASE, "data.seed": 1, "matryoshka.seed": 1},
                            same_runs_as="e_init")
    assert ss.one_source_variants(_spec(again), "elastic") == {"init": "e_init", "draws": "e_draws"}
    with pytest.raises(ValueError, match="no member 'nope'"):
        ss.one_source_variants(_spec(), "nope")
    with pytest.raises(ValueError, match="e_init fixes"):
        ss.one_source_variants(_spec(), "e_init")
    with pytest.raises(ValueError, match="no variant of k8"):
        ss.one_source_variants(SimpleNamespace(name="s", members=_spec().members[:2]), "k8")


def _record(member, seed, valid8, valid1=5.0):
    return {"member": member, "seed": seed,
            "losses": {"10": {"valid": {"1": 9.0, "8": 9.0}},
                       "20": {"valid": {"1": valid1, "8": valid8}}}}


def test_report_gives_each_sources_std_its_share_and_their_sum():
    records = ([_record("elastic", s, v) for s, v in ((1, 4.0), (2, 4.2), (3, 4.4))] +      # std 0.2
               [_record("e_init", s, v) for s, v in ((1, 4.0), (2, 4.12), (3, 4.0))] +     # std 0.069282
               [_record("e_draws", s, v, 5.0 + s) for s, v in ((1, 4.0), (2, 4.0), (3, 4.3))])  # std 0.173205
    markdown, data = ss.report(_spec(), records, "elastic")
    at8 = data["std"]["valid"]["8"]
    assert at8["all"] == pytest.approx(0.2)
    assert at8["init"] == pytest.approx(0.0692820, rel=1e-5)
    assert at8["draws"] == pytest.approx(0.1732051, rel=1e-5)
    assert at8["sum"] == pytest.approx((0.0048 + 0.03) ** 0.5, rel=1e-5)
    # Read at the last step (20), not the first (10, where every run is at 9.0).
    assert data["std"]["valid"]["1"]["draws"] == pytest.approx(1.0)
    assert "| valid | 8 | 0.2000 | 0.0693 (0.35) | 0.1732 (0.87) | 0.1865 (0.93) |" in markdown
    with pytest.raises(ValueError, match="fewer than 2 kept runs"):
        ss.report(_spec(), records[:7], "elastic")
