"""How much of a member's seed-to-seed spread on each domain is one number: the model's confidence.

Models trained from different seeds (or from one seed with other last bits) land 0.03-0.07 nats
apart on text from outside their training split, where they agree within 0.01 on the validation
split. Part of that could be a single scale: one model is more sure of itself out of its domain
than another, and cross-entropy punishes confidence on wrong tokens hard. This measures it on the
runs a suite kept. For every run's final weights, each domain at the suite's curve_ks, on the
suite's own samples:

- the loss as evaluated (checked against the run's kept result);
- the inverse temperature beta that minimises the loss of softmax(beta * logits) on those same
  samples, and that loss: the part of the loss no single rescaling of the logits removes
  (diagnostic only, the scale is fitted on the text it is scored on);
- the loss with the beta fitted on the validation split at the same k (a calibration that does
  not look at the held-out text).

Reported per member: the seed mean ± std of each, and for each elastic member the tax against its
specialists (paired by seed) the same three ways. If the spread with each model's own beta is
much smaller than as evaluated, the spread is mostly confidence, and training that controls the
logits' scale (a z-loss, a logit cap) is the lever; if not, the models differ in what they
predict, not in how sure they are.

    python -m bench.heldout_calibration --suite bench/suites/elasticity_ladder2x_broad_cpu.yaml --root DIR --k 8

--root: where the suite's runs directory is (default: this checkout). Each run's result is kept in
bench/results/heldout_calibration_<suite>/ (built in parts, like the suite); the report is
assembled from every kept file.
"""

from __future__ import annotations

import os
import statistics

import torch

from bench.common import check_kept, final_model, kept_runs_parser, mean_std_cell, run_kept_benchmark, suite_samples

AGREE = 1e-3
"""The loss at beta = 1 must match the suite's kept result to this many nats (same samples, same weights)."""

BETA_RANGE = (0.05, 20.0)


def _moments(logits: list[torch.Tensor], labels: list[torch.Tensor], weights: list[torch.Tensor],
             beta: float) -> tuple[float, float, float]:
    """(loss, d loss / d beta, d2 loss / d beta2) of softmax(beta * logits) against `labels`, each
    position weighted; logits are (positions, vocab) chunks."""
    loss = grad = curv = total = 0.0
    for z, y, w in zip(logits, labels, weights):
        # Elementwise over the vocabulary in the logits' precision, every sum over positions in float64.
        scaled = beta * z
        lse = torch.logsumexp(scaled, dim=-1)
        p = torch.exp(scaled - lse[:, None])
        mean_z = (p * z).sum(-1)
        var_z = (p * (z - mean_z[:, None]) ** 2).sum(-1)
        target = z.gather(1, y[:, None]).squeeze(1)
        w = w.double()
        loss += float((w * (lse.double() - beta * target.double())).sum())
        grad += float((w * (mean_z.double() - target.double())).sum())
        curv += float((w * var_z.double()).sum())
        total += float(w.sum())
    return loss / total, grad / total, curv / total


def loss_at(logits, labels, weights, beta: float) -> float:
    """Weighted mean cross-entropy of softmax(beta * logits)."""
    return _moments(logits, labels, weights, beta)[0]


def best_inverse_temperature(logits, labels, weights, tol: float = 1e-5, max_steps: int = 50) -> tuple[float, float]:
    """(beta, loss) minimising the weighted cross-entropy of softmax(beta * logits). The loss is
    convex in beta (a log-sum-exp of a linear function minus a linear function), so Newton's method
    from beta = 1, each step halved until the loss does not rise, finds the minimum."""
    beta = 1.0
    loss, grad, curv = _moments(logits, labels, weights, beta)
    for _ in range(max_steps):
        if curv <= 0:
            break
        step = grad / curv
        while True:
            candidate = min(max(beta - step, BETA_RANGE[0]), BETA_RANGE[1])
            new = _moments(logits, labels, weights, candidate)
            if new[0] <= loss + 1e-12 or abs(step) < tol:
                break
            step /= 2
        moved = abs(candidate - beta)
        beta, (loss, grad, curv) = candidate, new
        if moved < tol:
            break
    return beta, loss


def domain_logits(model, dataset, k, indices, micro_batch_size: int, mask):
    """(logits, labels, loss-mask weights) chunks of every micro-batch of `indices` at routing `k`,
    flattened to positions."""
    from mmoe_megatron.evaluation.core import collate, set_point, split_spec

    was_training = model.training
    model.eval()
    logits, labels, weights = [], [], []
    try:
        set_point(model, *split_spec(k))
        with torch.no_grad():
            for start in range(0, len(indices), micro_batch_size):
                batch = collate(dataset, indices[start:start + micro_batch_size])
                out = model(batch["tokens"], batch["position_ids"], mask)
                if out.shape[:2] != batch["labels"].shape:  # megatron may return [sequence, batch, vocab]
                    out = out.transpose(0, 1)
                logits.append(out.reshape(-1, out.shape[-1]).float())
                labels.append(batch["labels"].reshape(-1))
                weights.append(batch["loss_mask"].reshape(-1).float())
    finally:
        model.train(was_training)
    return logits, labels, weights


def measure_run(spec, run, ks=None) -> dict:
    from mmoe_megatron.evaluation.run import causal_mask
    from mmoe_megatron.evaluation.suite import specialist_k
    from bench.heldout_noise import suite_losses

    out, cfg, checkpoint, model = final_model(spec, run)
    mask = causal_mask(cfg.data.seq_length, "cpu")
    recorded = suite_losses(os.path.join(out, "eval", "results.json"))
    by_domain = {}
    valid_betas = {}  # the validation split comes first
    for name, dataset, indices in suite_samples(spec, out):
        by_k = {}
        for k in ks or spec.eval.curve_ks:
            chunks = domain_logits(model, dataset, k, indices, cfg.train.micro_batch_size, mask)
            loss = loss_at(*chunks, 1.0)
            check_kept(run, recorded, name, k, loss, "the loss from the logits is", AGREE)
            beta, best = best_inverse_temperature(*chunks)
            entry = {"loss": loss, "beta": beta, "best_loss": best}
            if not by_domain:
                valid_betas[k] = beta
                entry["valid_beta_loss"] = best
            else:
                entry["valid_beta_loss"] = loss_at(*chunks, valid_betas[k])
            by_k[str(k)] = entry
            print(f"{run.label} {name} k={k}: {loss:.4f}, beta {beta:.3f} -> {best:.4f}, with the validation "
                  f"split's beta {entry['valid_beta_loss']:.4f}", flush=True)
            del chunks
        by_domain[name] = by_k
    return {"member": run.member.name, "role": run.member.role, "seed": run.seed, "trained_k": specialist_k(run.member),
            "checkpoint": checkpoint, "domains": by_domain}


WAYS = (("loss", "as evaluated"), ("best_loss", "own beta"), ("valid_beta_loss", "validation split's beta"))


def report(spec, records: list[dict]) -> tuple[str, dict]:
    from mmoe_megatron.evaluation.suite import specialists_of

    order = {m.name: i for i, m in enumerate(spec.members)}
    records = sorted(records, key=lambda r: (order.get(r["member"], len(order)), r["seed"] or 0))
    domains = list(records[0]["domains"])
    ks = [k for k in map(str, spec.eval.curve_ks) if all(k in r["domains"][d] for r in records for d in domains)]
    by_member: dict[str, list[dict]] = {}
    for r in records:
        by_member.setdefault(r["member"], []).append(r)
    lines = ["Each member's loss on the suite's samples at each k, mean ± seed std over its seeds: as evaluated, "
             "with the inverse temperature beta (logits x beta) fitted on the same samples, and with the beta "
             "fitted on the validation split at that k; and the fitted beta.", "",
             "| model | seeds | domain | k | as evaluated | own beta | validation split's beta | beta |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    data: dict = {"members": {}, "taxes": {}}
    for member, runs in by_member.items():
        for d in domains:
            for k in ks:
                cells = [mean_std_cell([r["domains"][d][k][key] for r in runs], signed=False) for key, _ in WAYS]
                betas = [r["domains"][d][k]["beta"] for r in runs]
                lines.append(f"| {member} | {len(runs)} | {d} | {k} | " + " | ".join(cells) +
                             f" | {mean_std_cell(betas, signed=False)} |")
                data["members"].setdefault(member, {}).setdefault(d, {})[k] = {
                    key: [r["domains"][d][k][key] for r in runs]
                    for key in ("loss", "best_loss", "valid_beta_loss", "beta")}
    by_run = {(r["member"], r["seed"]): r for r in records}
    members = {m.name: m for m in spec.members}
    tax_lines = []
    for name in dict.fromkeys(r["member"] for r in records if r["role"] == "elastic"):
        for specialist, k in specialists_of(spec.members, members[name]).items():
            seeds = sorted(s for (m, s) in by_run if m == name and (specialist, s) in by_run)
            if not seeds or str(k) not in ks:
                continue
            for d in domains:
                per_way = {key: [by_run[(name, s)]["domains"][d][str(k)][key] -
                                 by_run[(specialist, s)]["domains"][d][str(k)][key] for s in seeds] for key, _ in WAYS}
                data["taxes"].setdefault(name, {}).setdefault(specialist, {})[d] = {"k": k, "seeds": seeds, **per_way}
                tax_lines.append(f"| {name} | {specialist} | {k} | {d} | {len(seeds)} | " +
                                 " | ".join(mean_std_cell(per_way[key]) for key, _ in WAYS) + " |")
    if tax_lines:
        lines += ["", "Tax of each elastic member (elastic minus specialist at the specialist's k, paired by seed), "
                  "mean ± seed std, the same three ways:", "",
                  "| model | specialist | k | domain | seeds | as evaluated | own beta | validation split's beta |",
                  "|---|---|---:|---|---:|---:|---:|---:|"] + tax_lines
    stds = {key: statistics.fmean(statistics.stdev(v[key]) for m in data["members"].values() for d, by_k in m.items()
                                  if d != domains[0] for v in by_k.values() if len(v[key]) > 1)
            for key, _ in WAYS if any(len(v[key]) > 1 for m in data["members"].values() for by_k in m.values()
                                      for v in by_k.values())}
    if stds:
        lines += ["", "Mean seed std over members, held-out domains and ks: " +
                  ", ".join(f"{label} {stds[key]:.4f}" for key, label in WAYS if key in stds) + "."]
        data["mean_heldout_seed_std"] = stds
    return "\n".join(lines), data


def main(argv=None) -> int:
    parser = kept_runs_parser(__doc__)
    parser.add_argument("--k", type=int, action="append",
                        help="only these ks of the suite's curve_ks (repeatable; each costs minutes per run "
                             "and domain)")
    args = parser.parse_args(argv)
    return run_kept_benchmark(args, "heldout_calibration", "Held-out spread and the models' confidence",
                              lambda spec, run: measure_run(spec, run, args.k), report)


if __name__ == "__main__":
    raise SystemExit(main())
