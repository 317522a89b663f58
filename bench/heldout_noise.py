"""How much of a member's seed-to-seed spread on a held-out domain comes from the evaluation samples.

A suite evaluates every run on the same `eval.num_samples` samples of each domain, so the choice of
samples adds no noise to a paired difference only if every model errs on the same tokens. On text
from another domain models trained from different seeds may not: a few hundred samples from a few
dozen articles can favour one seed's model by chance. This measures it on the runs a suite kept.

For every evaluated run with its final checkpoint on this machine, each held-out domain is
evaluated at the suite's curve_ks on `--num-samples` distinct samples, in blocks of the suite's
size; the first block is the suite's own samples (checked against the run's kept result). Reported
per member with two or more seeds, per domain and k: the seed standard deviation on the suite's
samples, its mean over the blocks (any one block of that size), and the seed standard deviation on
all the samples.

    python -m bench.heldout_noise --suite bench/suites/elasticity_ladder_cpu.yaml --root DIR --member temperature

--root: where the suite's runs directory is (default: this checkout). Each run's result is kept in
bench/results/heldout_noise_<suite>/ (built in parts, like the suite); the report is assembled from
every kept file.
"""

from __future__ import annotations

import json
import os
import statistics

from bench.common import final_model, kept_runs_parser, run_kept_benchmark

AGREE = 1e-3
"""The first block must reproduce the suite's kept loss to this many nats (same samples, same weights)."""


def distinct_samples(prefix: str, seq_length: int) -> int:
    """Samples of `seq_length` tokens a held-out corpus holds without repeating a token."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix)  # its lengths live in the index's memory map: keep it open while reading
    return int(index.sequence_lengths.sum() - 1) // seq_length


def suite_losses(results_path: str) -> dict:
    """The losses a suite's evaluation recorded for a run (`<run>/eval/results.json`), at its last checkpoint."""
    with open(results_path) as f:
        losses = json.load(f)["losses"]
    return losses[max(losses, key=int)]


def measure_run(spec, run, num_samples: int) -> dict:
    from mmoe_megatron.data import build_datasets
    from mmoe_megatron.evaluation.core import losses_at
    from mmoe_megatron.evaluation.run import causal_mask, run_config as saved_config
    from mmoe_megatron.evaluation.suite import domains, specialist_k

    out, cfg, checkpoint, model = final_model(spec, run)
    mask = causal_mask(cfg.data.seq_length, "cpu")
    block = spec.eval.num_samples
    recorded = suite_losses(os.path.join(out, "eval", "results.json"))
    by_domain = {}
    for held in spec.eval.heldout:
        available = distinct_samples(held.prefix, cfg.data.seq_length)
        if num_samples > available:
            raise ValueError(f"{held.name}: {num_samples} samples asked, {held.prefix} holds {available} distinct "
                             f"ones of {cfg.data.seq_length} tokens; pass --num-samples {available // block * block} or fewer")
        overrides = dict(domains(spec))[held.name]
        dataset = build_datasets(saved_config(out, overrides), train_samples=1, valid_samples=num_samples,
                                 test_samples=0)[1]
        blocks = {}
        for k in spec.eval.curve_ks:
            values = [losses_at(model, dataset, [k], list(range(start, start + block)), cfg.train.micro_batch_size,
                                mask, "cpu")[0][0] for start in range(0, num_samples, block)]
            if abs(values[0] - recorded[held.name][str(k)]) > AGREE:
                raise RuntimeError(f"{run.label} {held.name} k={k}: the first block gives {values[0]:.4f}, the "
                                   f"suite's kept result {recorded[held.name][str(k)]:.4f}; the samples or weights differ")
            blocks[str(k)] = values
            print(f"{run.label} {held.name} k={k}: suite's samples {values[0]:.4f}, all {statistics.fmean(values):.4f}",
                  flush=True)
        by_domain[held.name] = blocks
    return {"member": run.member.name, "role": run.member.role, "seed": run.seed, "trained_k": specialist_k(run.member),
            "checkpoint": checkpoint, "block": block, "num_samples": num_samples, "blocks": by_domain}


def _std(values):
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def report(spec, records: list[dict]) -> tuple[str, dict]:
    ks = [str(k) for k in spec.eval.curve_ks]
    order = [m.name for m in spec.members]
    members = [m for m in order if sum(r["member"] == m for r in records) >= 2]
    if not members:
        raise ValueError("no member has two kept seeds; a seed spread needs at least two runs of one member")
    block, n = records[0]["block"], min(r["num_samples"] for r in records)
    lines = [f"Seed standard deviation of each member's held-out loss, on the suite's {block} samples, on any one "
             f"block of {block} (mean over the {n // block} blocks), and on all {n} samples (the blocks together). "
             "Cells: suite's samples / one block / all.", "",
             "| model | seeds | domain | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---:|---|" + "---:|" * len(ks)]
    data = {}
    for m in members:
        rs = [r for r in records if r["member"] == m]
        for d in rs[0]["blocks"]:
            cells = []
            for k in ks:
                per_run = [r["blocks"][d][k][:n // block] for r in rs]
                suite = _std([b[0] for b in per_run])
                one = statistics.fmean(_std([b[i] for b in per_run]) for i in range(n // block))
                whole = _std([statistics.fmean(b) for b in per_run])
                data.setdefault(m, {}).setdefault(d, {})[k] = {"suite": suite, "one_block": one, "all": whole,
                                                               "seeds": [r["seed"] for r in rs]}
                cells.append(f"{suite:.4f} / {one:.4f} / {whole:.4f}")
            lines.append(f"| {m} | {len(rs)} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines), data


def main(argv=None) -> int:
    p = kept_runs_parser(__doc__)
    p.add_argument("--num-samples", type=int, default=2048, help="a multiple of the suite's eval.num_samples")
    args = p.parse_args(argv)

    def check(spec):
        if not spec.eval.heldout:
            return f"{spec.name} has no held-out domain (eval.heldout)"
        if args.num_samples % spec.eval.num_samples:
            return f"--num-samples {args.num_samples} is not a multiple of the suite's {spec.eval.num_samples}"
        return None

    def members_report(spec, records):
        markdown, data = report(spec, records)
        return markdown, {"members": data}

    return run_kept_benchmark(args, "heldout_noise", "Held-out evaluation noise",
                              lambda spec, run: measure_run(spec, run, args.num_samples), members_report, check)


if __name__ == "__main__":
    raise SystemExit(main())
