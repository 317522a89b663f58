"""Quality-vs-compute frontiers: which evaluated points of a model are worth serving, and how two
models compare at every budget.

A point is (forward FLOPs per token, loss, label). A model's frontier is its Pareto set: the points
no other point of the same model beats with at most the same FLOPs. At a budget B a model is worth
`best_within(points, B)`, the lowest loss among its points within B (a step function of B).

`compare_at_budgets` answers, seed by seed: at each budget a reference model can reach (its own
points), is the candidate's best loss within that budget at most the reference's? And between two
consecutive reference budgets, does the candidate have points (finer steps) whose loss lies
between the reference's losses at those two budgets?
"""

from __future__ import annotations

import statistics
from typing import Optional, Sequence

Point = tuple[float, float, str]  # (flops per token, loss, label)
# FLOPs are compared with a relative slack: equal-cost points computed along different paths
# (e.g. k=4 at width 0.5 and k=2 at full width) may differ in the last bits.
_SLACK = 1e-9


def frontier(points: Sequence[Point]) -> list[Point]:
    """The Pareto-optimal points, by increasing FLOPs (and decreasing loss)."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if out and p[1] < out[-1][1] and abs(p[0] - out[-1][0]) <= _SLACK * p[0]:
            out[-1] = p  # the same cost to rounding, and a lower loss
        elif not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def best_within(points: Sequence[Point], budget: float) -> Optional[Point]:
    """The lowest-loss point whose FLOPs fit `budget`, or None."""
    fits = [p for p in points if p[0] <= budget * (1 + _SLACK)]
    return min(fits, key=lambda p: (p[1], p[0])) if fits else None


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "all": values}


def compare_at_budgets(candidate: dict[object, Sequence[Point]], reference: dict[object, Sequence[Point]],
                       budgets: Sequence[tuple[float, str]]) -> dict:
    """Seed-paired comparison. `candidate` and `reference` map a seed to that run's points; `budgets`
    are (FLOPs, label) of the reference's own points, in increasing FLOPs.

    Returns {"at_budgets": [...], "between": [...]}: per budget the candidate's and the
    reference's best loss within it and their paired difference (candidate - reference, negative:
    the candidate is better); per gap between consecutive budgets, the candidate's frontier points
    strictly inside it and whether each one's loss lies between the reference's losses at the two
    ends (for every seed)."""
    seeds = sorted(set(candidate) & set(reference), key=lambda s: (s is None, s))
    at = []
    for flops, label in budgets:
        rows = {}
        for s in seeds:
            c, r = best_within(candidate[s], flops), best_within(reference[s], flops)
            if c is not None and r is not None:
                rows[s] = (c, r)
        if not rows:
            at.append({"budget": label, "flops": flops, "reachable": False})
            continue
        diffs = [c[1] - r[1] for c, r in rows.values()]
        at.append({"budget": label, "flops": flops, "reachable": True,
                   "candidate": _stats([c[1] for c, _ in rows.values()]),
                   "candidate_points": [c[2] for c, _ in rows.values()],
                   "reference": _stats([r[1] for _, r in rows.values()]),
                   "difference": _stats(diffs), "at_least_as_good": all(d <= 0 for d in diffs)})
    between = []
    for (lo, lo_label), (hi, hi_label) in zip(budgets, budgets[1:]):
        per_seed = {}
        for s in seeds:
            r_lo, r_hi = best_within(reference[s], lo), best_within(reference[s], hi)
            inside = [p for p in frontier(candidate[s]) if lo * (1 + _SLACK) < p[0] < hi * (1 - _SLACK)]
            per_seed[s] = [{"label": p[2], "flops": p[0], "loss": p[1],
                            "between_neighbours": r_hi[1] <= p[1] <= r_lo[1]} for p in inside]
        counts = [len(v) for v in per_seed.values()]
        between.append({"from": lo_label, "to": hi_label, "points_per_seed": counts, "per_seed": per_seed,
                        "all_between_neighbours": all(q["between_neighbours"] for v in per_seed.values() for q in v)
                        if any(counts) else None})
    return {"seeds": seeds, "at_budgets": at, "between": between}
