"""Budget search in two dimensions: the per-layer (k, width) vector with the lowest validation loss
whose forward FLOPs per token fit a budget (slimmable experts with an elastic k).

A token's expert FLOPs in a layer are proportional to k x c, c = width x expert FFN the active
columns, so FLOPs per token are affine in the cost sum_i k_i c_i and a FLOPs budget is a cap on
that integer sum (`cost_cap`). The search is `budget.search` on a two-dimensional set of options
per layer:

1. sensitivity: every layer moved alone to each option, the others at the reference option (the
   uniform point whose cost is closest to the budget's share per layer): 1 + L (|options| - 1)
   evaluations;
2. the separable surrogate solved exactly under the cap by dynamic programming over the cost;
3. refinement by measurement from the better of the DP vector and the best uniform point within
   the budget: one layer one step along k or width, or one layer a step up in cost and another a
   step down, accepting only measured improvements.

When few vectors fit (at most three times the sensitivity evaluations) all are measured; with
`exhaustive_limit=None` always (`exhaustive`, the true optimum, for checking). The uniform points
within the budget are all measured, so the result is never worse than the best of them.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

from mmoe_megatron.evaluation.budget import CachedLoss

Option = tuple[int, float]          # (k, width) of one MoE layer
Vector = tuple[Option, ...]         # one option per MoE layer
LossFn = Callable[[list[Vector]], list[float]]


@dataclass
class GridSearchResult:
    cap: int                        # the cap on sum_i k_i x columns_i
    layer_ks: list[int]
    layer_widths: list[float]
    loss: float
    uniform: Optional[list]         # the best uniform (k, width) within the cap
    uniform_loss: Optional[float]
    surrogate: list[list]           # the DP vector before refinement
    evaluations: int
    flops_per_token: Optional[float] = None
    budget_flops_per_token: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


class Grid:
    """The options of one layer and their integer costs k x columns."""

    def __init__(self, ks: Sequence[int], widths: Sequence[float], ffn_hidden_size: int):
        from mmoe_megatron.slimmable import width_columns

        self.ks, self.widths = sorted(set(ks)), sorted(set(widths))
        self.columns = {w: width_columns(w, ffn_hidden_size) for w in self.widths}
        self.options: list[Option] = [(k, w) for k in self.ks for w in self.widths]

    def cost(self, option: Option) -> int:
        return option[0] * self.columns[option[1]]

    def vector_cost(self, vector: Vector) -> int:
        return sum(self.cost(o) for o in vector)

    def steps(self, option: Option) -> list[Option]:
        """Neighbours along either axis."""
        k, w = option
        i, j = self.ks.index(k), self.widths.index(w)
        out = [(self.ks[i + d], w) for d in (-1, 1) if 0 <= i + d < len(self.ks)]
        return out + [(k, self.widths[j + d]) for d in (-1, 1) if 0 <= j + d < len(self.widths)]


def cost_cap(cfg, vocab_size: int, flops: float) -> int:
    """The largest sum of k x columns over the MoE layers whose forward FLOPs per token fit."""
    from mmoe_megatron.config.derive import flops_per_token

    n, ffn = cfg.num_moe_layers, cfg.moe.expert_ffn_hidden_size
    one = flops_per_token(cfg, vocab_size, [1] * n)                 # cost n x ffn
    per_unit = (flops_per_token(cfg, vocab_size, [2] + [1] * (n - 1)) - one) / ffn
    return int(math.floor((flops - one) / per_unit + 1e-9)) + n * ffn


def check_budget(cfg, vocab_size: int, flops: float, grid: Grid, what: str = "budget") -> int:
    """The cost cap of a FLOPs budget, or a ValueError naming the cheapest point when none fits."""
    from mmoe_megatron.config.derive import flops_per_token

    cap = cost_cap(cfg, vocab_size, flops)
    cheapest = min(grid.options, key=grid.cost)
    if cap < cfg.num_moe_layers * grid.cost(cheapest):
        least = flops_per_token(cfg, vocab_size, cheapest[0], cheapest[1])
        raise ValueError(
            f"{what} of {flops:.6g} FLOPs per token is below every point of the grid: the cheapest, "
            f"k={cheapest[0]} at width {cheapest[1]:g} in every MoE layer, needs {least:.6g}; raise the "
            "budget or allow a smaller k or width"
        )
    return cap


def dp_search(delta: Sequence[dict], cap: int, cost) -> tuple[Vector, float]:
    """argmin over vectors of sum_i delta[i][v_i] subject to sum_i cost(v_i) <= cap (exact)."""
    best: dict[int, tuple[float, Vector]] = {0: (0.0, ())}
    for layer in delta:
        nxt: dict[int, tuple[float, Vector]] = {}
        for s, (value, vec) in best.items():
            for option, d in layer.items():
                t = s + cost(option)
                if t <= cap and (t not in nxt or value + d < nxt[t][0]):
                    nxt[t] = (value + d, vec + (option,))
        best = nxt
    if not best:
        raise ValueError(f"no per-layer (k, width) vector fits a cost of {cap}; raise the budget")
    value, vec = min(best.values(), key=lambda cv: cv[0])
    return vec, value


def fitting(grid: Grid, num_layers: int, cap: int) -> list[Vector]:
    return [v for v in itertools.product(grid.options, repeat=num_layers) if grid.vector_cost(v) <= cap]


def count_fitting(grid: Grid, num_layers: int, cap: int) -> int:
    ways = {0: 1}
    for _ in range(num_layers):
        nxt: dict[int, int] = {}
        for s, n in ways.items():
            for o in grid.options:
                t = s + grid.cost(o)
                if t <= cap:
                    nxt[t] = nxt.get(t, 0) + n
        ways = nxt
    return sum(ways.values())


def exhaustive(loss: LossFn, grid: Grid, num_layers: int, cap: int) -> tuple[Vector, float]:
    """The true optimum by measuring every vector within the cap (small spaces only)."""
    vectors = fitting(grid, num_layers, cap)
    if not vectors:
        raise ValueError(f"no per-layer (k, width) vector fits a cost of {cap}; raise the budget")
    losses = loss(vectors)
    i = min(range(len(vectors)), key=lambda j: (losses[j], vectors[j]))
    return vectors[i], losses[i]


def _moves(vec: Vector, grid: Grid, cap: int) -> list[Vector]:
    out = set()
    for i, option in enumerate(vec):
        for step in grid.steps(option):
            single = vec[:i] + (step,) + vec[i + 1:]
            if grid.vector_cost(single) <= cap:
                out.add(single)
            up = grid.cost(step) > grid.cost(option)
            for m, other in enumerate(vec):
                if m == i:
                    continue
                for back in grid.steps(other):
                    if (grid.cost(back) < grid.cost(other)) == up:
                        pair = list(single)
                        pair[m] = back
                        if grid.vector_cost(pair) <= cap:
                            out.add(tuple(pair))
    out.discard(vec)
    return sorted(out)


def search(loss_fn: LossFn, grid: Grid, num_layers: int, cap: int, max_rounds: int = 20,
           exhaustive_limit: Optional[int] = 0) -> GridSearchResult:
    """The best per-layer (k, width) vector found within `cap` (module docstring)."""
    if cap < num_layers * min(map(grid.cost, grid.options)):
        raise ValueError(f"a cost cap of {cap} is below the cheapest vector; raise the budget")
    loss = CachedLoss(loss_fn)
    uniforms = [(o,) * num_layers for o in grid.options if grid.cost(o) * num_layers <= cap]
    limit = 3 * (1 + num_layers * (len(grid.options) - 1)) if exhaustive_limit == 0 else exhaustive_limit
    if limit is None or count_fitting(grid, num_layers, cap) <= limit:
        best, best_loss = exhaustive(loss, grid, num_layers, cap)
        surrogate = best
    else:
        share = cap / num_layers
        reference = min(grid.options, key=lambda o: (abs(grid.cost(o) - share), -o[1], o[0]))
        base_vec = (reference,) * num_layers
        probes = [base_vec] + [base_vec[:i] + (o,) + base_vec[i + 1:]
                               for i in range(num_layers) for o in grid.options if o != reference]
        values = dict(zip(probes, loss(probes)))
        delta = [{o: values[base_vec[:i] + (o,) + base_vec[i + 1:]] - values[base_vec] for o in grid.options}
                 for i in range(num_layers)]
        surrogate, _ = dp_search(delta, cap, grid.cost)
        starts = [surrogate] + uniforms
        best, best_loss = min(zip(starts, loss(starts)), key=lambda p: (p[1], p[0]))
        for _ in range(max_rounds):
            neighbours = _moves(best, grid, cap)
            if not neighbours:
                break
            cand, cand_loss = min(zip(neighbours, loss(neighbours)), key=lambda p: (p[1], p[0]))
            if cand_loss >= best_loss:
                break
            best, best_loss = cand, cand_loss
    uniform, uniform_loss = None, None
    if uniforms:
        uniform_vec, uniform_loss = min(zip(uniforms, loss(uniforms)), key=lambda p: (p[1], p[0]))
        uniform = list(uniform_vec[0])
    return GridSearchResult(
        cap=cap, layer_ks=[o[0] for o in best], layer_widths=[o[1] for o in best], loss=best_loss,
        uniform=uniform, uniform_loss=uniform_loss, surrogate=[list(o) for o in surrogate],
        evaluations=len(loss.cache),
    )


def search_checkpoint(cfg, checkpoint: str, budgets: Sequence[float], grid: Grid, num_samples: int,
                      method: str = "search") -> list[GridSearchResult]:
    """Collective over the launch: the search at each FLOPs budget on a checkpoint's weights."""
    from megatron.core import parallel_state as ps

    from mmoe_megatron.config.derive import flops_per_token
    from mmoe_megatron.evaluation.core import eval_indices, losses_at
    from mmoe_megatron.evaluation.run import causal_mask, load_for_eval

    model, vocab, dataset = load_for_eval(cfg, checkpoint, num_samples)
    device = next(model.parameters()).device
    n = min(len(dataset), num_samples)
    indices = eval_indices(n, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    mask = causal_mask(cfg.data.seq_length, device)

    def loss_fn(vectors):
        specs = [([o[0] for o in v], [o[1] for o in v]) for v in vectors]
        return [loss for loss, _ in losses_at(model, dataset, specs, indices, cfg.train.micro_batch_size, mask,
                                              device, ps.get_data_parallel_group())]

    results = []
    for flops in budgets:
        cap = check_budget(cfg, vocab, flops, grid)
        result = search(loss_fn, grid, cfg.num_moe_layers, cap, exhaustive_limit=None if method == "exhaustive" else 0)
        result.budget_flops_per_token = flops
        result.flops_per_token = flops_per_token(cfg, vocab, result.layer_ks, result.layer_widths)
        results.append(result)
    return results


def budget_name(flops: float) -> str:
    return f"flops={flops:.6g}"


def write_results(results: Sequence[GridSearchResult], out_dir: str, meta: dict) -> dict:
    """budgets.json (name -> {ks, widths}, merged with earlier searches; the export reads it),
    budget_grid_search.json (every number) and budget_grid_search.md."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {n: os.path.join(out_dir, n) for n in ("budgets.json", "budget_grid_search.json", "budget_grid_search.md")}
    budgets, details = {}, {}
    if os.path.isfile(paths["budgets.json"]):
        with open(paths["budgets.json"]) as f:
            budgets = json.load(f)
    if os.path.isfile(paths["budget_grid_search.json"]):
        with open(paths["budget_grid_search.json"]) as f:
            details = json.load(f).get("searches", {})
    for r in results:
        name = budget_name(r.budget_flops_per_token)
        budgets[name] = {"ks": r.layer_ks, "widths": r.layer_widths}
        details[name] = r.to_dict()
    with open(paths["budgets.json"], "w") as f:
        json.dump(budgets, f, indent=2)
    with open(paths["budget_grid_search.json"], "w") as f:
        json.dump({**meta, "searches": details}, f, indent=2)
    lines = ["### Per-layer (k, width) budget search", "",
             "| budget (FLOPs/token) | per-layer k | per-layer width | FLOPs/token | loss | best uniform (k, width) "
             "| its loss | gain | evaluations |", "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for name, d in sorted(details.items(), key=lambda item: item[1]["budget_flops_per_token"]):
        uniform = "-" if d["uniform"] is None else f"({d['uniform'][0]}, {d['uniform'][1]:g})"
        uloss = "-" if d["uniform_loss"] is None else f"{d['uniform_loss']:.4f}"
        gain = "-" if d["uniform_loss"] is None else f"{d['uniform_loss'] - d['loss']:+.4f}"
        lines.append(f"| {d['budget_flops_per_token']:,.0f} | {d['layer_ks']} | {d['layer_widths']} | "
                     f"{d['flops_per_token']:,.0f} | {d['loss']:.4f} | {uniform} | {uloss} | {gain} | {d['evaluations']} |")
    with open(paths["budget_grid_search.md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    return paths
