"""bench.heldout_calibration: the temperature-scaled loss against torch's cross-entropy, the fitted
inverse temperature against one known by construction, and the report's spreads and taxes against
values worked out by hand."""

from types import SimpleNamespace

import pytest
import torch

from bench import heldout_calibration as hc


def _chunks(logits, labels, weights, size):
    return ([logits[i:i + size] for i in range(0, len(logits), size)],
            [labels[i:i + size] for i in range(0, len(labels), size)],
            [weights[i:i + size] for i in range(0, len(weights), size)])


def test_loss_at_is_the_weighted_cross_entropy_of_the_scaled_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 11, generator=g) * 3
    labels = torch.randint(0, 11, (37,), generator=g)
    weights = (torch.rand(37, generator=g) > 0.3).float()
    for beta in (1.0, 0.4, 2.5):
        per_token = torch.nn.functional.cross_entropy(beta * logits.double(), labels, reduction="none")
        expected = float((per_token * weights).sum() / weights.sum())
        assert hc.loss_at(*_chunks(logits, labels, weights, 8), beta) == pytest.approx(expected, abs=1e-6)


def test_best_inverse_temperature_undoes_a_known_overconfidence():
    # Labels drawn from softmax(z); the 'model' reports 3 z, three times too sure of itself.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20_000, 30, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    weights = torch.ones(len(labels))
    chunks = _chunks(3 * z, labels, weights, 4096)
    beta, best = hc.best_inverse_temperature(*chunks)
    assert beta == pytest.approx(1 / 3, rel=0.03)
    assert best == pytest.approx(hc.loss_at(*chunks, beta), abs=1e-12)
    # A minimum: lower than as reported and than any nearby scale.
    assert best < hc.loss_at(*chunks, 1.0) - 0.5
    assert best <= min(hc.loss_at(*chunks, beta * f) for f in (0.97, 1.03))


def _record(member, role, seed, valid, wiki):
    """valid / wiki: (loss, beta, best_loss, valid_beta_loss) at k = 8."""
    def entry(v):
        return {"8": dict(zip(("loss", "beta", "best_loss", "valid_beta_loss"), v))}
    return {"member": member, "role": role, "seed": seed, "domains": {"valid": entry(valid), "wiki": entry(wiki)}}


def test_report_gives_spreads_and_paired_taxes_three_ways():
    members = [SimpleNamespace(name="elastic", role="elastic", specialists=None, overrides={}),
               SimpleNamespace(name="k8", role="specialist", specialists=None,
                               overrides={"matryoshka.strategy": "fixed", "matryoshka.ks": [8]})]
    spec = SimpleNamespace(eval=SimpleNamespace(curve_ks=[8]), members=members)
    records = [_record("elastic", "elastic", 1, (4.0, 1.0, 4.0, 4.0), (6.0, 0.8, 5.9, 5.95)),
               _record("elastic", "elastic", 2, (4.1, 1.0, 4.1, 4.1), (6.2, 0.7, 5.9, 6.05)),
               _record("k8", "specialist", 1, (4.0, 1.0, 4.0, 4.0), (6.1, 0.8, 5.8, 6.0)),
               _record("k8", "specialist", 2, (4.0, 1.0, 4.0, 4.0), (6.1, 0.8, 5.8, 6.0))]
    markdown, data = hc.report(spec, records)
    # Elastic on wiki: as evaluated 6.0 / 6.2 (mean 6.1, std 0.1414), own beta 5.9 / 5.9 (std 0).
    assert "| elastic | 2 | wiki | 8 | 6.1000 ± 0.1414 | 5.9000 ± 0.0000 | 6.0000 ± 0.0707 | 0.7500 ± 0.0707 |" in markdown
    # Tax on wiki, paired by seed: as evaluated -0.1 and +0.1; own beta +0.1 twice; valid's beta -0.05, +0.05.
    tax = data["taxes"]["elastic"]["k8"]["wiki"]
    assert tax["loss"] == pytest.approx([-0.1, 0.1]) and tax["best_loss"] == pytest.approx([0.1, 0.1])
    assert tax["valid_beta_loss"] == pytest.approx([-0.05, 0.05])
    assert "| elastic | k8 | 8 | wiki | 2 | +0.0000 ± 0.1414 | +0.1000 ± 0.0000 | +0.0000 ± 0.0707 |" in markdown
    # Held-out seed std averaged over members (elastic 0.1414, k8 0) on wiki only.
    assert data["mean_heldout_seed_std"]["loss"] == pytest.approx(0.1414 / 2, abs=1e-4)
