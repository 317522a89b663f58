"""How much a run's loss moves over the end of its training, and what averaging its weights there
gives (checkpoint averaging), on every evaluation domain of a suite.

Two runs that differ only in the order of their sums (1 against 2 ranks) or in their seed end
apart by more on a held-out domain than the method differences a suite asks about. If most of
that is where on its last oscillations a run happens to stop, the uniform average of the weights
over the end of training is a point that runs share more closely. For every run of the chosen
members this evaluates each kept checkpoint from `SINCE` of training on, and the averages over the
windows `WINDOWS`, at the suite's curve_ks on the suite's own samples; the report gives each run's
spread over its last quarter, its final and averaged losses, and for every two runs of one seed how
far apart they end with and without averaging.

    python -m bench.tail_average --suite bench/suites/elasticity_ladder2x_cpu.yaml --root DIR --member M

Runs need their checkpoints kept (checkpoint.save_interval, keep_last); each run's result is kept
in bench/results/tail_average_<suite>/ and the report is assembled from every kept file.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics

from bench.common import RESULTS, kept_runs_parser, run_kept_benchmark, suite_slug

SINCE = 0.5
"""Checkpoints evaluated: those at this fraction of training or later."""

WINDOWS = (("last quarter", 0.75), ("last eighth", 0.875), ("second half", 0.5))
"""Averaged windows: (name, the fraction of training from which the kept checkpoints are averaged)."""

SPREAD = "last quarter"
"""The window whose checkpoints' spread the report gives."""

AGREE = 1e-3
"""The final checkpoint must give the suite's kept losses to this many nats (same samples, same weights)."""


def _window_steps(steps: list[int], iters: int, start: float) -> list[int]:
    return [s for s in steps if s >= round(start * iters)]


def measure_run(spec, run) -> dict:
    from mmoe_megatron.data import build_datasets, resolve_vocab_size
    from mmoe_megatron.evaluation.core import eval_indices, losses_at
    from mmoe_megatron.evaluation.run import causal_mask, load_model, run_config as saved_config
    from mmoe_megatron.evaluation.suite import domains, launches, run_dir, specialist_k
    from mmoe_megatron.training.averaging import average_weights, tail_checkpoints
    from mmoe_megatron.training.checkpoint import load_global_state_dict, load_weights_into
    from mmoe_megatron.training.checkpoint_names import step_of
    from bench.heldout_noise import suite_losses

    out = run_dir(spec, run)
    cfg = saved_config(out, domains(spec)[0][1])
    iters = cfg.train.train_iters
    checkpoints = tail_checkpoints(cfg.checkpoint_dir, since_step=round(SINCE * iters))
    by_step = {step_of(os.path.basename(c)): c for c in checkpoints}
    steps = sorted(by_step)
    if not steps or steps[-1] != iters:
        raise RuntimeError(f"{run.label}: no final checkpoint (step {iters}) in {cfg.checkpoint_dir}")
    windows = {name: _window_steps(steps, iters, start) for name, start in WINDOWS}
    if len(windows[SPREAD]) < 3:
        raise RuntimeError(f"{run.label}: {len(windows[SPREAD])} checkpoints kept in the {SPREAD} of training "
                           f"({steps}); train it with checkpoint.save_interval and keep_last that keep more")
    mask = causal_mask(cfg.data.seq_length, "cpu")
    model = load_model(cfg, checkpoints[0], resolve_vocab_size(cfg))
    data = {}
    for name, overrides in domains(spec):
        dataset = build_datasets(saved_config(out, overrides), train_samples=1, valid_samples=spec.eval.num_samples,
                                 test_samples=0)[1]
        data[name] = (dataset, eval_indices(min(spec.eval.num_samples, len(dataset)), 0, 1))

    def losses() -> dict:
        return {name: {str(k): loss for k, (loss, _) in zip(
                    spec.eval.curve_ks, losses_at(model, dataset, spec.eval.curve_ks, indices,
                                                  cfg.train.micro_batch_size, mask, "cpu"))}
                for name, (dataset, indices) in data.items()}

    per_checkpoint = {}
    for step in steps:
        load_weights_into(model, cfg, load_global_state_dict(by_step[step]))
        per_checkpoint[str(step)] = losses()
        print(f"{run.label} step {step}: " + ", ".join(
            f"{d} k={k} {v:.4f}" for d, by_k in per_checkpoint[str(step)].items() for k, v in by_k.items()), flush=True)
    recorded = suite_losses(os.path.join(out, "eval", "results.json"))
    for d, by_k in per_checkpoint[str(iters)].items():
        for k, loss in by_k.items():
            if abs(loss - recorded[d][k]) > AGREE:
                raise RuntimeError(f"{run.label} {d} k={k}: the final checkpoint gives {loss:.4f}, the suite's kept "
                                   f"result is {recorded[d][k]:.4f}; the samples or weights differ")
    averages = {}
    for name, window in windows.items():
        load_weights_into(model, cfg, average_weights([by_step[s] for s in window]))
        averages[name] = {"steps": window, "losses": losses()}
        print(f"{run.label} average of {name} ({len(window)} checkpoints): " + ", ".join(
            f"{d} k={k} {v:.4f}" for d, by_k in averages[name]["losses"].items() for k, v in by_k.items()),
            flush=True)
    return {"member": run.member.name, "role": run.member.role, "seed": run.seed, "trained_k": specialist_k(run.member),
            "trained_on": machine_of(launches(out)), "train_iters": iters, "checkpoints": per_checkpoint,
            "averages": averages}


def spread(record: dict, domain: str, k: str) -> tuple[float, float]:
    """(mean, sample std) of the losses of the checkpoints in the `SPREAD` window."""
    values = [record["checkpoints"][str(s)][domain][k] for s in record["averages"][SPREAD]["steps"]]
    return statistics.fmean(values), statistics.stdev(values)


def final(record: dict) -> dict:
    return record["checkpoints"][str(record["train_iters"])]


def gaps(a: dict, b: dict, domain: str, k: str, names: list[str]) -> dict:
    """Run `a` minus run `b` at their final checkpoints ("final") and with each window averaged."""
    return {"final": final(a)[domain][k] - final(b)[domain][k],
            **{n: a["averages"][n]["losses"][domain][k] - b["averages"][n]["losses"][domain][k] for n in names}}


def report(spec, records: list[dict]) -> tuple[str, dict]:
    ks = [str(k) for k in spec.eval.curve_ks]
    order = {m.name: i for i, m in enumerate(spec.members)}
    records = sorted(records, key=lambda r: (order.get(r["member"], len(order)), r["seed"] or 0))
    names = [name for name, _ in WINDOWS]
    domains = list(final(records[0]))
    lines = [f"Each run's loss at its final checkpoint, the mean ± std of its checkpoints in the {SPREAD} of "
             "training (how far it moves there), and the loss of its weights averaged uniformly over the kept "
             f"checkpoints of each window ({', '.join(names)} of training):", "",
             "| model | seed | domain | k | final | " + f"{SPREAD} checkpoints | " +
             " | ".join(f"avg {n}" for n in names) + " |", "|---|---:|---|---:|---:|---:|" + "---:|" * len(names)]
    for r in records:
        for d in domains:
            for k in ks:
                mean, std = spread(r, d, k)
                lines.append(f"| {r['member']} | {r['seed']} | {d} | {k} | {final(r)[d][k]:.4f} | "
                             f"{mean:.4f} ± {std:.4f} | " +
                             " | ".join(f"{r['averages'][n]['losses'][d][k]:.4f}" for n in names) + " |")
    lines += ["", "Windows: " + "; ".join(f"{r['member']} s{r['seed']}: " + ", ".join(
        f"{n} {len(r['averages'][n]['steps'])} checkpoints from step {r['averages'][n]['steps'][0]}" for n in names)
        for r in records) + "."]
    pairs = []
    data = {"pairs": []}
    for a, b in itertools.combinations(records, 2):
        if a["seed"] != b["seed"] or a["role"] != b["role"]:
            continue  # elastic against specialist is the tax, below
        for d in domains:
            for k in ks:
                gap = gaps(a, b, d, k, names)
                pairs.append(f"| {a['member']} - {b['member']} | {a['seed']} | {d} | {k} | " +
                             " | ".join(f"{g:+.4f}" for g in gap.values()) + " |")
                data["pairs"].append({"a": a["member"], "b": b["member"], "seed": a["seed"], "domain": d, "k": k,
                                      **gap})
    if pairs:
        lines += ["", "Two runs of one seed and role, first minus second: at their final checkpoints and with each window "
                  "averaged:", "", "| runs | seed | domain | k | final | " +
                  " | ".join(f"avg {n}" for n in names) + " |", "|---|---:|---|---:|---:|" + "---:|" * len(names)]
        lines += pairs
    taxes = tax_rows(spec, records, domains, names)
    data["taxes"] = taxes
    spans = repeat_spans(spec, records, domains, names)
    data["repeat_spans"] = spans
    if taxes:
        lines += ["", "Tax of each elastic member against its specialists at the specialist's k (elastic minus "
                  "specialist, paired by seed), at the final checkpoints and with both runs averaged over each "
                  "window:", "", "| model | specialist | seed | domain | k | final | " +
                  " | ".join(f"avg {n}" for n in names) + " |", "|---|---|---:|---|---:|---:|" + "---:|" * len(names)]
        lines += [f"| {t['elastic']} | {t['specialist']} | {t['seed']} | {t['domain']} | {t['k']} | {t['final']:+.4f} | "
                  + " | ".join(f"{t[n]:+.4f}" for n in names) + " |" for t in taxes]
    if spans:
        lines += ["", "The tax over every pairing of repeat runs (one seed, one machine, the same training but for the "
                  "checkpoints kept; e.g. 1 and 2 ranks): the number of pairings, and how far their taxes spread "
                  "(max - min) at the final checkpoints and with both runs averaged over each window:", "",
                  "| model | seed | machine | domain | k | pairings | final | " +
                  " | ".join(f"avg {n}" for n in names) + " |", "|---|---:|---|---|---:|---:|---:|" + "---:|" * len(names)]
        lines += [f"| {' / '.join(t['elastic'])} | {t['seed']} | {t['machine']} | {t['domain']} | {t['k']} | "
                  f"{t['pairings']} | " + " | ".join(f"{t[n]['span']:.4f}" for n in ["final", *names]) + " |"
                  for t in spans]
    return "\n".join(lines), data


def tax_rows(spec, records: list[dict], domains: list[str], names: list[str]) -> list[dict]:
    """Elastic minus specialist at the specialist's k, per seed and domain: final and per window."""
    from mmoe_megatron.evaluation.suite import specialists_of

    by_run = {(r["member"], r["seed"]): r for r in records}
    members = {m.name: m for m in spec.members}
    rows = []
    for r in records:
        if r["role"] != "elastic" or r["member"] not in members:
            continue
        for specialist, k in specialists_of(spec.members, members[r["member"]]).items():
            s = by_run.get((specialist, r["seed"]))
            if s is None or str(k) not in final(r)[domains[0]]:
                continue
            rows += [{"elastic": r["member"], "specialist": specialist, "seed": r["seed"], "domain": d, "k": str(k),
                      **gaps(r, s, d, str(k), names)} for d in domains]
    return rows


def trained_on(spec, record: dict) -> str:
    """The machine a run trained on: the record's own, else its launches in the suite's kept result."""
    if record.get("trained_on"):
        return record["trained_on"]
    path = os.path.join(RESULTS, suite_slug(spec), f"{record['member']}-s{record['seed']}.json")
    try:
        with open(path) as f:
            launches = json.load(f).get("launches") or []
    except OSError:
        return "unknown"
    return machine_of(launches)


def machine_of(launches: list[dict]) -> str:
    """One name for the machines of a run's launches ("unknown" if none is recorded)."""
    from mmoe_megatron.evaluation.compare import machine_label

    return " + ".join(sorted({machine_label(launch) for launch in launches})) or "unknown"


def _training_key(member) -> tuple:
    """What a member trains, the checkpoints it keeps aside: repeats of one training share it."""
    overrides = {k: v for k, v in member.overrides.items() if not k.startswith("checkpoint.")}
    return repr(sorted(overrides.items())), getattr(member, "equal_compute_to", None)


def repeat_spans(spec, records: list[dict], domains: list[str], names: list[str]) -> list[dict]:
    """For every group of repeat elastic runs (one seed, one machine, one training), the tax of each of
    them against each run of their specialists at k (the same seed and machine): min, max and span of
    those taxes, final and per window. Groups with a single pairing are left out."""
    from mmoe_megatron.evaluation.suite import specialists_of

    members = {m.name: m for m in spec.members}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["role"] == "elastic" and r["member"] in members:
            key = (r["seed"], trained_on(spec, r), _training_key(members[r["member"]]))
            groups.setdefault(key, []).append(r)
    rows = []
    for (seed, machine, _), elastic in groups.items():
        by_k: dict[int, list[str]] = {}
        for e in elastic:
            for specialist, k in specialists_of(spec.members, members[e["member"]]).items():
                by_k.setdefault(k, [])
                if specialist not in by_k[k]:
                    by_k[k].append(specialist)
        for k, specialists in sorted(by_k.items()):
            runs = [r for r in records if r["member"] in specialists and r["seed"] == seed
                    and trained_on(spec, r) == machine]
            pairings = [(e, s) for e in elastic for s in runs if str(k) in final(e)[domains[0]]]
            if len(pairings) < 2:
                continue
            for d in domains:
                taxes = [gaps(e, s, d, str(k), names) for e, s in pairings]
                rows.append({"elastic": [e["member"] for e in elastic], "specialists": [s["member"] for s in runs],
                             "seed": seed, "machine": machine, "domain": d, "k": str(k), "pairings": len(pairings),
                             **{n: {"min": min(t[n] for t in taxes), "max": max(t[n] for t in taxes),
                                    "span": max(t[n] for t in taxes) - min(t[n] for t in taxes)}
                                for n in ["final", *names]}})
    return rows


def main(argv=None) -> int:
    args = kept_runs_parser(__doc__).parse_args(argv)
    return run_kept_benchmark(args, "tail_average", "Loss over the end of training and averaged weights",
                              measure_run, report)


if __name__ == "__main__":
    raise SystemExit(main())
