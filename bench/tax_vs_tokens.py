"""The elasticity tax against training tokens, over the rungs of the ladder.

Each suite of the ladder (a rung) evaluates its runs at fractions of their training, so one rung
gives the tax's learning curve under its own learning-rate schedule, and a longer rung says how it
goes on with more tokens. For one elastic member and the specialists at the chosen ks, this lists
per rung and checkpoint the tokens trained on, both losses and the tax (elastic minus specialist at
the specialist's k), per seed and averaged over the seeds every rung has (paired: the same seeds on
every rung), on every evaluated domain. It reads the results the suites kept in bench/results/; it
trains and evaluates nothing.

    python -m bench.tax_vs_tokens --suite bench/suites/elasticity_ladder_cpu.yaml \
        --suite bench/suites/elasticity_ladder_repeat_cpu.yaml \
        --suite bench/suites/elasticity_ladder2x_cpu.yaml --elastic temperature_widths --k 4 --k 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Optional

from bench.common import RESULTS, ROOT, kept_records, suite_slug, write_result

NAME = "tax_vs_tokens"


def rung(suite_path: str, elastic: str, ks: list[int], results_dir: str = RESULTS) -> dict:
    """The losses of one suite's elastic member and of its specialists at `ks`, per checkpoint
    fraction, domain, k and seed, with the tokens each run had trained on (from the runs' results
    kept in `results_dir`/<suite name>/)."""
    from mmoe_megatron.evaluation.compare import fraction_steps
    from mmoe_megatron.evaluation.suite import load_suite, member_config, specialists_of

    spec = load_suite(suite_path)
    members = {m.name: m for m in spec.members}
    if elastic not in members:
        raise ValueError(f"{spec.name} has no member {elastic!r}; members: {sorted(members)}")
    specialists = {k: name for name, k in specialists_of(spec.members, members[elastic]).items()}
    missing = [k for k in ks if k not in specialists]
    if missing:
        raise ValueError(f"{spec.name} has no specialist at k = {missing} (its specialists: "
                         f"{sorted(specialists)}); choose --k among the ks every rung has")
    records = kept_records(spec, os.path.join(results_dir, suite_slug(spec)))
    by_run = {(r["member"], r["seed"]): r for r in records}

    rates = {}  # member -> epochs per token: its training documents do not depend on the seed

    def curve(member: str, seed):
        record = by_run[(member, seed)]
        cfg = member_config(spec, members[member], seed)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        steps = fraction_steps(record, spec.eval.fractions)  # fraction label -> step
        if member not in rates:
            rates[member] = epochs_per_token(cfg)
        return {f: (int(steps[f"{f:g}"]) * tokens_per_step, record["losses"].get(steps[f"{f:g}"]))
                for f in spec.eval.fractions}, rates[member]

    # A rung may not have run every specialist: its rows are those of the ks it has.
    ran = [k for k in ks if any(m == specialists[k] for (m, _) in by_run)]
    seeds = sorted(s for (m, s) in by_run if m == elastic
                   and all((specialists[k], s) in by_run for k in ran))
    out = {"suite": spec.name, "path": os.path.relpath(os.path.abspath(suite_path), ROOT), "seeds": seeds,
           "ks": ran, "fractions": list(spec.eval.fractions), "points": []}
    for seed in seeds:
        mine, e_rate = curve(elastic, seed)
        for k in ran:
            theirs, s_rate = curve(specialists[k], seed)
            for f in spec.eval.fractions:
                (e_tokens, e_losses), (s_tokens, s_losses) = mine[f], theirs[f]
                if e_losses is None or s_losses is None:
                    continue
                for domain in s_losses:
                    out["points"].append({
                        "fraction": f, "seed": seed, "k": k, "domain": domain,
                        "elastic_tokens": e_tokens, "specialist_tokens": s_tokens,
                        "elastic_epochs": e_rate and e_tokens * e_rate,
                        "specialist_epochs": s_rate and s_tokens * s_rate,
                        "elastic": e_losses[domain][str(k)], "specialist": s_losses[domain][str(k)]})
    return out


def epochs_per_token(cfg) -> Optional[float]:
    """Passes over the training data per token trained on: over the dataset of data.blend that its
    weight repeats most, the weight over the tokens of its train split. None where the datasets are
    not on this machine (the report then shows no epochs)."""
    from mmoe_megatron.data.datasets import train_split_tokens
    from mmoe_megatron.data.errors import DataError

    try:
        splits = train_split_tokens(cfg)
    except DataError:
        return None
    return max(weight / tokens for _, weight, tokens in splits)


def report(rungs: list[dict], elastic: str, ks: list[int]) -> tuple[str, dict]:
    shared = sorted(set.intersection(*(set(r["seeds"]) for r in rungs)))
    if not shared:
        raise ValueError("the rungs share no seed with the elastic member and every specialist evaluated; "
                         + "; ".join(f"{r['suite']}: seeds {r['seeds']}" for r in rungs))
    lines = [f"Tax of `{elastic}` against the specialist at the same k (elastic minus specialist, nats), at "
             "the checkpoints each rung evaluates, with the tokens each model had trained on at that point "
             "(millions; the elastic member's steps give the reference elastic model's compute, so it may see "
             "more tokens than the specialist). Paired by seed; the mean is over the seeds every rung has "
             f"({', '.join(map(str, shared))}); a rung's other seeds are shown in its own column.", "",
             "| rung | fraction | tokens (M): specialist / elastic | epochs: specialist / elastic | domain | k | "
             "elastic | specialist | tax, seeds every rung has (mean) | tax, every seed of the rung: mean ± std (n) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    summary = []
    for r in rungs:
        groups: dict[tuple, list[dict]] = {}
        for p in r["points"]:
            groups.setdefault((p["domain"], p["k"], p["fraction"]), []).append(p)
        for (domain, k, f), points in sorted(groups.items(), key=lambda kv: (kv[0][0] != "valid", kv[0])):
            paired = [p for p in points if p["seed"] in shared]
            tax_all = [p["elastic"] - p["specialist"] for p in points]
            tax = [p["elastic"] - p["specialist"] for p in paired]
            spread = (f"{statistics.fmean(tax_all):+.4f} ± {statistics.stdev(tax_all):.4f} ({len(tax_all)})"
                      if len(tax_all) > 1 else f"{tax_all[0]:+.4f} (1)")
            # A shared seed's run may lack a checkpoint: the row then shows only the rung's own seeds.
            cells = (f"{statistics.fmean(p['elastic'] for p in paired):.4f} | "
                     f"{statistics.fmean(p['specialist'] for p in paired):.4f} | "
                     f"{', '.join(f'{t:+.4f}' for t in tax)} ({statistics.fmean(tax):+.4f})") if paired else "- | - | -"
            epochs = " / ".join("-" if points[0][f"{who}_epochs"] is None else f"{points[0][f'{who}_epochs']:.2f}"
                                for who in ("specialist", "elastic"))
            lines.append(f"| {r['suite']} | {f:g} | {points[0]['specialist_tokens'] / 1e6:.2f} / "
                         f"{points[0]['elastic_tokens'] / 1e6:.2f} | {epochs} | {domain} | {k} | {cells} | {spread} |")
            if f == 1 and paired:
                summary.append({"suite": r["suite"], "domain": domain, "k": k,
                                "tokens": points[0]["specialist_tokens"], "epochs": points[0]["specialist_epochs"],
                                "tax_shared_seeds": statistics.fmean(tax),
                                "tax_all_seeds": statistics.fmean(tax_all), "n": len(tax_all)})
    lacking = "".join(f"The rung {r['suite']} has no run of the specialist at k = "
                      f"{', '.join(str(k) for k in ks if k not in r['ks'])}. " for r in rungs if r["ks"] != ks)
    lines += ["", "Epochs are passes over the training documents (a rung may train on part of them: "
              "data.train_fraction); - where its data is not on this machine. " + lacking
              + "At the end of each rung, on the "
              "seeds every rung has: " + "; ".join(
                  f"{s['suite']} ({s['tokens'] / 1e6:.1f} M tokens"
                  + ("" if s["epochs"] is None else f", {s['epochs']:.1f} epochs")
                  + f") {s['domain']} k = {s['k']}: {s['tax_shared_seeds']:+.4f}" for s in summary) + "."]
    return "\n".join(lines), {"elastic": elastic, "ks": ks, "shared_seeds": shared, "rungs": rungs,
                              "end_of_training": summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--suite", action="append", required=True, help="a rung's suite file (repeatable, shortest first)")
    p.add_argument("--elastic", required=True, help="the elastic member, by name, in every suite")
    p.add_argument("--k", type=int, action="append", required=True,
                   help="a k with a specialist in every suite (repeatable)")
    args = p.parse_args(argv)
    try:
        rungs = [rung(path, args.elastic, args.k) for path in args.suite]
        markdown, data = report(rungs, args.elastic, args.k)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    write_result(NAME, "The elasticity tax against training tokens, over the ladder's rungs", markdown, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
