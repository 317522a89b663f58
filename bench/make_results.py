"""Assemble RESULTS.md from bench/results/*.json (written by the benchmark commands).

    python -m bench.make_results

Nothing in RESULTS.md is typed by hand: each section is the recorded output of one command, with
that command, the machine and the date.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from bench.common import RESULTS, ROOT
from bench.seed_sources import SOURCES

ORDER = ["elasticity_ladder_cpu", "elasticity_ladder_2x_cpu", "elasticity_ladder_2x_broad_cpu",
         "elasticity_ladder_repeat_cpu",
         "elasticity_ladder_2x_wide_cpu", "specialist_finetune_elasticity_ladder_2x_wide_cpu",
         "specialist_finetune_elasticity_ladder_2x_wide_cpu_repeat",
         "specialist_finetune_elasticity_ladder_2x_wide_cpu_routers",
         "specialist_finetune_elasticity_ladder_2x_wide_cpu_experts",
         "specialist_finetune_elasticity_ladder_2x_wide_cpu_dense", "tax_vs_tokens",
         "expert_contributions_elasticity_ladder_cpu",
         "expert_contributions_elasticity_ladder_2x_cpu",
         "router_temperature_elasticity_ladder_cpu", "heldout_noise_elasticity_ladder_cpu",
         "heldout_tokens_elasticity_ladder_2x_cpu", "heldout_calibration_elasticity_ladder_2x_broad_cpu",
         "seed_sources_elasticity_ladder_2x_broad_cpu",
         "tail_average_elasticity_ladder_2x_cpu",
         "run_numerics_elasticity_ladder_2x_cpu", "slimmable_cpu",
         "router_overhead", "cost_vs_k", "serving_speed", "serving_speed_ffn4096", "elasticity_cpu",
         "ablations_cpu", "ablations_seed2_cpu", "elasticity_gpu", "router_overhead_gpu", "gpu_check",
         "device_training"]
GPU_SECTIONS = ("elasticity_gpu", "router_overhead_gpu")
# One factor at a time around the base member `layerwise` (strategy layerwise, normalization
# topk_softmax, distribution uniform): axis -> {ablation member: the value it tests}.
AXES = {
    "strategy": {"layerwise": "layerwise", "global": "global", "microbatch": "microbatch", "token": "token"},
    "normalization": {"layerwise": "topk_softmax", "layerwise-softmax_topk": "softmax_topk"},
    "distribution": {"layerwise": "uniform", "layerwise-capacity": "capacity"},
}
SEED_REPLICATES = ["ablations_seed2_cpu"]
"""Suites that rerun some ablation members with another seed; a member's score is then its mean
over the seeds it ran with."""


def machine_line(m: dict) -> str:
    return (f"{m.get('device')} / {m.get('cpu')} ({m.get('cpu_count')} cores), {m.get('platform')}, "
            f"Python {m.get('python')}, torch {m.get('torch')}, megatron-core {m.get('megatron_core', '?')}")


def machine_lines(record: dict) -> list[str]:
    """Where a result's numbers were produced. A suite report is assembled from runs kept from
    other times and machines, so it names the CPUs its runs trained on, with how many runs and code
    versions each (the comparison's provenance, which the report lists in full), and, apart, the
    machine that assembled it."""
    provenance = record.get("data", {}).get("comparison", {}).get("provenance")
    if not provenance:
        return [f"- machine: {machine_line(record['machine'])}"]
    by_cpu: dict[str, list[dict]] = {}
    for p in provenance:
        by_cpu.setdefault(p["cpu"], []).append(p)
    parts = []
    for cpu, entries in by_cpu.items():
        versions = sorted({p["code_version"] for p in entries})
        at = f"at {versions[0]}" if len(versions) == 1 else f"at {len(versions)} code versions"
        parts.append(f"{sum(p['runs'] for p in entries)} run(s) on {cpu}, {at}")
    return ["- runs trained on: " + "; ".join(parts),
            f"- report assembled on: {machine_line(record['machine'])}"]


def defaults_section(records: dict) -> str:
    """Per axis: each value's mean loss over the uniform ks (per seed, and averaged over the seeds
    its member ran with), the best value, and the schema's default for that field."""
    from mmoe_megatron.config.schema import MatryoshkaConfig

    runs = [records["ablations_cpu"]] + [records[n] for n in SEED_REPLICATES if n in records]
    scores: dict[str, list[float]] = {}
    flops: dict[str, float] = {}
    for record in runs:
        for row in record["data"]["comparison"]["rows"]:
            scores.setdefault(row["name"], []).append(row["mean_loss_uniform_k"])
            flops[row["name"]] = row["training_flops"]
    lines = ["## Defaults chosen from the ablations", "",
             "Criterion: mean validation loss over the uniform ks evaluated (1, 2, 4, 8), lower is "
             "better, averaged over the seeds each member ran with, among the values trained with the base's "
             "training FLOPs (a value that buys its loss with more compute is shown, not chosen; suites: "
             + ", ".join(r["name"] for r in runs) + "). Each axis is varied alone around strategy "
             "layerwise, normalization topk_softmax, distribution uniform; the schema default is that of "
             "`mmoe_megatron/config/schema.py`.", "",
             "| `matryoshka.` field | measured (mean loss over k: mean of seeds (each seed)) | best | schema default |",
             "|---|---|---|---|"]
    defaults = MatryoshkaConfig()
    differ = []
    for axis, members in AXES.items():
        present = {m: v for m, v in members.items() if m in scores}
        if not present:
            continue
        mean = {m: sum(scores[m]) / len(scores[m]) for m in present}
        extra = {m: flops[m] / flops["layerwise"] - 1 for m in present}
        best = min((m for m in present if extra[m] <= 1e-3), key=mean.get)
        measured = ", ".join(
            f"{v}: {mean[m]:.4f} ({' / '.join(f'{x:.4f}' for x in scores[m])})"
            + (f", {extra[m]:+.1%} training FLOPs" if extra[m] > 1e-3 else "") for m, v in present.items())
        default = getattr(defaults, axis)
        verdict = default + (" (= best)" if default == present[best] else " (differs from the best)")
        lines.append(f"| {axis} | {measured} | {present[best]} | {verdict} |")
        if default != present[best]:
            differ.append(f"`{axis}` ({default}; best measured {present[best]})")
    lines += ["", "Every default is the best value measured on its axis." if not differ else
              "Defaults that are not the best value measured: " + ", ".join(differ) + "."]
    return "\n".join(lines) + "\n"


def schema_default(key: str):
    """The schema's default of a dotted config key (`section.field`); dataclasses.MISSING when the
    key is unknown or has no default."""
    import dataclasses
    import typing

    from mmoe_megatron.config.schema import ExperimentConfig

    section, _, name = key.partition(".")
    cls = typing.get_type_hints(ExperimentConfig).get(section)
    found = [f for f in dataclasses.fields(cls) if f.name == name] if dataclasses.is_dataclass(cls) else []
    if not found or "." in name:
        return dataclasses.MISSING
    f = found[0]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def default_settings(spec) -> tuple[dict, Callable[[str], bool]]:
    """The suite's pins (overrides of settings whose schema default is `auto`, which keep its runs
    trained as they were recorded) and a test of whether a member trains with today's defaults:
    every setting it sets, pins included, equals what the key resolves to in the suite's base config
    with the suite's other overrides."""
    from mmoe_megatron.config import load_config

    pins = {k: v for k, v in spec.overrides.items() if schema_default(k) == "auto"}
    base = load_config(spec.base, [(k, v) for k, v in spec.overrides.items() if k not in pins])
    members = {m.name: m for m in spec.members}

    def value(key: str):
        section, _, name = key.partition(".")
        return getattr(getattr(base, section), name)

    def is_default(name: str) -> bool:
        return all(value(k) == v for k, v in {**pins, **members[name].overrides}.items())

    return pins, is_default


SEED_SOURCES = tuple(SOURCES.values())
"""Settings that fix what a run's seed would otherwise set (its initial weights, k draws, data order)."""


def holds_a_seed_source(overrides: dict) -> bool:
    return any(key in overrides for key in SEED_SOURCES)


def default_member(spec, is_default: Callable[[str], bool], reference: str) -> Optional[str]:
    """The member that trains with today's defaults at the reference's compute (the one a
    candidate has to beat), or None."""
    return next((m.name for m in spec.members if m.equal_compute_to in (None, reference)
                 and m.name != reference and is_default(m.name)), None)


def against(entry: dict, base: dict) -> dict:
    """A variant's paired differences to another variant, per seed they share, from their
    differences to the same reference."""
    shared = [s for s in entry["per_seed"] if s in base["per_seed"]]
    return {s: entry["per_seed"][s] - base["per_seed"][s] for s in shared}


def ladder_defaults_section(record: dict) -> str:
    """Which training-side method against the tax became a default: a variant is kept when it beats
    the reference elastic model on every seed on the validation split (held-out shown, not used)."""
    from mmoe_megatron.evaluation.compare import SEEDS_TO_DECIDE, against_reference
    from mmoe_megatron.evaluation.suite import load_suite

    def _verdict(e):
        if not e or not e["better_on_every_seed"]:
            return "no"
        return "yes" if e.get("decides") else f"yes ({len(e['per_seed'])} seeds: too few)"

    variants = record["data"]["comparison"].get("variants") or {}
    if not variants:
        return ""
    spec = load_suite(os.path.join(ROOT, record["data"]["suite"]))
    overrides = {m.name: m.overrides for m in spec.members}
    pins, is_default = default_settings(spec)
    reference = (f"the elastic model with {', '.join(f'`{k}: {v}`' for k, v in pins.items())}, as the ladder "
                 f"began" if pins else "the current defaults")
    lines = ["## Defaults chosen from the elasticity ladder", "",
             f"Criterion: mean validation loss over k = {', '.join(variants['ks'])} at the end of training, "
             f"paired by seed against `{variants['reference']}` ({reference}), at equal training "
             f"compute; a variant becomes the default only if it is better on every seed, on at least "
             f"{SEEDS_TO_DECIDE} seeds. The held-out "
             "column is reported, never used to choose.", "",
             "| variant | setting | validation: mean (per seed) | better on every seed (enough seeds) | held-out: mean (per seed) | is the default |",
             "|---|---|---|---|---|---|"]
    members = {m.name: m for m in spec.members}
    default = default_member(spec, is_default, variants["reference"])
    if default:
        lines[2] += (f" A variant that meets the criterion but is not the default is compared with `{default}` "
                     f"(today's defaults at the same compute), paired by seed: a lower mean is needed on every "
                     f"seed to replace it. A setting trained at another member's compute says so.")
    diagnostic = sorted(name for name in variants["by_variant"] if holds_a_seed_source(overrides.get(name, {})))
    if diagnostic:
        lines[2] += (f" Members that hold a seed source fixed ({', '.join(SEED_SOURCES)}) measure where the "
                     f"seed spread comes from, on other tokens or k draws than the reference, and are no "
                     f"candidates: {', '.join(diagnostic)}.")
    for name, per_domain in variants["by_variant"].items():
        if name in diagnostic or not against_reference(variants, name):
            continue  # no candidate, or measured against another member than the reference
        setting = ", ".join(f"`{k}: {v}`" for k, v in overrides.get(name, {}).items())
        compute_of = members[name].equal_compute_to if name in members else None
        if compute_of not in (None, variants["reference"]):
            setting += f" (at `{compute_of}`'s training compute)"
        valid = per_domain.get("valid")
        held = [e for d, e in per_domain.items() if d != "valid"]
        cell = lambda e: f"{e['mean']:+.4f} ({', '.join(f'{d:+.4f}' for d in e['per_seed'].values())})"
        if is_default(name):
            verdict = "yes"
        elif valid and valid.get("decides") and default and "valid" in variants["by_variant"].get(default, {}):
            diffs = against(valid, variants["by_variant"][default]["valid"])
            beats = bool(diffs) and all(d < 0 for d in diffs.values())
            verdict = (f"{'no, though it beats' if beats else 'no: not lower on every seed than'} `{default}` "
                       f"({', '.join(f'{d:+.4f}' for d in diffs.values())})")
        elif valid and valid.get("decides"):
            verdict = "no, though it meets the criterion"
        else:
            verdict = "no"
        lines.append(f"| {name} | {setting} | {cell(valid) if valid else '-'} | "
                     f"{_verdict(valid)} | "
                     f"{'; '.join(cell(e) for e in held) or '-'} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    records = {}
    for name in os.listdir(RESULTS):
        if name.endswith(".json"):
            with open(os.path.join(RESULTS, name)) as f:
                record = json.load(f)
            records[record["name"]] = record
    out = ["# Results", "",
           "Every section below is generated by `python -m bench.make_results` from the files the "
           "benchmark commands write to `bench/results/`; rerun a command to refresh its section.", ""]
    for name in ORDER + sorted(set(records) - set(ORDER)):
        if name not in records:
            continue
        r = records[name]
        out += [f"## {r['title']}", "", f"- command: `{r['command']}`", *machine_lines(r),
                f"- date: {r['date']}", "", r["markdown"].strip(), ""]
    if "elasticity_ladder_cpu" in records:
        out.append(ladder_defaults_section(records["elasticity_ladder_cpu"]))
    if "ablations_cpu" in records:
        out.append(defaults_section(records))
    missing = [n for n in GPU_SECTIONS if n not in records]
    pending = []
    if missing and "gpu_check" in records:
        pending += ["Pending: the GPU preset of the elasticity experiment (`python -m bench.suite_bench "
                    "--suite bench/suites/elasticity_gpu.yaml --nproc 1`, about half an hour per member on "
                    "an H200 by the GPU check's step times) and the router-overhead benchmark on a GPU "
                    "(`python -m bench.router_overhead --hidden 1024 --experts 16`) have not run; the GPU "
                    "check above measured tokens/s, MFU and the router's overhead in training on an H200.", ""]
    elif missing:
        pending += ["Pending: no H100/H200 was available when these results were produced, so MFU, "
                    "tokens/s on GPU, the GPU router-overhead run and the GPU preset of the elasticity "
                    "experiment (`python -m bench.suite_bench --suite bench/suites/elasticity_gpu.yaml "
                    "--nproc 1`, and `python -m bench.router_overhead --hidden 1024 --experts 16` on the "
                    "GPU) have not been measured yet.", ""]
    if "gpu_check" not in records:
        pending += ["The GPU check (`make gpu-check`, `bench/gpu_check.py`: layer-spec parity in bf16, "
                    "with slimmable experts at a narrower width and at a mixed (k, width) draw, "
                    "tokens/s, MFU and peak memory at k = 1, 2, 4, 8 and per-token k, router overhead on "
                    "GPU) has not run on a GPU yet.", ""]
    if pending:
        out += ["## GPU figures", ""] + pending
    with open(os.path.join(ROOT, "RESULTS.md"), "w") as f:
        f.write("\n".join(out))
    print("wrote RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
