"""Serving-time router temperature per k: calibrated on training tokens, measured on held-out ones.

Dividing a trained router's logits by T changes no expert choice, only the weights of the chosen
experts (T < 1 sharpens them). An elastic model's router is shaped by its k = 1 tokens, whose one
expert must carry the token alone; served at a larger k, the lower-ranked experts may want another
weight than the one training gave them. T is a free knob at serving time: it folds into the router
weights (W / T), so a model exported for one k with it folded in stays a plain Qwen3-MoE.

For every evaluated run of a suite (with its checkpoints on this machine), at each k of the suite's
curve_ks: T is chosen on training samples from a grid, then the validation split and every held-out
domain are evaluated at T = 1 and at the chosen T, on the suite's evaluation samples. Specialists
are calibrated the same way, so the tax after calibration compares calibrated models on both sides.

    python -m bench.router_temperature --suite bench/suites/elasticity_ladder_cpu.yaml [--root DIR]

--root: where the suite's runs directory is (default: this checkout). Each run's result is kept in
bench/results/router_temperature_<suite>/ (built in parts, like the suite); the report is assembled
from every kept file.
"""

from __future__ import annotations

from bench.common import final_model, kept_runs_parser, mean_std_cell, run_kept_benchmark

GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3)
MIN_GAIN = 1e-4
"""A temperature replaces T = 1 only if it lowers the calibration loss by more than this."""


def routers(model):
    from mmoe_megatron.router import MatryoshkaRouter

    return [m for m in model.modules() if isinstance(m, MatryoshkaRouter)]


def set_temperature(model, originals, t: float) -> None:
    """Router logits divided by t, through the router weights (what an export folds in)."""
    for router, weight in zip(routers(model), originals):
        router.weight.data.copy_(weight / t)


def choose(losses: dict[float, float]) -> float:
    """The grid temperature with the lowest loss, or 1 when none beats 1 by MIN_GAIN."""
    best = min(losses, key=losses.get)
    return best if losses[best] < losses[1.0] - MIN_GAIN else 1.0


def measure_run(spec, run, num_calibration: int) -> dict:
    from mmoe_megatron.data import build_datasets
    from mmoe_megatron.evaluation.core import eval_indices, losses_at
    from mmoe_megatron.evaluation.run import causal_mask, run_config as saved_config
    from mmoe_megatron.evaluation.suite import domains, specialist_k

    out, cfg, checkpoint, model = final_model(spec, run)
    originals = [r.weight.detach().clone() for r in routers(model)]
    if not originals:
        raise ValueError(f"{run.label}: no Matryoshka router in the model")
    mask = causal_mask(cfg.data.seq_length, "cpu")
    n = spec.eval.num_samples

    def loss(dataset, k, t, count):
        set_temperature(model, originals, t)
        (value, _), = losses_at(model, dataset, [k], eval_indices(min(count, len(dataset)), 0, 1),
                                cfg.train.micro_batch_size, mask, "cpu")
        return value

    calibration = build_datasets(cfg, train_samples=num_calibration, valid_samples=1, test_samples=0)[0]
    evaluation = {}
    for domain, overrides in domains(spec):
        dcfg = saved_config(out, overrides)
        evaluation[domain] = build_datasets(dcfg, train_samples=1, valid_samples=n, test_samples=0)[1]
    by_k = {}
    for k in spec.eval.curve_ks:
        cal = {t: loss(calibration, k, t, num_calibration) for t in GRID}
        t = choose(cal)
        entry = {"temperature": t, "calibration": {str(g): v for g, v in cal.items()}}
        for domain, dataset in evaluation.items():
            base = loss(dataset, k, 1.0, n)
            entry[domain] = {"t1": base, "calibrated": base if t == 1.0 else loss(dataset, k, t, n)}
        by_k[str(k)] = entry
        print(f"{run.label} k={k}: T={t} " + " ".join(
            f"{d} {entry[d]['t1']:.4f}->{entry[d]['calibrated']:.4f}" for d in evaluation), flush=True)
    set_temperature(model, originals, 1.0)
    sharpness = router_sharpness(model, calibration, max(spec.eval.curve_ks), cfg, mask, num_calibration)
    print(f"{run.label}: router top-1 probability {sharpness['top1']:.3f}, top-2 {sharpness['top2']:.3f}", flush=True)
    return {"sharpness": sharpness, "member": run.member.name, "role": run.member.role, "seed": run.seed,
            "trained_k": specialist_k(run.member), "checkpoint": checkpoint, "grid": list(GRID),
            "num_calibration": num_calibration, "num_samples": n, "by_k": by_k}


def router_sharpness(model, dataset, k, cfg, mask, count) -> dict:
    """Mean over tokens and MoE layers of the router's largest and second-largest full-softmax
    probability (at T = 1, routing at k): how much one expert dominates a token."""
    import torch

    from mmoe_megatron.evaluation.core import eval_indices, losses_at

    sums = torch.zeros(2, dtype=torch.float64)
    count_tokens = [0]

    def hook(router, inputs, _output):
        logits = torch.nn.functional.linear(inputs[0].reshape(-1, router.weight.shape[1]), router.weight)
        top = logits.float().softmax(-1).topk(2, dim=-1).values
        sums.add_(top.double().sum(0))
        count_tokens[0] += top.shape[0]

    handles = [r.register_forward_hook(hook) for r in routers(model)]
    try:
        losses_at(model, dataset, [k], eval_indices(min(count, len(dataset)), 0, 1), cfg.train.micro_batch_size,
                  mask, "cpu")
    finally:
        for h in handles:
            h.remove()
    top1, top2 = (sums / max(count_tokens[0], 1)).tolist()
    return {"top1": top1, "top2": top2, "num_experts": cfg.moe.num_experts}


def report(spec, records: list[dict]) -> tuple[str, dict]:
    from mmoe_megatron.evaluation.suite import domains, specialists_of

    ks = [str(k) for k in spec.eval.curve_ks]
    domain_names = [d for d, _ in domains(spec)]
    order = [m.name for m in spec.members]
    records = sorted(records, key=lambda r: (order.index(r["member"]), r["seed"] or 0))
    members = [m for m in order if any(r["member"] == m for r in records)]
    lines = [f"Router logits divided by T at serving time, T chosen per model and k from {list(GRID)} on "
             f"{records[0]['num_calibration']} training samples (T = 1 unless another lowers that loss by "
             f"more than {MIN_GAIN}); evaluated on the suite's {records[0]['num_samples']} samples per domain. "
             "Cells: chosen T (per seed), and the loss change from T = 1 (mean ± std over seeds; negative: better).",
             "", "| model | seeds | domain | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---:|---|" + "---:|" * len(ks)]
    summary = {}
    sharp = []
    for m in members:
        rs = [r for r in records if r["member"] == m]
        temps = " | ".join("/".join(f"{r['by_k'][k]['temperature']:g}" for r in rs) for k in ks)
        lines.append(f"| {m} | {len(rs)} | chosen T | {temps} |")
        if all("sharpness" in r for r in rs):
            top1 = [r["sharpness"]["top1"] for r in rs]
            top2 = [r["sharpness"]["top2"] for r in rs]
            sharp.append(f"| {m} | {len(rs)} | {mean_std_cell(top1, signed=False)} | {mean_std_cell(top2, signed=False)} |")
        for d in domain_names:
            cells = []
            for k in ks:
                deltas = [r["by_k"][k][d]["calibrated"] - r["by_k"][k][d]["t1"] for r in rs]
                summary.setdefault(m, {}).setdefault(d, {})[k] = deltas
                cells.append(mean_std_cell(deltas))
            lines.append(f"| {m} | {len(rs)} | {d} | " + " | ".join(cells) + " |")
    if sharp:
        lines += ["", f"How much one expert dominates: the router's largest and second-largest probability "
                  f"(softmax over all {records[0]['sharpness']['num_experts']} experts, T = 1), mean over "
                  "calibration tokens and MoE layers.", "", "| model | seeds | top-1 probability | top-2 probability |",
                  "|---|---:|---:|---:|", *sharp]
    lines += ["", "Tax of each elastic model (elastic minus specialist at the specialist's k, paired by seed), "
              "both at T = 1 and both calibrated:", "",
              "| model | domain | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---:|" * len(ks)]
    by_name = {member.name: member for member in spec.members}
    taxes = {}
    for m in members:
        rs = [r for r in records if r["member"] == m and r["role"] == "elastic"]
        if not rs:
            continue
        # k -> seed -> record of its specialists (those it names, else the unnamed ones).
        specialists = {k: {r["seed"]: r for r in records if r["member"] == name}
                       for name, k in specialists_of(spec.members, by_name[m]).items()}
        for d in domain_names:
            cells = []
            for k in ks:
                pairs = [(r, specialists.get(int(k), {}).get(r["seed"])) for r in rs]
                pairs = [(e, s) for e, s in pairs if s is not None]
                if not pairs:
                    cells.append("")
                    continue
                before = [e["by_k"][k][d]["t1"] - s["by_k"][k][d]["t1"] for e, s in pairs]
                after = [e["by_k"][k][d]["calibrated"] - s["by_k"][k][d]["calibrated"] for e, s in pairs]
                taxes.setdefault(m, {}).setdefault(d, {})[k] = {"t1": before, "calibrated": after}
                cells.append(f"{mean_std_cell(before)} → {mean_std_cell(after)}")
            lines.append(f"| {m} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines), {"deltas": summary, "taxes": taxes}


def main(argv=None) -> int:
    p = kept_runs_parser(__doc__)
    p.add_argument("--calibration-samples", type=int, default=256)
    args = p.parse_args(argv)
    return run_kept_benchmark(args, "router_temperature", "Router temperature at serving time",
                              lambda spec, run: measure_run(spec, run, args.calibration_samples), report)


if __name__ == "__main__":
    raise SystemExit(main())
