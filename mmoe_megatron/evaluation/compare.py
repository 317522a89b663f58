"""The suite's comparison report: rows = models, columns = k, read from each member's eval.json.

Adds, for the elastic model, its gap to the specialist trained at each k (elastic loss minus
specialist loss at that k; negative = the elastic model is better), and the training compute
each model used (3 x forward FLOPs at its expected k x tokens trained).
"""

from __future__ import annotations

import json
import os

from mmoe_megatron.evaluation.core import EvalPoint


def _load_points(path: str) -> tuple[dict, list[EvalPoint]]:
    with open(path) as f:
        data = json.load(f)
    points = [EvalPoint(k=r["k"], loss=r["loss"], tokens=r["tokens"], active_params=r["active_params"],
                        flops_per_token=r["flops_per_token"]) for r in data["results"]]
    return data, points


def _mean(values):
    return sum(values) / len(values) if values else None


def specialist_k(member_overrides: dict, meta: dict) -> int | None:
    ks = member_overrides.get("matryoshka.ks")
    return ks[0] if isinstance(ks, list) and len(ks) == 1 else None


def comparison(spec) -> dict:
    """Everything the report shows, as plain data."""
    from mmoe_megatron.evaluation.suite import member_dir

    rows, series = [], {}
    for member in spec.members:
        path = os.path.join(member_dir(spec, member), "eval", "eval.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} missing: evaluate the suite first (suite evaluate)")
        meta, points = _load_points(path)
        series[member.name] = points
        rows.append({
            "name": member.name, "role": member.role,
            "trained_k": specialist_k(member.overrides, meta),
            "training_flops": meta.get("training_flops"),
            "loss": {p.label: p.loss for p in points},
            "mean_loss_uniform_k": _mean([p.loss for p in points if isinstance(p.k, int)]),
        })
    labels = [p.label for p in next(iter(series.values()))]
    gaps = {}
    elastic = next(r for r in rows if r["role"] == "elastic")
    for row in rows:
        if row["role"] == "specialist" and row["trained_k"] is not None:
            label = str(row["trained_k"])
            if label in elastic["loss"] and label in row["loss"]:
                gaps[label] = elastic["loss"][label] - row["loss"][label]
    return {"suite": spec.name, "columns": labels, "rows": rows, "elastic_gap_to_specialist": gaps,
            "series": series}


def markdown(data: dict) -> str:
    cols = data["columns"]
    lines = [f"## {data['suite']}: validation loss of every model at every k", "",
             "| model | role | trained at | train PFLOP | " + " | ".join(f"k={c}" for c in cols)
             + " | mean over uniform k |",
             "|---|---|---|---:|" + "---:|" * (len(cols) + 1)]
    for r in data["rows"]:
        trained = "schedule" if r["role"] == "elastic" else (str(r["trained_k"]) if r["trained_k"] else "-")
        flops = f"{r['training_flops'] / 1e15:.3f}" if r["training_flops"] else "-"
        cells = []
        for c in cols:
            value = f"{r['loss'][c]:.4f}"
            if r["trained_k"] is not None and c == str(r["trained_k"]):
                value = f"**{value}**"
            cells.append(value)
        mean = "-" if r["mean_loss_uniform_k"] is None else f"{r['mean_loss_uniform_k']:.4f}"
        lines.append(f"| {r['name']} | {r['role']} | {trained} | {flops} | " + " | ".join(cells) + f" | {mean} |")
    gaps = data["elastic_gap_to_specialist"]
    if gaps:
        lines.append("| elastic - specialist | gap | | | " + " | ".join(
            f"{gaps[c]:+.4f}" if c in gaps else "" for c in cols) + " | |")
    lines += ["", "Bold: a specialist at the k it was trained for. Gap: elastic loss minus the "
              "specialist's at that k (negative: the elastic model is better)."]
    return "\n".join(lines) + "\n"


def write_comparison(spec) -> dict[str, str]:
    from mmoe_megatron.evaluation.report import plot

    data = comparison(spec)
    out = os.path.join(spec.runs_dir, spec.name, "report")
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "comparison.json"), "md": os.path.join(out, "comparison.md"),
             "png": os.path.join(out, "comparison.png")}
    series = data.pop("series")
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(markdown(data))
    plot(series, paths["png"], title=f"{spec.name}: loss by k")
    return paths
