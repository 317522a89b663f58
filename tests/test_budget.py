"""Per-layer budget search (mmoe_megatron/evaluation/budget.py) against exhaustive enumeration."""

from __future__ import annotations

import itertools
import random

import pytest

from mmoe_megatron.evaluation import budget
from tests.helpers import tiny_config

KS = [1, 2, 3, 4]


def separable_loss(seed: int, layers: int):
    """A loss that is a sum of per-layer terms, each decreasing in k at a random, diminishing rate
    (like a real model), so the search's surrogate is exact and its answer must be optimal."""
    rng = random.Random(seed)
    gains = [sorted((rng.uniform(0.0, 1.0) for _ in KS), reverse=True) for _ in range(layers)]
    table = [{k: 5.0 - sum(g[:k]) for k in KS} for g in gains]
    calls = []

    def loss(vectors):
        calls.append(len(vectors))
        return [sum(table[i][k] for i, k in enumerate(v)) for v in vectors]
    return loss, calls


def interacting_loss(seed: int, layers: int):
    """Separable terms plus pairwise interactions between neighbouring layers."""
    rng = random.Random(seed)
    base, _ = separable_loss(seed, layers)
    inter = [[rng.uniform(-0.2, 0.2) for _ in KS] for _ in range(layers - 1)]

    def loss(vectors):
        values = base(vectors)
        return [x + sum(inter[i][v[i] - 1] * (v[i + 1] - 2.5) for i in range(layers - 1))
                for x, v in zip(values, vectors)]
    return loss


def brute_force(loss, layers, cap):
    vectors = [v for v in itertools.product(KS, repeat=layers) if sum(v) <= cap]
    losses = loss(vectors)
    return min(losses)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mean_k", [1.5, 2.0, 2.75])
def test_search_finds_the_optimum_of_a_separable_loss(seed, mean_k):
    layers = 4
    loss, calls = separable_loss(seed, layers)
    cap = budget.total_cap_for_mean(mean_k, layers)
    # exhaustive_limit=1: always the sensitivity + DP + refinement path, never enumeration.
    result = budget.search(loss, layers, KS, cap, exhaustive_limit=1)
    assert sum(result.layer_ks) <= cap
    assert result.loss == pytest.approx(brute_force(loss, layers, cap), abs=1e-12)


def test_search_costs_far_fewer_evaluations_than_enumeration():
    layers, ks = 8, list(range(1, 9))
    rng = random.Random(7)
    gains = [sorted((rng.uniform(0, 1) for _ in ks), reverse=True) for _ in range(layers)]

    def loss(vectors):
        return [sum(5.0 - sum(gains[i][:k]) for i, k in enumerate(v)) for v in vectors]

    cap = budget.total_cap_for_mean(3.0, layers)
    result = budget.search(loss, layers, ks, cap)
    assert sum(result.layer_ks) <= cap and result.loss <= result.uniform_loss
    assert budget.count_vectors(layers, ks, cap) > 100 * result.evaluations
    # Separable: the DP on measured sensitivities is already the optimum.
    best = budget.dp_search([{k: 5.0 - sum(g[:k]) for k in ks} for g in gains], cap)[1]
    assert result.loss == pytest.approx(best)


@pytest.mark.parametrize("seed", range(12))
def test_search_respects_the_budget_and_never_loses_to_uniform(seed):
    layers = 5
    loss = interacting_loss(seed, layers)
    for mean_k in (1.0, 1.6, 2.0, 3.0):
        cap = budget.total_cap_for_mean(mean_k, layers)
        result = budget.search(loss, layers, KS, cap, exhaustive_limit=1)
        assert sum(result.layer_ks) <= cap and all(k in KS for k in result.layer_ks)
        assert result.loss == pytest.approx(loss([tuple(result.layer_ks)])[0])
        assert result.uniform_k == int(mean_k)
        assert result.loss <= result.uniform_loss
        optimum = brute_force(loss, layers, cap)
        assert result.loss >= optimum - 1e-12


def test_exhaustive_and_dp_agree_with_enumeration():
    rng = random.Random(0)
    delta = [{k: rng.uniform(-1, 1) for k in KS} for _ in range(4)]
    for cap in range(4, 17):
        vec, cost = budget.dp_search(delta, cap)
        best = min(sum(delta[i][k] for i, k in enumerate(v))
                   for v in itertools.product(KS, repeat=4) if sum(v) <= cap)
        assert sum(vec) <= cap and cost == pytest.approx(best)
    loss, _ = separable_loss(3, 3)
    vec, value = budget.exhaustive(loss, 3, KS, 6)
    assert sum(vec) <= 6 and value == brute_force(loss, 3, 6)
    for cap in range(3, 13):
        assert budget.count_vectors(3, KS, cap) == sum(1 for v in itertools.product(KS, repeat=3) if sum(v) <= cap)


def test_a_budget_below_the_smallest_vector_is_refused():
    loss, _ = separable_loss(0, 4)
    with pytest.raises(ValueError, match="raise the budget"):
        budget.search(loss, 4, KS, 3)


def test_flops_budget_is_the_largest_total_k_that_fits():
    from mmoe_megatron.config.derive import flops_per_token

    cfg = tiny_config()
    layers = 4
    for vector in ([1, 1, 1, 1], [2, 3, 1, 4], [8, 8, 8, 8]):
        flops = flops_per_token(cfg, 8192, vector)
        cap = budget.cap_for_flops(cfg, 8192, flops, layers)
        assert cap == sum(vector)
        assert budget.cap_for_flops(cfg, 8192, flops - 1.0, layers) == sum(vector) - 1
