"""Which of a run's sources of randomness makes a member's results spread from seed to seed.

A run's seed (train.seed) sets three things: the initial weights, the k draws and the data order.
A suite can hold, beside a member, variants of it that fix all but one of them at one seed's
values (model.init_seed, matryoshka.seed, data.seed) and so vary one source across the seeds.
This reads the suite's kept results and gives, for each domain and k at the end of training:

- the seed std of the member (every source varies) and of each one-source variant;
- each one-source std as a share of the member's;
- the std the one-source variances add up to (sqrt of their sum), against the member's: about
  equal if the sources add, larger if each source alone moves the run as far as all of them (the
  run is sensitive to any change), smaller if they only move it together.

    python -m bench.seed_sources --suite bench/suites/elasticity_ladder2x_broad_cpu.yaml --member temperature_shrink_k8compute

The variants are found from the suite: members whose overrides are the member's plus some of the
three seed settings; each is named by the one source it leaves to vary. Nothing is evaluated: the
numbers are the suite's kept results (bench/results/<suite>/, after `bench.suite_bench`).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

from bench.common import RESULTS, ROOT, kept_records, suite_slug, write_result

SOURCES = {"init": "model.init_seed", "draws": "matryoshka.seed", "data": "data.seed"}
"""Each source of a run's randomness and the setting that fixes it (null: train.seed)."""


def one_source_variants(spec, member: str) -> dict[str, str]:
    """{source: name of the member of `spec` that varies only that source across seeds}, for
    variants of `member` (its overrides plus the settings that fix the other sources)."""
    from mmoe_megatron.evaluation.suite import is_second_name

    members = {m.name: m for m in spec.members}
    if member not in members:
        raise ValueError(f"no member {member!r} in suite {spec.name}; members: {list(members)}")
    base = members[member].overrides
    if any(key in base for key in SOURCES.values()):
        raise ValueError(f"{member} fixes {[k for k in SOURCES.values() if k in base]}: choose the member "
                         "whose every source varies with the seed")
    out: dict[str, str] = {}
    for m in spec.members:
        rest = {k: v for k, v in m.overrides.items() if k not in SOURCES.values()}
        if m.name == member or rest != base or is_second_name(m, spec.members):
            continue
        varied = [source for source, key in SOURCES.items() if key not in m.overrides]
        if len(varied) == 1:
            if varied[0] in out:
                raise ValueError(f"{out[varied[0]]} and {m.name} both vary only the {varied[0]}")
            out[varied[0]] = m.name
    if not out:
        raise ValueError(f"suite {spec.name} has no variant of {member} that fixes all but one of "
                         f"{list(SOURCES.values())}")
    return out


def final_losses(record: dict) -> dict:
    """{domain: {k: loss}} at the end of the run's training."""
    return record["losses"][max(record["losses"], key=int)]


def _with_share(std: float, of: float) -> str:
    return f"{std:.4f} ({std / of:.2f})" if of > 0 else f"{std:.4f}"


def report(spec, records: list[dict], member: str) -> tuple[str, dict]:
    variants = one_source_variants(spec, member)
    names = {member: "all", **{name: source for source, name in variants.items()}}
    by_member: dict[str, dict[int, dict]] = {name: {} for name in names}
    for r in records:
        if r["member"] in by_member:
            by_member[r["member"]][r["seed"]] = final_losses(r)
    short = [name for name, runs in by_member.items() if len(runs) < 2]
    if short:
        raise ValueError(f"{short} have fewer than 2 kept runs: no seed std yet")
    first = by_member[member][min(by_member[member])]
    domains = list(first)
    ks = [k for k in map(str, spec.eval.curve_ks)
          if all(k in losses[d] for runs in by_member.values() for losses in runs.values() for d in domains)]
    order = [s for s in SOURCES if s in variants]
    lines = [f"Seed std at the end of training of {member} (all: initial weights, k draws and data order vary with "
             "the seed) and of its variants that vary one of them (the others fixed at seed 1's); in brackets "
             "the share of all's std. sum: the std the one-source variances add up to.", "",
             "| domain | k | all | " + " | ".join(order) + " | sum | seeds |",
             "|---|---:|---:|" + "---:|" * len(order) + "---:|---|"]
    data: dict = {"member": member, "variants": variants, "std": {}}
    seeds = "; ".join(f"{names[n]} {','.join(map(str, sorted(runs)))}" for n, runs in by_member.items())
    for d in domains:
        for k in ks:
            std = {names[name]: statistics.stdev(losses[d][k] for losses in runs.values())
                   for name, runs in by_member.items()}
            total = math.sqrt(sum(std[s] ** 2 for s in order))
            data["std"].setdefault(d, {})[k] = {**std, "sum": total}
            cells = [_with_share(std[s], std["all"]) for s in order]
            lines.append(f"| {d} | {k} | {std['all']:.4f} | " + " | ".join(cells) +
                         f" | {_with_share(total, std['all'])} | {seeds} |")
    return "\n".join(lines) + "\n", data


def main(argv=None) -> int:
    from mmoe_megatron.evaluation.suite import load_suite

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True)
    p.add_argument("--member", required=True, help="the member whose every source varies with the seed")
    args = p.parse_args(argv)
    spec = load_suite(args.suite)
    slug = suite_slug(spec)
    records = kept_records(spec, os.path.join(RESULTS, slug))
    try:
        markdown, data = report(spec, records, args.member)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    write_result(f"seed_sources_{slug}", f"Where the seed spread comes from: {spec.name}", markdown,
                 {**data, "suite": os.path.relpath(os.path.abspath(args.suite), ROOT)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
