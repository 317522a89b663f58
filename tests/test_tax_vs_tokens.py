"""bench.tax_vs_tokens: the tax per rung and checkpoint, paired on the seeds every rung has, with
the tokens of each point, from kept results written here by hand."""

import json

import pytest

from bench import tax_vs_tokens as tvt
from tests.helpers import TINY


def _suite(tmp_path, name, iters, seeds):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nbase: {TINY}\nseeds: {seeds}\n"
        f"overrides: {{train.train_iters: {iters}, train.global_batch_size: 8, train.micro_batch_size: 4, "
        f"data.seq_length: 64}}\n"
        "eval: {fractions: [0.5, 1.0]}\n"
        "members:\n"
        "  - {name: el, role: elastic}\n"
        "  - {name: k2, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [2]}}\n")
    return str(path)


def _keep(results, suite, member, seed, iters, losses):
    """losses: {step: (valid at k = 2, wiki at k = 2)}."""
    kept = results / suite.replace("-", "_")
    kept.mkdir(parents=True, exist_ok=True)
    record = {"member": member, "seed": seed, "train_iters": iters,
              "losses": {str(step): {"valid": {"2": v}, "wiki": {"2": w}} for step, (v, w) in losses.items()}}
    (kept / f"{member}-s{seed}.json").write_text(json.dumps(record))


@pytest.fixture
def rungs(tmp_path):
    results = tmp_path / "results"
    short = _suite(tmp_path, "rung-a", 100, [1, 2])
    long = _suite(tmp_path, "rung-b", 200, [1])
    _keep(results, "rung-a", "el", 1, 100, {50: (5.0, 6.0), 100: (4.5, 5.5)})
    _keep(results, "rung-a", "k2", 1, 100, {50: (5.1, 6.0), 100: (4.4, 5.6)})
    _keep(results, "rung-a", "el", 2, 100, {50: (5.2, 6.2), 100: (4.6, 5.7)})
    _keep(results, "rung-a", "k2", 2, 100, {50: (5.0, 6.1), 100: (4.4, 5.5)})
    _keep(results, "rung-b", "el", 1, 200, {100: (4.6, 5.6), 200: (4.2, 5.2)})
    _keep(results, "rung-b", "k2", 1, 200, {100: (4.5, 5.6), 200: (4.0, 5.1)})
    return [short, long], str(results)


def test_tax_is_paired_on_the_shared_seeds_with_each_points_tokens(rungs):
    paths, results = rungs
    markdown, data = tvt.report([tvt.rung(p, "el", [2], results) for p in paths], "el", [2])
    assert data["shared_seeds"] == [1]
    end = {(s["suite"], s["domain"]): s for s in data["end_of_training"]}
    # Seed 1 only (rung-b has no seed 2): 4.5 - 4.4 and 4.2 - 4.0 on valid.
    assert end[("rung-a", "valid")]["tax_shared_seeds"] == pytest.approx(0.1)
    assert end[("rung-b", "valid")]["tax_shared_seeds"] == pytest.approx(0.2)
    assert end[("rung-b", "wiki")]["tax_shared_seeds"] == pytest.approx(0.1)
    # Every seed of rung-a: (0.1 + 0.2) / 2 on valid.
    assert end[("rung-a", "valid")]["tax_all_seeds"] == pytest.approx(0.15)
    assert end[("rung-a", "valid")]["n"] == 2
    # 100 steps of 8 x 64 tokens, 200 on the longer rung.
    assert end[("rung-a", "valid")]["tokens"] == 51200
    assert end[("rung-b", "valid")]["tokens"] == 102400
    # Half of rung-b (step 100) is a row with its own losses: 4.6 - 4.5.
    assert "| rung-b | 0.5 | 0.05 / 0.05 | valid | 2 | 4.6000 | 4.5000 | +0.1000 (+0.1000) | +0.1000 (1) |" in markdown


def test_a_k_without_a_specialist_and_rungs_without_a_shared_seed_are_refused(rungs, tmp_path):
    paths, results = rungs
    with pytest.raises(ValueError, match=r"no specialist at k = \[4\]"):
        tvt.rung(paths[0], "el", [4], results)
    with pytest.raises(ValueError, match="no member 'nope'"):
        tvt.rung(paths[0], "nope", [2], results)
    other = _suite(tmp_path, "rung-c", 100, [3])
    _keep(tmp_path / "results", "rung-c", "el", 3, 100, {50: (5.0, 6.0), 100: (4.5, 5.5)})
    _keep(tmp_path / "results", "rung-c", "k2", 3, 100, {50: (5.0, 6.0), 100: (4.5, 5.5)})
    with pytest.raises(ValueError, match="share no seed"):
        tvt.report([tvt.rung(p, "el", [2], results) for p in (paths[1], other)], "el", [2])


def test_a_checkpoint_the_shared_seed_lacks_shows_only_the_rungs_own_seeds(rungs, tmp_path):
    paths, results = rungs
    # rung-a's seed 1 (the seed both rungs have) without its half-way evaluation.
    _keep(tmp_path / "results", "rung-a", "el", 1, 100, {100: (4.5, 5.5)})
    markdown, data = tvt.report([tvt.rung(p, "el", [2], results) for p in paths], "el", [2])
    # Seed 2 alone at 0.5: 5.2 - 5.0.
    assert "| rung-a | 0.5 | 0.03 / 0.03 | valid | 2 | - | - | - | +0.2000 (1) |" in markdown
    assert "| rung-a | 1 | 0.05 / 0.05 | valid | 2 | 4.5000 | 4.4000 | +0.1000 (+0.1000) |" in markdown
