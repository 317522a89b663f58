"""The suite's comparison report, assembled from every run's eval/results.json.

Rows are models, columns ks. With several seeds each cell is the mean over seeds with the
standard deviation across seeds (sample std) beside it, so a difference can be read against the
noise. For every elastic model, the tax against the specialists: elastic loss minus the
specialist's at the specialist's k, paired by seed (same tokens, same order, same initial-weight
seed), its mean and std over seeds, the same as a fraction of the specialists' gain from k_min to
k, and whether the elastic curve is non-increasing over its trained ks (else its largest rise); at
the end of training and at every evaluated fraction of it (the learning curve of the tax), on the
validation split and on each held-out domain. Then, per elastic model and domain, whether it
matches its specialists within RESOLUTION nats, and if not, what stands in the way. Training
compute is 3 x forward FLOPs at the expected k x tokens (plus the teacher forwards of
self-distillation). Models evaluated on the (k, width) grid of slimmable
experts: the tables show the full-width ks, and every model's quality-vs-FLOPs frontier over all
its points (`frontier.py`) is listed and plotted.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from typing import Optional

from mmoe_megatron.evaluation.core import EvalPoint, parse_spec, split_spec
from mmoe_megatron.evaluation.frontier import frontier


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def fraction_steps(record: dict, fractions: list[float]) -> dict[str, str]:
    """fraction label -> step (as the string key of record["losses"])."""
    iters = record["train_iters"]
    return {f"{f:g}": str(max(1, round(f * iters))) for f in fractions}


def _is_uniform(label: str) -> bool:
    return not label.startswith("[") and "@" not in label


def _stats_or_none(values: list) -> dict:
    present = [v for v in values if v is not None]
    return _stats(present) if present else {"mean": None, "std": None, "n": 0}


def comparison(spec, records: Optional[list[dict]] = None) -> dict:
    """Everything the report shows, as plain data."""
    from mmoe_megatron.evaluation.suite import VALID, load_results, specialists_of

    records = load_results(spec) if records is None else records
    if not records:
        raise FileNotFoundError(f"no run of suite {spec.name} is evaluated yet: run `suite evaluate` first")
    fractions = sorted(spec.eval.fractions)
    final = f"{fractions[-1]:g}"
    by_member: dict[str, list[dict]] = {}
    for r in records:
        by_member.setdefault(r["member"], []).append(r)
    members = [m for m in spec.members if m.name in by_member]
    domain_names = [VALID] + [h.name for h in spec.eval.heldout]
    columns: list[str] = []
    for r in records:  # in order of first appearance; a run evaluated on fewer points leaves gaps
        for c in r["losses"][fraction_steps(r, fractions)[final]][VALID]:
            if c not in columns:
                columns.append(c)

    def losses(record, fraction, domain) -> dict[str, float]:
        return record["losses"][fraction_steps(record, fractions)[fraction]][domain]

    tables = {}
    for domain in domain_names:
        rows = []
        for m in members:
            recs = by_member[m.name]
            cells = {c: _stats_or_none([losses(r, final, domain).get(c) for r in recs]) for c in columns}
            uniform = [cells[c]["mean"] for c in columns if _is_uniform(c) and cells[c]["mean"] is not None]
            rows.append({"name": m.name, "role": m.role, "trained_k": recs[0]["trained_k"],
                         "training_flops": recs[0]["training_flops"], "seeds": sorted(
                             (r["seed"] for r in recs if r["seed"] is not None)),
                         "loss": {c: cells[c]["mean"] for c in columns},
                         "std": {c: cells[c]["std"] for c in columns},
                         "mean_loss_uniform_k": statistics.fmean(uniform) if uniform else None})
        tables[domain] = rows

    tax, resolution = {}, {}
    for m in (m for m in members if m.role == "elastic"):
        # Its specialists (those it names, else the unnamed ones) among the members with results.
        specialists = specialists_of(spec.members, m)
        specialists = {name: k for name, k in specialists.items() if name in by_member}
        k_min_member = min(specialists, key=specialists.get) if specialists else None
        elastic = {r["seed"]: r for r in by_member[m.name]}
        trained_ks = by_member[m.name][0].get("trained_ks") or []
        tax[m.name] = {}
        for domain in domain_names:
            tax[m.name][domain] = {}
            for fraction in fractions:
                f = f"{fraction:g}"
                per_k = {}
                for name, k in sorted(specialists.items(), key=lambda item: item[1]):
                    spec_recs = {r["seed"]: r for r in by_member[name]}
                    seeds = sorted(set(elastic) & set(spec_recs), key=lambda s: (s is None, s))
                    label = str(k)
                    if not seeds or label not in losses(elastic[seeds[0]], f, domain):
                        continue
                    gaps = [losses(elastic[s], f, domain)[label] - losses(spec_recs[s], f, domain)[label]
                            for s in seeds]
                    entry = _stats(gaps)
                    if k_min_member is not None and name != k_min_member:
                        base = {r["seed"]: r for r in by_member[k_min_member]}
                        k0 = str(specialists[k_min_member])
                        gains = [losses(base[s], f, domain)[k0] - losses(spec_recs[s], f, domain)[label]
                                 for s in seeds if s in base]
                        if gains:
                            gain = statistics.fmean(gains)
                            entry["specialist_gain"] = gain
                            entry["fraction_of_gain"] = entry["mean"] / gain if gain > 0 else None
                    per_k[label] = entry
                curve_ks = [k for k in trained_ks if str(k) in losses(next(iter(elastic.values())), f, domain)]
                curve = [statistics.fmean(losses(r, f, domain)[str(k)] for r in elastic.values()) for k in curve_ks]
                steps = [(b - a, ka, kb) for a, b, ka, kb in zip(curve, curve[1:], curve_ks, curve_ks[1:])]
                rise = max(steps, default=None)
                tax[m.name][domain][f] = {
                    "by_k": per_k, "elastic_loss_over_trained_ks": curve,
                    "monotone": all(d <= 0 for d, _, _ in steps) if steps else None,
                    "largest_rise": ({"rise": rise[0], "from_k": rise[1], "to_k": rise[2]}
                                     if rise is not None and rise[0] > 0 else None),
                }
        resolution[m.name] = {d: _resolution(m.name, specialists, trained_ks, tables[d], tax[m.name][d][final])
                              for d in domain_names}

    variants = _variants(members, by_member, domain_names, final, losses)
    stds = {d: [(s, row["name"], c) for row in tables[d] for c, s in row["std"].items() if s is not None]
            for d in domain_names}
    spread = {d: (max(v) if v else None) for d, v in stds.items()}
    primary = next((m.name for m in members if m.role == "elastic"), None)
    gaps = {}
    if primary is not None:
        gaps = {k: v["mean"] for k, v in tax[primary][VALID][final]["by_k"].items()}
    provenance = Counter((launch.get("code_version"), machine_label(launch)) for r in records
                         if "same_run_as" not in r for launch in r.get("launches", [])[:1])
    flops = {r["member"]: r["flops_per_token"] for r in records}
    frontiers = {d: {row["name"]: [{"label": label, "flops": f, "loss": loss} for f, loss, label in frontier(
        [(flops[row["name"]][c], row["loss"][c], c) for c in columns
         if row["loss"][c] is not None and c in flops[row["name"]]])] for row in tables[d]} for d in domain_names}
    return {"suite": spec.name, "columns": columns, "domains": domain_names, "fractions": fractions,
            "rows": tables[VALID], "tables": tables, "tax": tax, "resolution": resolution,
            "elastic_gap_to_specialist": gaps,
            "frontiers": frontiers,
            "largest_seed_std": {d: (None if s is None else {"std": s[0], "member": s[1], "k": s[2]})
                                 for d, s in spread.items()},
            "seeds": list(spec.seeds), "runs": len(records), "variants": variants,
            "temperatures": _per_k_values(members, by_member, "learned_temperatures"),
            "gains": _per_k_values(members, by_member, "learned_gains"),
            "provenance": [{"code_version": v, "cpu": c, "runs": n} for (v, c), n in provenance.items()]}


def machine_label(launch: dict) -> Optional[str]:
    """A launch's GPU where it ran on one, else its CPU, with the instruction set torch ran on and
    the CPU's family, model and stepping where they were recorded."""
    if launch.get("gpu"):
        return f"{launch['gpu']} (GPU)"
    details = [d for d in (launch.get("cpu_capability"), launch.get("cpu_id")) if d]
    return f"{launch.get('cpu')} ({', '.join(details)})" if details else launch.get("cpu")


def _per_k_values(members, by_member, key: str) -> dict:
    """member -> k -> mean over seeds of the layers' mean learned value per k (`key`: the records'
    learned_temperatures or learned_gains), its std over seeds, and the lowest and highest layer
    over seeds (members that learned them only)."""
    out = {}
    for m in members:
        runs = [r[key] for r in by_member[m.name] if r.get(key)]
        if runs:
            out[m.name] = {k: {**_stats([statistics.fmean(t[k]) for t in runs]), "seeds": len(runs),
                               "lowest": min(min(t[k]) for t in runs), "highest": max(max(t[k]) for t in runs)}
                           for k in runs[0]}
    return out


# A variant replaces the default only when it wins on at least this many seeds, every one of them.
SEEDS_TO_DECIDE = 3

RESOLUTION = 0.01
"""Nats. An elastic model matches its specialists on a domain when, at every k it trains, its mean
tax is at most this, its seed std and that of the specialist at that k are below it (over at
least SEEDS_TO_DECIDE seeds), and its loss does not rise with k."""


def _resolution(name: str, specialists: dict[str, int], trained_ks: list[int], rows: list[dict],
                final_tax: dict) -> dict:
    """What keeps an elastic model from matching its specialists within RESOLUTION on one domain
    at the end of training (see RESOLUTION): the trained ks without a specialist, those whose mean
    tax is above it, the (model, k) whose seed std is not below it or rests on too few seeds, and
    the largest rise of its loss with k. `met` when none of these is."""
    row = {r["name"]: r for r in rows}
    by_k = final_tax["by_k"]
    at_k = {k: n for n, k in specialists.items()}
    unmeasured = [k for k in trained_ks if str(k) not in by_k]
    over = {str(k): by_k[str(k)]["mean"] for k in trained_ks
            if str(k) in by_k and by_k[str(k)]["mean"] > RESOLUTION}
    spread = []
    for model, k in [(name, k) for k in trained_ks] + [(at_k[k], k) for k in trained_ks if k in at_k]:
        r = row.get(model)
        std = None if r is None else r["std"].get(str(k))
        seeds = 0 if r is None else len(r["seeds"])
        if seeds < SEEDS_TO_DECIDE or std is None or std >= RESOLUTION:
            spread.append({"model": model, "k": k, "std": std, "seeds": seeds})
    rise = final_tax["largest_rise"]
    return {"met": not (unmeasured or over or spread or rise), "unmeasured_ks": unmeasured,
            "tax_over": over, "spread": spread, "rise": rise}


def _variants(members, by_member, domain_names, final, losses) -> dict:
    """Every other elastic model against its reference, paired by seed: the difference of their
    mean loss over the reference's trained uniform ks at the end of training (negative: the
    variant is better), and the difference at each of those ks, per seed and domain. The
    reference is the member a variant names (`variant_of`), else the first elastic model. A
    member that is another under a second name (`suite.is_second_name`) is no variant of its own."""
    from mmoe_megatron.evaluation.suite import Run, is_second_name

    elastic = [m for m in members if m.role == "elastic"]
    if len(elastic) < 2:
        return {}
    by_name = {m.name: m for m in elastic}
    first = elastic[0].name

    def trained(name: str) -> list[str]:
        return [str(k) for k in by_member[name][0].get("trained_ks", [])]

    out = {"reference": first, "ks": trained(first), "by_variant": {}, "against": {}}
    for m in elastic[1:]:
        if is_second_name(m, members):
            continue
        against = getattr(m, "variant_of", None) or first
        if against not in by_name:  # its reference has no evaluated run yet
            continue
        reference = {r["seed"]: r for r in by_member[against]}
        ks = trained(against)
        # A run the variant shares with its reference (suite same_runs_as) is no comparison.
        runs = {r["seed"]: r for r in by_member[m.name]
                if r.get("same_run_as") != Run(by_name[against], r["seed"]).label}
        seeds = sorted(set(runs) & set(reference), key=lambda s: (s is None, s))
        entry = {}
        for domain in domain_names:
            diffs = {str(s): statistics.fmean(losses(runs[s], final, domain)[k] for k in ks)
                     - statistics.fmean(losses(reference[s], final, domain)[k] for k in ks) for s in seeds}
            if diffs:
                better = all(d < 0 for d in diffs.values())
                by_k = {}
                for k in ks:
                    at_k = {str(s): losses(runs[s], final, domain)[k] - losses(reference[s], final, domain)[k]
                            for s in seeds}
                    by_k[k] = {"per_seed": at_k, **_stats(list(at_k.values())),
                               "better_on_every_seed": all(d < 0 for d in at_k.values())}
                entry[domain] = {"per_seed": diffs, **_stats(list(diffs.values())), "better_on_every_seed": better,
                                 "decides": better and len(diffs) >= SEEDS_TO_DECIDE, "by_k": by_k}
        out["by_variant"][m.name] = entry
        out["against"][m.name] = against
    return out


def _signed(entry: dict) -> str:
    return f"{entry['mean']:+.4f}" + ("" if entry["std"] is None else f" ± {entry['std']:.4f}")


def against_reference(v: dict, name: str) -> bool:
    """Whether variant `name` of a comparison's variants is read against the reference (the first
    elastic member) and not against a member it names (`variant_of`); results kept before
    `variant_of` existed hold no "against" and read every variant against the reference."""
    return v.get("against", {}).get(name, v["reference"]) == v["reference"]


def _variant_lines(v: dict, h2: str) -> list[str]:
    """The variants against the first elastic model (mean over its ks), then those that name
    their own reference (`variant_of`), at each k."""
    lines = []
    first = [name for name in v["by_variant"] if against_reference(v, name)]
    if first:
        lines += [f"{h2} Elastic variants against {v['reference']}", "",
                  f"Mean loss over k = {', '.join(v['ks'])} minus {v['reference']}'s, paired by seed "
                  "(negative: the variant is better), at the end of training.", "",
                  "| variant | domain | mean ± std | per seed | better on every seed |", "|---|---|---:|---|---|"]
        for name in first:
            for domain, e in v["by_variant"][name].items():
                std = "" if e["std"] is None else f" ± {e['std']:.4f}"
                seeds = ", ".join(f"{d:+.4f}" for d in e["per_seed"].values())
                verdict = "yes" if e["better_on_every_seed"] else "no"
                if e["better_on_every_seed"] and not e.get("decides"):
                    verdict += f" ({len(e['per_seed'])} of the {SEEDS_TO_DECIDE} seeds needed to decide)"
                lines.append(f"| {name} | {domain} | {e['mean']:+.4f}{std} | {seeds} | {verdict} |")
        lines.append("")
    own = [name for name in v["by_variant"] if name not in first]
    if own:
        ks = sorted({k for name in own for e in v["by_variant"][name].values() for k in e["by_k"]}, key=int)
        lines += [f"{h2} Elastic variants against the member they change", "",
                  "Loss minus that member's at each k, paired by seed (negative: the variant is better), "
                  "at the end of training; in the last column, the ks where it is lower on every seed.", "",
                  "| variant | against | domain | seeds | " + " | ".join(f"k={k}" for k in ks)
                  + " | lower on every seed at |", "|---|---|---|---:|" + "---:|" * len(ks) + "---|"]
        for name in own:
            for domain, e in v["by_variant"][name].items():
                cells = [_signed(e["by_k"][k]) if k in e["by_k"] else "" for k in ks]
                lower = [k for k in ks if k in e["by_k"] and e["by_k"][k]["better_on_every_seed"]]
                lines.append(f"| {name} | {v['against'][name]} | {domain} | {e['n']} | " + " | ".join(cells)
                             + f" | {'k=' + ', '.join(lower) if lower else 'none'} |")
        lines.append("")
    return lines


def _cell(mean: Optional[float], std: Optional[float], bold: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
    return f"**{text}**" if bold else text


def markdown(data: dict, level: int = 2) -> str:
    """The report as Markdown; `level` is the heading level of its tables (sub-headings one deeper)."""
    h1, h2 = "#" * level, "#" * (level + 1)
    # On the (k, width) grid the tables show the full-width points; the frontier section has the rest.
    cols = [c for c in data["columns"] if "@" not in c]
    seeded = bool(data["seeds"])
    lines = []
    for domain in data["domains"]:
        what = "validation loss" if domain == "valid" else f"held-out loss ({domain}, never trained on)"
        lines += [f"{h1} {data['suite']}: {what} of every model at every k", "",
                  "| model | role | trained at | train PFLOP | " + ("seeds | " if seeded else "")
                  + " | ".join(f"k={c}" for c in cols) + " | mean over uniform k |",
                  "|---|---|---|---:|" + ("---:|" if seeded else "") + "---:|" * (len(cols) + 1)]
        for r in data["tables"][domain]:
            trained = "schedule" if r["role"] == "elastic" else (str(r["trained_k"]) if r["trained_k"] else "-")
            flops = f"{r['training_flops'] / 1e15:.3f}" if r["training_flops"] else "-"
            cells = [_cell(r["loss"][c], r["std"][c], r["trained_k"] is not None and c == str(r["trained_k"]))
                     for c in cols]
            mean = "-" if r["mean_loss_uniform_k"] is None else f"{r['mean_loss_uniform_k']:.4f}"
            lines.append(f"| {r['name']} | {r['role']} | {trained} | {flops} | "
                         + (f"{len(r['seeds'])} | " if seeded else "") + " | ".join(cells) + f" | {mean} |")
        lines.append("")
    lines += ["Bold: a specialist at the k it was trained for. "
              + ("Cells: mean ± standard deviation over seeds. " if seeded else ""), ""]
    if len(cols) < len(data["columns"]):
        lines += [f"{h2} Quality-vs-FLOPs frontier of every model (validation)", "",
                  "The points of each model's (k, width) grid that no other of its points beats with at most "
                  "the same forward FLOPs per token (mean loss over seeds).", "",
                  "| model | frontier: point (MFLOP/token): loss |", "|---|---|"]
        for name, points in data.get("frontiers", {}).get("valid", {}).items():
            lines.append(f"| {name} | " + ", ".join(f"{p['label']} ({p['flops'] / 1e6:.3f}): {p['loss']:.4f}"
                                                    for p in points) + " |")
        lines.append("")
    final = f"{data['fractions'][-1]:g}"
    if data["tax"]:
        lines += [f"{h2} Tax of each elastic model", "",
                  "Elastic loss minus the specialist's at the specialist's k (negative: the elastic model "
                  "is better), paired by seed; in brackets, the tax as a share of the specialists' own gain "
                  "from the smallest k to that k. Monotone: the elastic loss does not rise with k over its "
                  "trained ks.", ""]
        ks = sorted({k for t in data["tax"].values() for d in t.values() for k in d[final]["by_k"]}, key=int)
        lines += ["| model | domain | " + " | ".join(f"k={k}" for k in ks) + " | monotone |",
                  "|---|---|" + "---:|" * len(ks) + "---|"]
        for name, per_domain in data["tax"].items():
            for domain, per_f in per_domain.items():
                row = per_f[final]
                cells = [_tax_cell(row["by_k"].get(k)) for k in ks]
                lines.append(f"| {name} | {domain} | " + " | ".join(cells) + f" | {_monotone_cell(row)} |")
        lines.append("")
        if data.get("resolution"):
            lines += _resolution_lines(data["resolution"], h2)
        if len(data["fractions"]) > 1:
            lines += [f"{h2} Learning curve of the tax", "",
                      "The same tax at checkpoints of the same runs (fraction of each run's training; a "
                      "run matched to another's compute reaches each fraction at the same compute).", "",
                      "| model | domain | fraction | " + " | ".join(f"k={k}" for k in ks) + " | monotone |",
                      "|---|---|---:|" + "---:|" * len(ks) + "---|"]
            for name, per_domain in data["tax"].items():
                for domain, per_f in per_domain.items():
                    for f, row in per_f.items():
                        cells = [_tax_cell(row["by_k"].get(k), share=False) for k in ks]
                        lines.append(f"| {name} | {domain} | {f} | " + " | ".join(cells)
                                     + f" | {_monotone_cell(row)} |")
            lines.append("")
    if data.get("variants"):
        lines += _variant_lines(data["variants"], h2)
    for key, title, text in (
            ("temperatures", "Learned gate temperatures",
             "Temperature of the combine weights at each trained k (below 1: sharper than the router's "
             "softmax), mean over MoE layers and seeds; in brackets, the lowest and highest layer. k = 1 "
             "has one weight and no gradient: it stays at 1."),
            ("gains", "Learned gate gains",
             "Gain the combine weights sum to at each trained k (`matryoshka.gate_gain`), mean over MoE "
             "layers and seeds; in brackets, the lowest and highest layer.")):
        if not data.get(key):
            continue
        ks = sorted({k for t in data[key].values() for k in t}, key=int)
        lines += [f"{h2} {title}", "", text, "",
                  "| model | seeds | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---:|" + "---:|" * len(ks)]
        for name, per_k in data[key].items():
            cells = []
            for k in ks:
                e = per_k.get(k)
                std = "" if e is None or e["std"] is None else f" ± {e['std']:.3f}"
                cells.append("-" if e is None else f"{e['mean']:.3f}{std} ({e['lowest']:.2f}-{e['highest']:.2f})")
            lines.append(f"| {name} | {next(iter(per_k.values()))['seeds']} | " + " | ".join(cells) + " |")
        lines.append("")
    if seeded:
        parts = []
        for domain, s in data["largest_seed_std"].items():
            if s is not None:
                parts.append(f"{domain}: {s['std']:.4f} ({s['member']}, k={s['k']})")
        lines += ["Largest seed-to-seed standard deviation of any model at any k: "
                  + ("; ".join(parts) if parts else "none (no model has two seeds)") + ".", ""]
    if len(data["provenance"]) > 1:
        lines += ["Runs of this table were trained with different code versions or CPUs: "
                  + "; ".join(f"{p['runs']} run(s) at {p['code_version']} on {p['cpu']}" for p in data["provenance"])
                  + ".", ""]
    return "\n".join(lines) + "\n"


def _rise_text(rise: dict) -> str:
    return f"+{rise['rise']:.4f}, k={rise['from_k']} to {rise['to_k']}"


def _monotone_cell(row: dict) -> str:
    """yes / no with the largest rise of the elastic loss between two consecutive trained ks / -."""
    rise = row.get("largest_rise")
    if row["monotone"] is False and rise is not None:
        return f"no ({_rise_text(rise)})"
    return {True: "yes", False: "no", None: "-"}[row["monotone"]]


def _resolution_lines(resolution: dict, h2: str) -> list[str]:
    lines = [f"{h2} Does each elastic model match its specialists within {RESOLUTION} nats?", "",
             f"At the end of training, on each domain: yes when at every trained k its mean tax is at most "
             f"{RESOLUTION}, its seed std and that of the specialist at that k are below {RESOLUTION} (over at "
             f"least {SEEDS_TO_DECIDE} seeds), and its loss does not rise with k. Otherwise, what stands in "
             "the way.", "",
             "| model | domain | matches | no specialist at | mean tax above | seed std not below | loss rises |",
             "|---|---|---|---|---|---|---|"]
    for name, per_domain in resolution.items():
        for domain, r in per_domain.items():
            unmeasured = ", ".join(f"k={k}" for k in r["unmeasured_ks"])
            over = ", ".join(f"k={k}: {v:+.4f}" for k, v in r["tax_over"].items())
            spread = "; ".join(_spread_text(name, r["spread"]))
            rises = "" if r["rise"] is None else _rise_text(r["rise"])
            lines.append(f"| {name} | {domain} | {'yes' if r['met'] else 'no'} | {unmeasured} | {over} | "
                         f"{spread} | {rises} |")
    return lines + [""]


def _spread_text(name: str, spread: list[dict]) -> list[str]:
    """The models whose seed std stands in the way, each once: "itself" for the elastic model, with
    its ks, the largest std among them and, where too few, how many seeds."""
    out = []
    for model in dict.fromkeys(s["model"] for s in spread):
        entries = [s for s in spread if s["model"] == model]
        stds = [s["std"] for s in entries if s["std"] is not None]
        text = ("itself" if model == name else model) + " at k=" + ", ".join(str(s["k"]) for s in entries)
        if stds:
            text += f" (up to {max(stds):.4f})" if len(entries) > 1 else f" ({stds[0]:.4f})"
        if entries[0]["seeds"] < SEEDS_TO_DECIDE:
            text += f", {entries[0]['seeds']} seed(s)"
        out.append(text)
    return out


def _tax_cell(entry: Optional[dict], share: bool = True) -> str:
    if entry is None:
        return ""
    text = f"{entry['mean']:+.4f}" + ("" if entry["std"] is None else f" ± {entry['std']:.4f}")
    if share and entry.get("fraction_of_gain") is not None:
        text += f" ({entry['fraction_of_gain']:.0%})"
    return text


def series(data: dict, records: list[dict], domain: str) -> dict[str, list[EvalPoint]]:
    """Mean loss per model at every k as EvalPoints (for the plots)."""
    flops = {r["member"]: r["flops_per_token"] for r in records}
    params = {r["member"]: r["active_params"] for r in records}
    out = {}
    for row in data["tables"][domain]:
        out[row["name"]] = [EvalPoint(k=split_spec(parse_spec(c))[0], width=split_spec(parse_spec(c))[1],
                                      loss=row["loss"][c], tokens=0, active_params=params[row["name"]][c],
                                      flops_per_token=flops[row["name"]][c])
                            for c in data["columns"] if row["loss"][c] is not None and c in flops[row["name"]]]
    return out


def write_comparison(spec, records: Optional[list[dict]] = None, out: Optional[str] = None) -> dict[str, str]:
    from mmoe_megatron.evaluation.report import plot, plot_frontier
    from mmoe_megatron.evaluation.suite import load_results

    records = load_results(spec) if records is None else records
    data = comparison(spec, records)
    out = out or os.path.join(spec.runs_dir, spec.name, "report")
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "comparison.json"), "md": os.path.join(out, "comparison.md"),
             "png": os.path.join(out, "comparison.png")}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(markdown(data))
    plot(series(data, records, "valid"), paths["png"], title=f"{spec.name}: validation loss by k")
    if len(data["columns"]) > len([c for c in data["columns"] if "@" not in c]):
        paths["png_frontier"] = os.path.join(out, "comparison_frontier.png")
        plot_frontier(series(data, records, "valid"), paths["png_frontier"],
                      title=f"{spec.name}: validation loss vs forward FLOPs per token")
    for domain in data["domains"][1:]:
        paths[f"png_{domain}"] = os.path.join(out, f"comparison_{domain}.png")
        plot(series(data, records, domain), paths[f"png_{domain}"], title=f"{spec.name}: held-out {domain}")
    return paths
