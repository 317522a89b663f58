"""Budget search over per-layer (k, width) (mmoe_megatron/evaluation/budget_grid.py) against
exhaustive enumeration: synthetic losses, and a real model on a small grid."""

from __future__ import annotations

import random

import pytest
import torch

from mmoe_megatron.evaluation import budget_grid
from tests.helpers import VOCAB, tiny_config

KS = [1, 2, 4]
WIDTHS = [0.25, 0.5, 1.0]
FFN = 8  # columns 2, 4, 8


def separable_loss(seed: int, layers: int):
    """Per-layer terms decreasing in k and in width at random, diminishing rates."""
    rng = random.Random(seed)
    table = []
    for _ in range(layers):
        gk = sorted((rng.uniform(0, 1) for _ in KS), reverse=True)
        gw = sorted((rng.uniform(0, 1) for _ in WIDTHS), reverse=True)
        table.append({(k, w): 5.0 - sum(gk[:KS.index(k) + 1]) * (0.3 + sum(gw[:WIDTHS.index(w) + 1]))
                      for k in KS for w in WIDTHS})

    def loss(vectors):
        return [sum(table[i][o] for i, o in enumerate(v)) for v in vectors]
    return loss


def interacting_loss(seed: int, layers: int):
    rng = random.Random(seed + 100)
    base = separable_loss(seed, layers)
    inter = [rng.uniform(-0.15, 0.15) for _ in range(layers - 1)]

    def loss(vectors):
        return [x + sum(inter[i] * (v[i][0] * v[i][1] - v[i + 1][0] * v[i + 1][1]) for i in range(layers - 1))
                for x, v in zip(base(vectors), vectors)]
    return loss


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("share", [0.3, 0.6])
def test_search_finds_the_optimum_of_a_separable_loss(seed, share):
    layers = 4
    grid = budget_grid.Grid(KS, WIDTHS, FFN)
    cap = int(share * layers * grid.cost((4, 1.0)))
    loss = separable_loss(seed, layers)
    result = budget_grid.search(loss, grid, layers, cap, exhaustive_limit=1)  # never enumerate
    best, best_loss = budget_grid.exhaustive(loss, grid, layers, cap)
    chosen = tuple(zip(result.layer_ks, result.layer_widths))
    assert grid.vector_cost(chosen) <= cap
    assert result.loss == pytest.approx(best_loss, abs=1e-12)
    assert result.evaluations < len(budget_grid.fitting(grid, layers, cap))


@pytest.mark.parametrize("seed", range(8))
def test_search_is_never_worse_than_uniform_and_close_to_optimum_with_interactions(seed):
    layers = 4
    grid = budget_grid.Grid(KS, WIDTHS, FFN)
    cap = int(0.45 * layers * grid.cost((4, 1.0)))
    loss = interacting_loss(seed, layers)
    result = budget_grid.search(loss, grid, layers, cap, exhaustive_limit=1)
    _, best_loss = budget_grid.exhaustive(loss, grid, layers, cap)
    assert result.loss <= result.uniform_loss
    assert result.loss - best_loss < 0.05


def test_cost_cap_matches_flops_and_a_budget_below_the_grid_is_refused():
    from mmoe_megatron.config.derive import flops_per_token

    cfg = tiny_config()  # 4 MoE layers, experts of 64 columns
    grid = budget_grid.Grid([1, 2, 4], [0.25, 0.5, 1.0], 64)
    vec = ((2, 0.5), (1, 1.0), (4, 0.25), (1, 0.25))
    flops = flops_per_token(cfg, VOCAB, [o[0] for o in vec], [o[1] for o in vec])
    assert budget_grid.cost_cap(cfg, VOCAB, flops) == grid.vector_cost(vec)
    assert budget_grid.cost_cap(cfg, VOCAB, flops - 1) == grid.vector_cost(vec) - 1
    cheapest = flops_per_token(cfg, VOCAB, 1, 0.25)
    assert budget_grid.check_budget(cfg, VOCAB, cheapest, grid) == 4 * 16
    with pytest.raises(ValueError, match=r"below every point of the grid: the cheapest, k=1 at width 0.25"):
        budget_grid.check_budget(cfg, VOCAB, cheapest - 1.0, grid)


def test_search_on_a_real_model_matches_exhaustive(single_process_mcore):
    """Exhaustive check on a small case: 4 MoE layers, k in {1, 2}, width in {0.5, 1}, a random
    tiny model; the search must return the best vector enumeration finds."""
    from mmoe_megatron.evaluation.core import losses_at
    from mmoe_megatron.model import build_model
    from tests.helpers import causal_mask

    cfg = tiny_config(**{"data.seq_length": 16, "matryoshka.widths": [0.5, 1.0], "train.micro_batch_size": 4})
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, seed=7)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (4, 17), generator=gen)
    dataset = [{"tokens": data[i, :-1], "labels": data[i, 1:], "loss_mask": torch.ones(16),
                "position_ids": torch.arange(16)} for i in range(4)]

    def loss_fn(vectors):
        specs = [([o[0] for o in v], [o[1] for o in v]) for v in vectors]
        return [loss for loss, _ in losses_at(model, dataset, specs, range(4), 4, causal_mask(16), "cpu")]

    grid = budget_grid.Grid([1, 2], [0.5, 1.0], cfg.moe.expert_ffn_hidden_size)
    cap = 4 * 64 + 2 * 32  # e.g. every layer at (1, 1.0) plus two layers' worth of (1, 0.5) more
    best, best_loss = budget_grid.exhaustive(loss_fn, grid, 4, cap)
    result = budget_grid.search(loss_fn, grid, 4, cap, exhaustive_limit=1)
    assert result.loss <= result.uniform_loss
    assert tuple(zip(result.layer_ks, result.layer_widths)) == best
    assert result.loss == pytest.approx(best_loss, abs=1e-12)
