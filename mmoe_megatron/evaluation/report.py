"""Evaluation outputs: JSON (everything), a Markdown table, and PNG plots.

Every number in the Markdown table and the plots is read from the same `EvalPoint`s that go
into the JSON, so the three always agree.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from mmoe_megatron.evaluation.core import EvalPoint, mean_k, mean_width


def write_json(points: Sequence[EvalPoint], path: str, meta: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "results": [p.to_dict() for p in points]}, f, indent=2)


def markdown_table(points: Sequence[EvalPoint], title: str = "") -> str:
    widths = any(p.width is not None for p in points)
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| k | mean k | " + ("mean width | " if widths else "") + "loss | perplexity | active params | MFLOP/token |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if widths else ""),
    ]
    for p in points:
        lines.append(
            f"| {p.label} | {mean_k(p.k):.2f} | " + (f"{mean_width(p.spec):.2f} | " if widths else "")
            + f"{p.loss:.4f} | {p.ppl:.2f} | "
            f"{p.active_params:,} | {p.flops_per_token / 1e6:,.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(series: dict[str, Sequence[EvalPoint]], path: str, title: str = "") -> None:
    """Loss vs k and loss vs FLOPs per token; one line per model, per-layer vectors as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, points) in enumerate(series.items()):
        uniform = sorted((p for p in points if isinstance(p.k, int) and p.width is None), key=lambda p: p.k)
        vectors = [p for p in points if not isinstance(p.k, int) or p.width is not None]
        line, = ax_k.plot([p.k for p in uniform], [p.loss for p in uniform], marker="o", label=name,
                          **series_style(i, len(series)))
        ax_f.plot([p.flops_per_token / 1e6 for p in uniform], [p.loss for p in uniform],
                  marker="o", color=line.get_color(), linestyle=line.get_linestyle(), label=name)
        if vectors:
            ax_k.scatter([mean_k(p.k) for p in vectors], [p.loss for p in vectors], marker="x",
                         color=line.get_color(), label=f"{name} (per-layer k or width < 1)")
            ax_f.scatter([p.flops_per_token / 1e6 for p in vectors], [p.loss for p in vectors],
                         marker="x", color=line.get_color())
    ax_k.set_xlabel("k (mean over MoE layers)")
    ax_k.set_ylabel("validation loss")
    ax_f.set_xlabel("forward MFLOP per token")
    ax_f.set_ylabel("validation loss")
    for ax in (ax_k, ax_f):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # Below both panels, so that no number of models hides a curve.
    handles, labels = ax_k.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def series_style(i: int, n: int) -> dict:
    """Colour and line style of the i-th of n models: matplotlib's ten colours while they suffice,
    then tab20's twenty, each round of them in another line style."""
    import matplotlib

    size = 10 if n <= 10 else 20
    colours = matplotlib.colormaps[f"tab{size}"]
    return {"color": colours(i % size), "linestyle": ("-", "--", ":", "-.")[(i // size) % 4]}


def plot_frontier(series: dict[str, Sequence[EvalPoint]], path: str, title: str = "",
                  markers: Optional[dict[str, dict]] = None) -> None:
    """Loss vs forward FLOPs per token: every evaluated point of each model (small markers) and its
    frontier (line). `markers` (name -> matplotlib keyword arguments) styles particular models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmoe_megatron.evaluation.frontier import frontier

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in series.items():
        style = (markers or {}).get(name, {})
        pts = [(p.flops_per_token / 1e6, p.loss, p.label) for p in points]
        front = frontier(pts)
        line, = ax.plot([f for f, _, _ in front], [loss for _, loss, _ in front], marker=style.get("marker", "o"),
                        linestyle=style.get("linestyle", "-"), color=style.get("color"), label=name)
        others = [p for p in pts if p not in front]
        if others:
            ax.scatter([f for f, _, _ in others], [loss for _, loss, _ in others], s=10, alpha=0.35,
                       color=line.get_color())
    ax.set_xlabel("forward MFLOP per token")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(points: Sequence[EvalPoint], out_dir: str, name: str, meta: dict,
                 analysis: Optional[dict] = None) -> dict[str, str]:
    """eval.json, eval.md and eval.png in `out_dir`; returns their paths. `analysis` is the
    expert-ranking summary of the same forwards (see analysis.py), if computed."""
    from mmoe_megatron.evaluation.analysis import markdown as analysis_markdown

    paths = {ext: os.path.join(out_dir, f"eval.{ext}") for ext in ("json", "md", "png")}
    write_json(points, paths["json"], {"model": name, **meta, "expert_ranking": analysis})
    with open(paths["md"], "w") as f:
        f.write(markdown_table(points, title=f"{name}: validation loss by k"))
        if analysis:
            f.write("\n" + analysis_markdown(analysis["by_k"], analysis["reference"]))
    plot({name: points}, paths["png"], title=name)
    return paths
