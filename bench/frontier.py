"""Two-dimensional elasticity as a benchmark: the quality-vs-FLOPs frontiers of elastic models (in
k, in expert width, or both) at equal training compute, against fixed-k specialists, recorded in
bench/results/<suite name>.json with its plot.

    python -m bench.frontier --suite bench/suites/slimmable_cpu.yaml                   # every run
    python -m bench.frontier --suite bench/suites/slimmable_cpu.yaml --member both --seed 2
    python -m bench.frontier --suite bench/suites/slimmable_cpu.yaml --report-only
    python -m bench.frontier --suite bench/suites/slimmable_cpu.yaml --evaluate-only   # new eval settings

Runs are trained, evaluated on the suite's (k, width) grid and kept as in `bench.suite_bench`
(bench/results/<suite name>/<member>-s<seed>.json; a run resumes if interrupted and is evaluated
once); the runs of `eval.budget_members` are then searched for the best per-layer (k, width)
within each of `eval.budgets` (`mmoe_megatron.evaluation.budget`), the result added to their record. The specialists are read from `--specialists` (the results.json records of fixed-k models
trained at the same preset, by default those of the elasticity ladder) for the seeds of this
suite, or else taken from the suite's own specialist members. Each model's points are (forward FLOPs per token, validation loss); the report gives its
frontier, the best loss within each budget the `--reference` model reaches (its full-width ks),
the seed-paired differences to it, and the points that fall between two of its budgets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

from bench.common import RESULTS, ROOT, kept_records, suite_slug, write_result

VALID = "valid"


def _final(record: dict) -> dict[str, float]:
    step = max(record["losses"], key=int)
    return record["losses"][step][VALID]


def points_of(record: dict) -> list[tuple[float, float, str]]:
    losses = _final(record)
    return [(record["flops_per_token"][label], loss, label) for label, loss in losses.items()
            if label in record["flops_per_token"]]


def specialist_records(directory: str, members: list[str], seeds: list) -> list[dict]:
    """The kept records of the specialists for the suite's seeds (all seeds found if it has none)."""
    import json

    out = []
    for name in members:
        for seed in (seeds or [None]):
            path = os.path.join(directory, f"{name}.json" if seed is None else f"{name}-s{seed}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    out.append(json.load(f))
    return out


def mean_points(records: list[dict]) -> list[tuple[float, float, str, float]]:
    """(FLOPs, mean loss over the records, label, std) for the labels every record has."""
    labels = set.intersection(*(set(_final(r)) for r in records))
    flops = records[0]["flops_per_token"]
    out = []
    for label in labels:
        values = [_final(r)[label] for r in records]
        out.append((flops[label], statistics.fmean(values), label,
                    statistics.stdev(values) if len(values) > 1 else 0.0))
    return sorted(out)


def _fmt(stats: dict) -> str:
    return f"{stats['mean']:.4f}" + ("" if stats["std"] is None else f" ± {stats['std']:.4f}")


def report(spec, records: list[dict], specialists: list[dict], reference: str, suite_path: str,
           specialist_source: str = "") -> int:
    from mmoe_megatron.evaluation.core import EvalPoint, parse_spec, split_spec
    from mmoe_megatron.evaluation.frontier import best_within, compare_at_budgets, frontier
    from mmoe_megatron.evaluation.report import plot_frontier

    by_model: dict[str, list[dict]] = {}
    for r in records:
        by_model.setdefault(r["member"], []).append(r)
    if reference not in by_model:
        print(f"no evaluated run of the reference member {reference!r} yet", flush=True)
        return 1
    models = [m.name for m in spec.members if m.name in by_model]
    spec_by_k = {}
    for r in specialists:
        spec_by_k.setdefault(r["trained_k"], []).append(r)
    ref_runs = {r["seed"]: r for r in by_model[reference]}
    full_width = sorted({label for label in _final(by_model[reference][0]) if label.isdigit()}, key=int)
    budgets = [(by_model[reference][0]["flops_per_token"][label], f"k={label}") for label in full_width]

    # Specialists as one family: per seed, their points (each at the k it was trained for).
    def specialist_points(seed):
        return [(r["flops_per_token"][str(k)], _final(r)[str(k)], f"k{k} specialist")
                for k, rs in sorted(spec_by_k.items()) for r in rs if r["seed"] == seed]

    # The reference as it is served without slimmable experts: its full-width ks. Its points at
    # narrower widths (which it was not trained for) form a family of their own.
    families = {name: {r["seed"]: points_of(r) for r in by_model[name]} for name in models}
    widened = f"{reference} (+ narrower widths)"
    families[widened] = families[reference]
    families[reference] = {s: [p for p in pts if p[2] in full_width] for s, pts in families[reference].items()}
    if specialists:
        families["specialists"] = {s: specialist_points(s) for s in sorted({r["seed"] for r in specialists})}
    comparisons = {name: compare_at_budgets(families[name], families[reference], budgets)
                   for name in families if name != reference}

    lines = [f"Models trained at equal training compute (3 x forward FLOPs at the expected (k, width) x "
             f"tokens); suite `{os.path.relpath(os.path.abspath(suite_path), ROOT)}`, seeds "
             f"{sorted(ref_runs, key=lambda s: (s is None, s))}. Loss: validation, mean ± std over seeds. "
             f"Budgets: the forward FLOPs per token of `{reference}` at its full-width ks, the points it is "
             f"served at without slimmable experts (`{widened}`: the same model also evaluated at narrower "
             "expert widths, which it was not trained for). A model's loss within a budget is that of its "
             "best point within it."
             + (f" Specialists: {sorted({r['trained_k'] for r in specialists})} from {specialist_source}, seeds "
                f"{sorted({r['seed'] for r in specialists}, key=str)}." if specialists else " No specialists found."),
             ""]
    lines += ["#### Best loss within each budget", "",
              "| model | training PFLOP | " + " | ".join(f"{lab} ({f / 1e6:.3f} MFLOP)" for f, lab in budgets) + " |",
              "|---|---:|" + "---:|" * len(budgets)]
    for name in [reference] + [n for n in families if n != reference]:
        cells = []
        for f, lab in budgets:
            per_seed = [best_within(pts, f) for pts in families[name].values()]
            per_seed = [p for p in per_seed if p is not None]
            if not per_seed:
                cells.append("-")
                continue
            values = [p[1] for p in per_seed]
            chosen = sorted({p[2] for p in per_seed})
            cells.append(_fmt({"mean": statistics.fmean(values),
                               "std": statistics.stdev(values) if len(values) > 1 else None})
                         + f" ({', '.join(chosen)})")
        pflop = f"{by_model[name][0]['training_flops'] / 1e15:.4f}" if name in by_model else "-"
        lines.append(f"| {name} | {pflop} | " + " | ".join(cells) + " |")
    lines += ["", f"#### Paired difference to `{reference}` at each of its budgets", "",
              "Best loss within the budget minus the reference's, per seed (negative: better than the reference); "
              "yes when every seed is at least as good.", "",
              "| model | " + " | ".join(lab for _, lab in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for name, comp in comparisons.items():
        cells = ["unreachable" if not a["reachable"] else
                 f"{a['difference']['mean']:+.4f}" + ("" if a["difference"]["std"] is None else
                                                      f" ± {a['difference']['std']:.4f}")
                 + (" yes" if a["at_least_as_good"] else " no") for a in comp["at_budgets"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"#### Finer steps: frontier points between two budgets of `{reference}`", "",
              "Points of each model's frontier (per seed) with FLOPs strictly between two consecutive budgets; "
              "between: the point's loss lies between the reference's losses at those two budgets, on every seed.",
              "", "| model | " + " | ".join(f"{b['from']}-{b['to']}" for b in comparisons[next(iter(comparisons))]["between"])
              + " |", "|---|" + "---|" * (len(budgets) - 1)]
    for name, comp in comparisons.items():
        cells = []
        for b in comp["between"]:
            labels = sorted({q["label"] for v in b["per_seed"].values() for q in v})
            verdict = {True: "all between", False: "not all between", None: ""}[b["all_between_neighbours"]]
            cells.append(f"{'/'.join(map(str, b['points_per_seed']))} pts {verdict}" + (f" ({', '.join(labels)})"
                                                                                          if labels else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "#### Frontier of every model (mean over seeds)", "",
              "| model | frontier: point (MFLOP/token): loss |", "|---|---|"]
    series = {}
    for name in models:
        pts = mean_points(by_model[name])
        front = frontier([(f, loss, lab) for f, loss, lab, _ in pts])
        lines.append(f"| {name} | " + ", ".join(f"{lab} ({f / 1e6:.3f}): {loss:.4f}" for f, loss, lab in front) + " |")
        series[name] = [EvalPoint(*split_spec(parse_spec(lab))[:1], loss=loss, tokens=0, active_params=0,
                                  flops_per_token=f, width=split_spec(parse_spec(lab))[1]) for f, loss, lab, _ in pts]
    if spec_by_k:
        spec_pts = [(rs[0]["flops_per_token"][str(k)], statistics.fmean(_final(r)[str(k)] for r in rs), f"k{k}")
                    for k, rs in sorted(spec_by_k.items())]
        lines.append("| specialists | " + ", ".join(f"{lab} ({f / 1e6:.3f}): {loss:.4f}" for f, loss, lab in spec_pts)
                     + f" (seeds {sorted({r['seed'] for r in specialists})}) |")
        series["fixed-k specialists"] = [EvalPoint(k=int(lab[1:]), loss=loss, tokens=0, active_params=0,
                                                   flops_per_token=f) for f, loss, lab in spec_pts]
    searches = [(r["member"], r["seed"], s) for r in records for s in r.get("budget_search", [])]
    if searches:
        lines += ["", "#### Per-layer (k, width) budget search", "",
                  "| model | seed | budget (MFLOP) | per-layer k | per-layer width | loss | best uniform (k, width) | its loss |",
                  "|---|---:|---:|---|---|---:|---|---:|"]
        for name, seed, s in sorted(searches, key=lambda t: (t[0], str(t[1]), t[2]["budget_flops_per_token"])):
            lines.append(f"| {name} | {seed} | {s['budget_flops_per_token'] / 1e6:.3f} | {s['layer_ks']} | "
                         f"{s['layer_widths']} | {s['loss']:.4f} | {tuple(s['uniform']) if s['uniform'] else '-'} | "
                         f"{s['uniform_loss']:.4f} |")
    slug = suite_slug(spec)
    report_dir = os.path.join(ROOT, spec.runs_dir, spec.name, "report")
    png = os.path.join(report_dir, "frontier.png")
    plot_frontier(series, png, title=f"{spec.name}: validation loss vs forward FLOPs per token (mean over seeds)",
                  markers={"fixed-k specialists": {"marker": "s", "linestyle": "--", "color": "black"}})
    shutil.copyfile(png, os.path.join(RESULTS, f"{slug}.png"))
    lines += ["", f"![{spec.name} frontier](bench/results/{slug}.png)"]
    write_result(slug, f"Two-dimensional elasticity: {spec.name}", "\n".join(lines), {
        "suite": os.path.relpath(os.path.abspath(suite_path), ROOT), "reference": reference,
        "specialist_source": specialist_source,
        "budgets": [{"label": lab, "flops": f} for f, lab in budgets], "comparisons": comparisons,
        "models": {name: [{"seed": r["seed"], "train_iters": r["train_iters"], "training_flops": r["training_flops"],
                           "losses": _final(r), "flops_per_token": r["flops_per_token"],
                           "budget_search": r.get("budget_search")} for r in by_model[name]] for name in models},
        "specialists": [{"k": r["trained_k"], "seed": r["seed"], "loss": _final(r)[str(r["trained_k"])],
                         "flops": r["flops_per_token"][str(r["trained_k"])]} for r in specialists],
    })
    return 0


def evaluate_and_keep(spec, suite: str, run, kept: str, env: dict) -> int:
    """Evaluate a trained run again (e.g. with new evaluation settings) and keep its results, with
    the training wall time an earlier kept record of the run measured."""
    import json

    from bench.suite_bench import _suite_cmd
    from mmoe_megatron.evaluation.suite import result_file_name, run_dir

    which = ["--member", run.member.name] + ([] if run.seed is None else ["--seed", str(run.seed)])
    code = _suite_cmd("evaluate", suite, which, env)
    if code != 0:
        print(f"{run.label}: evaluation failed with exit code {code}", file=sys.stderr)
        return code
    with open(os.path.join(ROOT, run_dir(spec, run), "eval", "results.json")) as f:
        record = json.load(f)
    path = os.path.join(kept, result_file_name(run))
    if os.path.isfile(path):
        with open(path) as f:
            record["bench"] = json.load(f).get("bench", {})
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return 0


def search_and_keep(spec, run, kept: str, env: dict) -> int:
    """The two-dimensional budget search (the suite's eval.budgets) on a trained run, added to its
    kept record as `budget_search`."""
    import json
    import subprocess

    from mmoe_megatron.evaluation.suite import result_file_name, run_dir

    out = os.path.join(ROOT, run_dir(spec, run), "budget_search")
    widths = sorted(set(spec.eval.widths) | {1.0})
    cmd = [sys.executable, "-m", "mmoe_megatron.evaluation.budget", "--run", os.path.join(ROOT, run_dir(spec, run)),
           "--widths", ",".join(f"{w:g}" for w in widths), "--ks", ",".join(map(str, spec.eval.budget_ks or spec.eval.ks)),
           "--num-samples", str(spec.eval.budget_samples), "--out", out]
    for flops in spec.eval.budgets:
        cmd += ["--flops-per-token", repr(flops)]
    if spec.eval.data_seed is not None:
        cmd.append(f"--data.seed={spec.eval.data_seed}")
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if code != 0:
        print(f"{run.label}: budget search failed with exit code {code}", file=sys.stderr)
        return code
    with open(os.path.join(out, "budget_grid_search.json")) as f:
        searches = json.load(f)
    path = os.path.join(kept, result_file_name(run))
    with open(path) as f:
        record = json.load(f)
    record["budget_search"] = [s for s in searches["searches"].values()
                               if s["budget_flops_per_token"] in spec.eval.budgets]
    record["budget_search_settings"] = {k: searches[k] for k in ("samples", "allowed_ks", "allowed_widths")}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return 0


def searched(spec, run) -> bool:
    names = spec.eval.budget_members or [m.name for m in spec.members if m.role == "elastic"]
    return bool(spec.eval.budgets) and run.member.name in names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--nproc", type=int, default=2, help="training processes per run")
    p.add_argument("--member", default=None, help="only this member's runs")
    p.add_argument("--seed", type=int, default=None, help="only the runs of this seed")
    p.add_argument("--report-only", action="store_true", help="only assemble the report from the kept results")
    p.add_argument("--search-only", action="store_true",
                   help="only run the budget search (eval.budgets) on runs already trained and kept")
    p.add_argument("--evaluate-only", action="store_true",
                   help="evaluate runs already trained (in the runs directory) and keep their results; no training")
    p.add_argument("--reference", default="k-only", help="the member whose budgets the others are compared at")
    p.add_argument("--specialists", default=os.path.join(RESULTS, "elasticity_ladder_cpu"),
                   help="directory of the specialists' kept results (<member>-s<seed>.json)")
    p.add_argument("--specialist-members", default="k1,k2,k4,k8")
    args = p.parse_args(argv)

    from bench.suite_bench import bench_env, train_and_keep
    from mmoe_megatron.evaluation.suite import load_suite, select

    spec = load_suite(args.suite)
    kept = os.path.join(RESULTS, suite_slug(spec))
    os.makedirs(kept, exist_ok=True)
    if not args.report_only:
        env = bench_env()
        for run in select(spec, args.member, args.seed):
            if args.search_only:
                code = 0
            elif args.evaluate_only:
                code = evaluate_and_keep(spec, args.suite, run, kept, env)
            else:
                code = train_and_keep(spec, args.suite, run, args.nproc, kept, env)
            if code == 0 and searched(spec, run):
                code = search_and_keep(spec, run, kept, env)
            if code != 0:
                return code
    records = kept_records(spec, kept)
    specialists = specialist_records(args.specialists, args.specialist_members.split(","), spec.seeds)
    source = os.path.relpath(args.specialists, ROOT)
    if not specialists:  # the suite's own specialists, trained when those were not available
        specialists = [r for r in records if r["role"] == "specialist"]
        source = f"this suite ({os.path.relpath(kept, ROOT)})"
    return report(spec, [r for r in records if r["role"] != "specialist"], specialists, args.reference,
                  args.suite, source)


if __name__ == "__main__":
    raise SystemExit(main())
