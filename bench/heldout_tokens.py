"""Where a member's loss on each evaluation domain comes from, by how often the training split saw
the token being predicted.

A held-out domain holds tokens the training split has rarely or never seen. Their loss is set by
what training did to tokens it never asked the model to predict, not by how well the routing
models the text, and a few of them can move a domain's mean a lot. This splits every domain's
loss at the suite's curve_ks, on the suite's own samples, by the predicted token's count in the
training split (buckets `BUCKETS`): each bucket's share of the tokens, its mean loss, and its
contribution to the domain's mean (share x mean, summing to the mean). For each elastic member and
each of its specialists (paired by seed) the tax at the specialist's k is split the same way.

    python -m bench.heldout_tokens --suite bench/suites/elasticity_ladder2x_cpu.yaml --root DIR --member M

--root: where the suite's runs directory is (default: this checkout). Each run's result is kept in
bench/results/heldout_tokens_<suite>/ (built in parts, like the suite); the report is assembled
from every kept file.
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import check_kept, final_model, kept_runs_parser, mean_std_cell, run_kept_benchmark, suite_samples

BUCKETS = ((0, 0), (1, 9), (10, 99), (100, 999), (1000, None))
"""Inclusive ranges of a token's count in the training split."""

AGREE = 1e-3
"""The buckets' contributions must sum to the suite's kept loss to this many nats (same samples, same weights)."""


def bucket_label(lo: int, hi) -> str:
    return f">={lo}" if hi is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")


def _gpt_datasets(dataset) -> list:
    """The megatron GPTDatasets under a split's dataset (a blend holds one per corpus)."""
    return list(dataset.datasets) if hasattr(dataset, "datasets") else [dataset]


def train_counts(cfg, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the documents of the training split (each document once)."""
    from mmoe_megatron.data import build_datasets

    counts = np.zeros(vocab_size, dtype=np.int64)
    for ds in _gpt_datasets(build_datasets(cfg, train_samples=1, valid_samples=0, test_samples=0)[0]):
        for doc in np.unique(ds.indices):
            counts += np.bincount(np.asarray(ds.dataset[int(doc)]), minlength=vocab_size)[:vocab_size]
    return counts


def bucket_of(counts: np.ndarray) -> np.ndarray:
    """Bucket index of every token id."""
    out = np.full(len(counts), -1, dtype=np.int64)
    for i, (lo, hi) in enumerate(BUCKETS):
        out[(counts >= lo) & ((counts <= hi) if hi is not None else True)] = i
    assert (out >= 0).all()
    return out


def bucket_losses(model, dataset, k, indices, micro_batch_size: int, mask, buckets: np.ndarray) -> dict:
    """Summed loss and token count per bucket of the predicted token, at routing `k`."""
    import torch

    from mmoe_megatron.evaluation.core import set_point, split_spec, token_losses

    was_training = model.training
    model.eval()
    sums = np.zeros(len(BUCKETS))
    tokens = np.zeros(len(BUCKETS), dtype=np.int64)
    by_token = torch.as_tensor(buckets)
    try:
        set_point(model, *split_spec(k))
        with torch.no_grad():
            for per_token, batch in token_losses(model, dataset, indices, micro_batch_size, mask, "cpu"):
                weight = batch["loss_mask"].double()
                which = by_token[batch["labels"]]
                for b in range(len(BUCKETS)):
                    chosen = (which == b).double() * weight
                    sums[b] += float((per_token * chosen).sum())
                    tokens[b] += int(chosen.sum())
    finally:
        model.train(was_training)
    return {"loss_sum": sums.tolist(), "tokens": tokens.tolist()}


def measure_run(spec, run) -> dict:
    from mmoe_megatron.data import resolve_vocab_size
    from mmoe_megatron.evaluation.run import causal_mask
    from mmoe_megatron.evaluation.suite import specialist_k
    from bench.heldout_noise import suite_losses

    out, cfg, checkpoint, model = final_model(spec, run)
    mask = causal_mask(cfg.data.seq_length, "cpu")
    vocab = resolve_vocab_size(cfg)
    counts = train_counts(cfg, vocab)
    buckets = bucket_of(counts)
    recorded = suite_losses(os.path.join(out, "eval", "results.json"))
    by_domain = {}
    for name, dataset, indices in suite_samples(spec, out):
        by_k = {}
        for k in spec.eval.curve_ks:
            parts = bucket_losses(model, dataset, k, indices, cfg.train.micro_batch_size, mask, buckets)
            mean = sum(parts["loss_sum"]) / sum(parts["tokens"])
            check_kept(run, recorded, name, k, mean, "the buckets sum to", AGREE)
            by_k[str(k)] = parts
            print(f"{run.label} {name} k={k}: {mean:.4f} (" + ", ".join(
                f"{bucket_label(*BUCKETS[b])}: {s / max(t, 1):.3f} x {t}"
                for b, (s, t) in enumerate(zip(parts["loss_sum"], parts["tokens"]))) + ")", flush=True)
        by_domain[name] = by_k
    return {"member": run.member.name, "role": run.member.role, "seed": run.seed, "trained_k": specialist_k(run.member),
            "checkpoint": checkpoint, "buckets": [bucket_label(*b) for b in BUCKETS],
            "train_types": [int((buckets == b).sum()) for b in range(len(BUCKETS))], "domains": by_domain}


def contributions(record: dict, domain: str, k: str) -> list[float]:
    """Each bucket's share of the domain's tokens times its mean loss: they sum to the domain's mean."""
    parts = record["domains"][domain][k]
    total = sum(parts["tokens"])
    return [s / total for s in parts["loss_sum"]]


def report(spec, records: list[dict]) -> tuple[str, dict]:
    from mmoe_megatron.evaluation.suite import specialists_of

    labels = records[0]["buckets"]
    ks = [str(k) for k in spec.eval.curve_ks]
    order = {m.name: i for i, m in enumerate(spec.members)}
    records = sorted(records, key=lambda r: (order.get(r["member"], len(order)), r["seed"] or 0))
    first = records[0]
    lines = [f"Tokens of each domain by the predicted token's count in the training split ({', '.join(labels)}), "
             "as shares of the domain's tokens, and the token types of each bucket; the training split is the "
             "same for every run.", "",
             "| domain | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for d, by_k in first["domains"].items():
        tokens = by_k[ks[0]]["tokens"]
        lines.append(f"| {d} | " + " | ".join(f"{t / sum(tokens):.4f}" for t in tokens) + " |")
    lines.append("| token types | " + " | ".join(str(n) for n in first["train_types"]) + " |")
    lines += ["", "Mean loss per bucket of each run at each k (the domain's mean is their token-weighted mean):", "",
              "| model | seed | domain | k | mean | " + " | ".join(labels) + " |",
              "|---|---:|---|---:|---:|" + "---:|" * len(labels)]
    for r in records:
        for d, by_k in r["domains"].items():
            for k in ks:
                parts = by_k[k]
                mean = sum(parts["loss_sum"]) / sum(parts["tokens"])
                lines.append(f"| {r['member']} | {r['seed']} | {d} | {k} | {mean:.4f} | " + " | ".join(
                    f"{s / t:.3f}" if t else "-" for s, t in zip(parts["loss_sum"], parts["tokens"])) + " |")
    by_run = {(r["member"], r["seed"]): r for r in records}
    members = {m.name: m for m in spec.members}
    taxes = {}
    tax_lines = []
    for name in dict.fromkeys(r["member"] for r in records if r["role"] == "elastic"):
        for specialist, k in specialists_of(spec.members, members[name]).items():
            seeds = sorted(s for (m, s) in by_run if m == name and (specialist, s) in by_run)
            if not seeds or str(k) not in ks:
                continue
            for d in first["domains"]:
                per_seed = [[e - s for e, s in zip(contributions(by_run[(name, seed)], d, str(k)),
                                                   contributions(by_run[(specialist, seed)], d, str(k)))]
                            for seed in seeds]
                cells = [mean_std_cell([t[b] for t in per_seed]) for b in range(len(labels))]
                total = mean_std_cell([sum(t) for t in per_seed])
                taxes.setdefault(name, {}).setdefault(specialist, {})[d] = {
                    "k": k, "seeds": seeds, "by_bucket": per_seed}
                tax_lines.append(f"| {name} | {specialist} | {k} | {d} | {len(seeds)} | {total} | " +
                                 " | ".join(cells) + " |")
    if tax_lines:
        lines += ["", "Tax of each elastic member (elastic minus specialist at the specialist's k, paired by seed), "
                  "split into each bucket's contribution (they sum to the tax); mean ± seed std:", "",
                  "| model | specialist | k | domain | seeds | tax | " + " | ".join(labels) + " |",
                  "|---|---|---:|---|---:|---:|" + "---:|" * len(labels)] + tax_lines
    return "\n".join(lines), {"taxes": taxes}


def main(argv=None) -> int:
    args = kept_runs_parser(__doc__).parse_args(argv)
    return run_kept_benchmark(args, "heldout_tokens", "Loss by the predicted token's training count",
                              measure_run, report)


if __name__ == "__main__":
    raise SystemExit(main())
