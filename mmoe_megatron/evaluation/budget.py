"""Per-layer budget search: the per-layer k vector with the lowest validation loss whose total
compute fits a budget (a mean k over MoE layers, or forward FLOPs per token).

Every MoE layer's experts have the same size, so FLOPs per token are affine in the sum of the
per-layer ks and any budget is a cap on that sum. The search:

1. measures each layer's sensitivity: the loss with that layer alone moved to each allowed k and
   every other layer at the reference k (the allowed k closest to the budget's mean), so
   L x |ks| evaluations instead of |ks|^L;
2. solves the separable surrogate `loss(v) ~ base + sum_i delta_i(v_i)` exactly under the cap by
   dynamic programming over (layer, total k) (a multiple-choice knapsack);
3. refines by measurement: hill-climbs from the better of the DP vector and the uniform vector by
   moving one step of k from one layer to another (or spending left-over budget), accepting only
   measured improvements.

When few vectors fit the budget (at most three times what step 1 would evaluate), it evaluates
them all instead.
The returned vector is therefore never worse, on the search's samples, than the uniform vector at
the same budget. Where the space is small, `exhaustive` gives the true optimum for comparison.
All evaluations go through one `loss_fn` (a list of vectors -> their losses); under a launcher
it is a collective, and every rank takes the same decisions from the same reduced losses.

With slimmable experts the same search runs over per-layer (k, width) options under a FLOPs
budget (`budget_grid.py`); the command does that when `--widths` is given or the run was trained
with more than one width.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

Vector = tuple[int, ...]
LossFn = Callable[[list[Vector]], list[float]]


@dataclass
class SearchResult:
    budget_total: int               # the cap on the sum of per-layer ks
    layer_ks: list[int]
    loss: float
    uniform_k: Optional[int]        # the largest allowed uniform k within the cap
    uniform_loss: Optional[float]
    surrogate_ks: list[int]         # the DP vector before refinement
    evaluations: int
    sensitivity: dict[str, list[float]] = field(default_factory=dict)  # k -> delta per layer

    @property
    def mean_k(self) -> float:
        return sum(self.layer_ks) / len(self.layer_ks)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_k": self.mean_k}


class CachedLoss:
    """Evaluates each distinct vector once; counts evaluations."""

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn
        self.cache: dict[Vector, float] = {}

    def __call__(self, vectors: Sequence[Vector]) -> list[float]:
        todo = list(dict.fromkeys(v for v in map(tuple, vectors) if v not in self.cache))
        if todo:
            self.cache.update(zip(todo, self.loss_fn(todo)))
        return [self.cache[tuple(v)] for v in vectors]


def total_cap_for_mean(mean_k: float, num_layers: int) -> int:
    return int(math.floor(mean_k * num_layers + 1e-9))


def dp_search(delta: Sequence[dict[int, float]], cap: int) -> tuple[Vector, float]:
    """argmin over v of sum_i delta[i][v_i] subject to sum(v) <= cap (exact)."""
    # best[s] = (cost, vector) over the layers so far with total exactly s
    best: dict[int, tuple[float, Vector]] = {0: (0.0, ())}
    for layer in delta:
        nxt: dict[int, tuple[float, Vector]] = {}
        for s, (cost, vec) in best.items():
            for k, d in layer.items():
                t = s + k
                if t > cap:
                    continue
                cand = (cost + d, vec + (k,))
                if t not in nxt or cand[0] < nxt[t][0]:
                    nxt[t] = cand
        best = nxt
    if not best:
        raise ValueError(f"no per-layer k vector fits a total of {cap}; raise the budget")
    cost, vec = min(best.values(), key=lambda cv: cv[0])
    return vec, cost


def exhaustive(loss: LossFn, num_layers: int, ks: Sequence[int], cap: int) -> tuple[Vector, float]:
    """The true optimum by evaluating every vector within the cap (small spaces only)."""
    vectors = [v for v in itertools.product(sorted(ks), repeat=num_layers) if sum(v) <= cap]
    if not vectors:
        raise ValueError(f"no per-layer k vector fits a total of {cap}; raise the budget")
    losses = loss(vectors)
    i = min(range(len(vectors)), key=lambda j: (losses[j], vectors[j]))
    return vectors[i], losses[i]


def count_vectors(num_layers: int, ks: Sequence[int], cap: int) -> int:
    """How many per-layer vectors over `ks` have a sum within `cap` (by counting, not listing)."""
    ways = {0: 1}
    for _ in range(num_layers):
        nxt: dict[int, int] = {}
        for s, n in ways.items():
            for k in ks:
                if s + k <= cap:
                    nxt[s + k] = nxt.get(s + k, 0) + n
        ways = nxt
    return sum(ways.values())


def _moves(vec: Vector, ks: Sequence[int], cap: int) -> list[Vector]:
    """Neighbours: one layer one allowed step up or down, or one up and another down."""
    ks = sorted(ks)
    pos = {k: i for i, k in enumerate(ks)}
    out = set()
    for i, ki in enumerate(vec):
        for di in (-1, 1):
            j = pos[ki] + di
            if not 0 <= j < len(ks):
                continue
            single = vec[:i] + (ks[j],) + vec[i + 1:]
            if sum(single) <= cap:
                out.add(single)
            for m, km in enumerate(vec):
                if m == i:
                    continue
                jm = pos[km] - di
                if 0 <= jm < len(ks):
                    pair = list(single)
                    pair[m] = ks[jm]
                    if sum(pair) <= cap:
                        out.add(tuple(pair))
    out.discard(vec)
    return sorted(out)


def search(
    loss_fn: LossFn, num_layers: int, ks: Sequence[int], cap: int, max_rounds: int = 20,
    exhaustive_limit: Optional[int] = 0,
) -> SearchResult:
    """The best vector found within `cap` (see the module docstring). `exhaustive_limit`: measure
    every vector when at most this many fit (0: when at most three times as many as the
    sensitivities would measure; None: always)."""
    ks = sorted(set(ks))
    if cap < num_layers * ks[0]:
        raise ValueError(
            f"a total k of {cap} over {num_layers} MoE layers is below the smallest vector "
            f"({num_layers} x k={ks[0]}); raise the budget"
        )
    loss = CachedLoss(loss_fn)
    fits = [k for k in ks if k * num_layers <= cap]
    uniform_k = fits[-1] if fits else None
    limit = 3 * (1 + num_layers * (len(ks) - 1)) if exhaustive_limit == 0 else exhaustive_limit
    if limit is None or count_vectors(num_layers, ks, cap) <= limit:
        # Fewer vectors fit than the sensitivities would cost: measure them all.
        best, best_loss = exhaustive(loss, num_layers, ks, cap)
        uniform_loss = loss([(uniform_k,) * num_layers])[0] if uniform_k is not None else None
        return SearchResult(cap, list(best), best_loss, uniform_k, uniform_loss, list(best), len(loss.cache))
    reference = min(ks, key=lambda k: (abs(k - cap / num_layers), k))
    base_vec = (reference,) * num_layers
    probes = [base_vec] + [base_vec[:i] + (k,) + base_vec[i + 1:]
                           for i in range(num_layers) for k in ks if k != reference]
    values = dict(zip(probes, loss(probes)))
    base = values[base_vec]
    delta = [{k: values[base_vec[:i] + (k,) + base_vec[i + 1:]] - base for k in ks}
             for i in range(num_layers)]
    surrogate, _ = dp_search(delta, cap)

    starts = [surrogate] + ([(uniform_k,) * num_layers] if uniform_k is not None else [])
    start_losses = loss(starts)
    current, current_loss = min(zip(starts, start_losses), key=lambda p: (p[1], p[0]))
    for _ in range(max_rounds):
        neighbours = _moves(current, ks, cap)
        if not neighbours:
            break
        losses = loss(neighbours)
        best, best_loss = min(zip(neighbours, losses), key=lambda p: (p[1], p[0]))
        if best_loss >= current_loss:
            break
        current, current_loss = best, best_loss
    uniform_loss = loss([(uniform_k,) * num_layers])[0] if uniform_k is not None else None
    return SearchResult(
        budget_total=cap, layer_ks=list(current), loss=current_loss, uniform_k=uniform_k,
        uniform_loss=uniform_loss, surrogate_ks=list(surrogate), evaluations=len(loss.cache),
        sensitivity={str(k): [d[k] for d in delta] for k in ks},
    )


# --- command line --------------------------------------------------------------------------


def cap_for_flops(cfg, vocab_size: int, flops: float, num_layers: int) -> int:
    """The largest total k whose forward FLOPs per token fit `flops`."""
    from mmoe_megatron.config.derive import flops_per_token

    f1 = flops_per_token(cfg, vocab_size, [1] * num_layers)
    f2 = flops_per_token(cfg, vocab_size, [2] + [1] * (num_layers - 1))
    per_k = f2 - f1
    return int(math.floor((flops - f1) / per_k + 1e-9)) + num_layers


def budget_name(result: SearchResult, num_layers: int) -> str:
    return f"mean_k={result.budget_total / num_layers:g}"


def write_results(results: Sequence[SearchResult], num_layers: int, out_dir: str, meta: dict) -> dict:
    """budgets.json (name -> per-layer ks, what the export carries), budget_search.json (all
    numbers) and budget_search.md, merged with earlier searches of the same run."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {n: os.path.join(out_dir, n) for n in ("budgets.json", "budget_search.json", "budget_search.md")}
    budgets, details = {}, {}
    if os.path.isfile(paths["budgets.json"]):
        with open(paths["budgets.json"]) as f:
            budgets = json.load(f)
    if os.path.isfile(paths["budget_search.json"]):
        with open(paths["budget_search.json"]) as f:
            details = json.load(f).get("searches", {})
    for r in results:
        name = budget_name(r, num_layers)
        budgets[name] = r.layer_ks
        details[name] = r.to_dict()
    with open(paths["budgets.json"], "w") as f:
        json.dump(budgets, f, indent=2)
    with open(paths["budget_search.json"], "w") as f:
        json.dump({**meta, "searches": details}, f, indent=2)
    lines = ["### Per-layer budget search", "",
             "| budget | per-layer k | loss | uniform k | uniform loss | gain | evaluations |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, d in sorted(details.items()):
        uniform = "-" if d["uniform_k"] is None else str(d["uniform_k"])
        uloss = "-" if d["uniform_loss"] is None else f"{d['uniform_loss']:.4f}"
        gain = "-" if d["uniform_loss"] is None else f"{d['uniform_loss'] - d['loss']:+.4f}"
        lines.append(f"| {name} | {d['layer_ks']} | {d['loss']:.4f} | {uniform} | {uloss} | {gain} | "
                     f"{d['evaluations']} |")
    with open(paths["budget_search.md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    return paths


def main(argv=None) -> int:
    import argparse
    import sys

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mmoe_megatron import distributed
    from mmoe_megatron.config import parse_overrides
    from mmoe_megatron.evaluation.core import eval_indices, losses_at
    from mmoe_megatron.evaluation.run import causal_mask, latest_checkpoint, load_for_eval, run_config
    from mmoe_megatron.model import moe_layer_numbers

    p = argparse.ArgumentParser(description="Find the best per-layer k vector for a compute budget.")
    p.add_argument("--run", required=True, help="run directory (or its config.yaml)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: latest complete)")
    p.add_argument("--mean-k", action="append", type=float, default=[], help="budget as a mean k (repeatable)")
    p.add_argument("--flops-per-token", action="append", type=float, default=[],
                   help="budget as forward FLOPs per token (repeatable)")
    p.add_argument("--ks", default=None, help="allowed ks per layer (default: 1..number of experts; with "
                                              "widths, the run's trained ks)")
    p.add_argument("--num-samples", type=int, default=None, help="validation samples per evaluation")
    p.add_argument("--widths", default=None,
                   help="allowed expert widths per layer, e.g. 0.25,0.5,1: search per-layer (k, width) under "
                        "--flops-per-token budgets (default: the run's trained widths when it has several); "
                        "1: full-width experts, a per-layer k search (budgets as --mean-k too)")
    p.add_argument("--method", choices=["search", "exhaustive"], default="search")
    p.add_argument("--out", default=None, help="output directory (default: the run directory)")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not args.mean_k and not args.flops_per_token:
        p.error("give at least one budget: --mean-k 2 or --flops-per-token 1.5e6")

    cfg = run_config(args.run, parse_overrides(rest))
    num_layers = len(moe_layer_numbers(cfg))
    ks = [int(k) for k in args.ks.split(",")] if args.ks else list(range(1, cfg.moe.num_experts + 1))
    widths = ([float(w) for w in args.widths.split(",")] if args.widths
              else (list(cfg.matryoshka.widths) if cfg.matryoshka.elastic_width else None))
    if widths == [1.0]:
        widths = None  # full-width experts only: the per-layer k search
    grid = None
    if widths is not None:
        from mmoe_megatron.data import resolve_vocab_size
        from mmoe_megatron.evaluation import budget_grid

        if args.mean_k:
            p.error("with widths, give budgets as --flops-per-token (a mean k does not fix the compute)")
        if not args.ks:  # every k of 1..E times every width would take hundreds of evaluations
            ks = list(cfg.matryoshka.ks)
        try:
            grid = budget_grid.Grid(ks, widths, cfg.moe.expert_ffn_hidden_size)
            vocab = resolve_vocab_size(cfg)
            # Before any weight is loaded: a budget below every grid point is a usage error.
            for f in args.flops_per_token:
                budget_grid.check_budget(cfg, vocab, f, grid, "--flops-per-token")
        except ValueError as e:
            p.error(str(e))
    distributed.init_distributed(cfg)
    try:
        checkpoint = args.checkpoint or latest_checkpoint(cfg)
        if grid is not None:
            n = args.num_samples or cfg.train.eval_iters * cfg.train.global_batch_size
            results = budget_grid.search_checkpoint(cfg, checkpoint, args.flops_per_token, grid, n, args.method)
            if dist.get_rank() == 0:
                paths = budget_grid.write_results(results, args.out or cfg.run_dir, {
                    "checkpoint": checkpoint, "samples": n, "allowed_ks": grid.ks, "allowed_widths": grid.widths})
                with open(paths["budget_grid_search.md"]) as f:
                    print(f.read(), end="")
                print("wrote " + ", ".join(paths.values()))
            return 0
        model, vocab, dataset = load_for_eval(cfg, checkpoint, args.num_samples)
        device = next(model.parameters()).device
        n = min(len(dataset), args.num_samples or cfg.train.eval_iters * cfg.train.global_batch_size)
        indices = eval_indices(n, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        mask = causal_mask(cfg.data.seq_length, device)

        def loss_fn(vectors):
            results = losses_at(model, dataset, [list(v) for v in vectors], indices,
                                cfg.train.micro_batch_size, mask, device, ps.get_data_parallel_group())
            return [loss for loss, _ in results]


        caps = [total_cap_for_mean(m, num_layers) for m in args.mean_k]
        caps += [cap_for_flops(cfg, vocab, f, num_layers) for f in args.flops_per_token]
        results = []
        for cap in caps:
            if args.method == "exhaustive":
                results.append(search(loss_fn, num_layers, ks, cap, exhaustive_limit=None))
            else:
                results.append(search(loss_fn, num_layers, ks, cap))
        if dist.get_rank() == 0:
            out = args.out or cfg.run_dir
            paths = write_results(results, num_layers, out, {"checkpoint": checkpoint, "samples": n,
                                                             "allowed_ks": ks})
            with open(paths["budget_search.md"]) as f:
                print(f.read(), end="")
            print("wrote " + ", ".join(paths.values()))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
