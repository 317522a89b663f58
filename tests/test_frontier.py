"""Frontiers and budget comparisons (mmoe_megatron/evaluation/frontier.py) on hand-made points."""

from mmoe_megatron.evaluation.frontier import best_within, compare_at_budgets, frontier


def test_frontier_keeps_only_points_no_cheaper_point_beats():
    points = [(1.0, 5.0, "a"), (2.0, 4.0, "b"), (2.0, 4.5, "b2"), (3.0, 4.2, "c"), (4.0, 3.0, "d"),
              (4.0 * (1 + 1e-12), 2.9, "d2")]  # the same cost as d up to rounding, and better
    assert frontier(points) == [(1.0, 5.0, "a"), (2.0, 4.0, "b"), (4.0 * (1 + 1e-12), 2.9, "d2")]
    assert best_within(points, 3.5) == (2.0, 4.0, "b")
    assert best_within(points, 0.5) is None


def test_compare_at_budgets_pairs_seeds_and_finds_finer_steps():
    reference = {1: [(1.0, 5.0, "1"), (2.0, 4.0, "2"), (4.0, 3.0, "4")],
                 2: [(1.0, 5.1, "1"), (2.0, 4.1, "2"), (4.0, 3.1, "4")]}
    candidate = {1: [(0.5, 6.0, "x"), (1.0, 4.9, "1"), (1.5, 4.5, "m"), (2.0, 4.1, "2"), (3.0, 3.5, "n"),
                     (4.0, 3.0, "4")],
                 2: [(1.0, 5.0, "1"), (1.5, 5.2, "m"), (2.0, 4.0, "2"), (3.0, 3.5, "n"), (4.0, 3.2, "4")]}
    budgets = [(1.0, "k=1"), (2.0, "k=2"), (4.0, "k=4")]
    out = compare_at_budgets(candidate, reference, budgets)
    at = {a["budget"]: a for a in out["at_budgets"]}
    assert [round(d, 9) for d in at["k=1"]["difference"]["all"]] == [-0.1, -0.1]
    assert at["k=1"]["at_least_as_good"] is True
    # k=2: seed 1 is worse (4.1 vs 4.0; its cheaper m at 4.5 does not help), seed 2 better.
    assert [round(d, 9) for d in at["k=2"]["difference"]["all"]] == [0.1, -0.1]
    assert at["k=2"]["at_least_as_good"] is False
    assert at["k=4"]["at_least_as_good"] is False  # seed 2: 3.2 > 3.1
    gap = out["between"][0]  # between k=1 and k=2
    # Seed 1's m (4.5) is a frontier point between 5.0 and 4.0; seed 2's m (5.2) is not on its frontier.
    assert gap["points_per_seed"] == [1, 0] and gap["all_between_neighbours"] is True
    gap = out["between"][1]  # n at 3.0 FLOPs: 3.5 lies between 4.0 and 3.0 (seed 1), 4.1 and 3.1 (seed 2)
    assert gap["points_per_seed"] == [1, 1] and gap["all_between_neighbours"] is True
    assert compare_at_budgets({1: [(2.0, 1.0, "z")]}, {1: [(1.0, 2.0, "1")]}, [(1.0, "k=1")])[
        "at_budgets"][0]["reachable"] is False
