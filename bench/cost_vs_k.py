"""Cost against k: forward and training-step time and FLOPs per token at each k, and a layer-wise
random k against the fixed k at its mean.

    python -m bench.cost_vs_k [--ks 1,2,4,8,16] [--rounds 8]

One model per k (same weights: initialisation depends only on the seed and parameter names) and
one layer-wise elastic model drawing k from {2, 4, 6} (mean 4). Timings are interleaved round-robin
over the models so machine load drifts hit all alike; the result reports the medians and a
least-squares fit of time against FLOPs.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import RESULTS, ROOT, single_process, spread, write_result


def fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, intercept, 1 - ss_res / ss_tot if ss_tot else 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    p.add_argument("--ks", default="1,2,4,8,16")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--expert-ffn", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args, rest = p.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]

    from mmoe_megatron.config import load_config, parse_overrides
    from mmoe_megatron.config.derive import flops_per_token
    from mmoe_megatron.model import set_topk
    from mmoe_megatron.training.trainer import Trainer

    steps = args.warmup + args.rounds
    common = [
        ("model.hidden_size", args.hidden), ("model.ffn_hidden_size", 4 * args.hidden),
        ("moe.num_experts", args.experts), ("moe.expert_ffn_hidden_size", args.expert_ffn),
        ("train.train_iters", steps), ("train.eval_interval", 0), ("optimizer.warmup_iters", 1),
        ("checkpoint.save_interval", 0), ("logging.tensorboard", False),
    ] + parse_overrides(rest)

    def config(name, strategy, train_ks):
        return load_config(args.config, common + [
            ("matryoshka.strategy", strategy), ("matryoshka.ks", train_ks),
            ("matryoshka.eval_ks", [max(train_ks)]),
            ("matryoshka.normalization", "softmax_topk" if train_ks == [1] else "topk_softmax"),
            ("logging.dir", os.path.join(ROOT, "runs", "bench", "cost_vs_k", name)),
        ])

    configs = {f"k={k}": config(f"k{k}", "fixed", [k]) for k in ks}
    configs["layerwise {2,4,6}"] = config("layerwise", "layerwise", [2, 4, 6])
    if "k=4" not in configs:
        configs["k=4"] = config("k4", "fixed", [4])
    single_process(next(iter(configs.values())))
    first = Trainer(next(iter(configs.values())))
    data = first._ensure_datasets()
    trainers = {name: (first if i == 0 else Trainer(c, vocab_size=first.vocab_size, datasets=data))
                for i, (name, c) in enumerate(configs.items())}
    vocab = first.vocab_size
    cfg0 = next(iter(configs.values()))
    tokens = cfg0.train.global_batch_size * cfg0.data.seq_length

    # Forward (inference) at each k on one model: the elastic model's serving cost.
    server = trainers["layerwise {2,4,6}"].engine.module
    batch = first.microbatches(0)[0]
    fwd = {k: [] for k in ks}
    step_time = {name: [] for name in trainers}
    with torch.no_grad():
        server.eval()
        for r in range(steps):
            for k in ks:
                set_topk(server, k)
                start = time.perf_counter()
                server(batch["tokens"], batch["position_ids"], first.mask)
                if r >= args.warmup:
                    fwd[k].append(time.perf_counter() - start)
        server.train()
    for step in range(steps):
        batches = first.microbatches(step)
        names = list(trainers) if step % 2 == 0 else list(reversed(trainers))
        for name in names:
            start = time.perf_counter()
            trainers[name].train_step(step, batches)
            if step >= args.warmup:
                step_time[name].append(time.perf_counter() - start)

    mb_tokens = batch["tokens"].numel()
    rows, data_out = [], {"ks": ks, "rows": []}
    for k in ks:
        flops = flops_per_token(cfg0, vocab, k)
        f, t = spread(fwd[k]), spread(step_time[f"k={k}"])
        rows.append((k, flops, f["median"], t["median"]))
        data_out["rows"].append({"k": k, "flops_per_token": flops, "forward_s": f, "train_step_s": t})
    base = rows[0]
    slope_f, icpt_f, r2_f = fit([r[1] for r in rows], [r[2] for r in rows])
    slope_t, icpt_t, r2_t = fit([r[1] for r in rows], [r[3] for r in rows])
    lw, fixed4 = spread(step_time["layerwise {2,4,6}"]), spread(step_time["k=4"])
    mean_flops = sum(flops_per_token(cfg0, vocab, k) for k in (2, 4, 6)) / 3
    data_out.update(fit_forward={"slope": slope_f, "intercept": icpt_f, "r2": r2_f},
                    fit_train={"slope": slope_t, "intercept": icpt_t, "r2": r2_t},
                    layerwise_246_s=lw, fixed_4_s=fixed4)
    lines = [
        f"Model: {cfg0.model.num_layers} layers, hidden {args.hidden}, {args.experts} experts of FFN "
        f"{args.expert_ffn}, vocab {vocab}; forward of one micro-batch ({mb_tokens} tokens) and a full "
        f"training step ({tokens} tokens), medians of {args.rounds} interleaved rounds, {args.threads} thread(s).",
        "",
        "| k | forward MFLOP/token | FLOPs vs k=1 | forward ms | forward time vs k=1 | train step ms | step time vs k=1 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, flops, f, t in rows:
        lines.append(f"| {k} | {flops / 1e6:.2f} | {flops / base[1]:.2f} | {f * 1e3:.1f} | {f / base[2]:.2f} | "
                     f"{t * 1e3:.1f} | {t / base[3]:.2f} |")
    lines += [
        "",
        f"Least-squares fit of time against FLOPs per token: forward R^2 = {r2_f:.3f}, training step "
        f"R^2 = {r2_t:.3f}; the fixed part (intercept at 0 FLOPs) is {icpt_f / rows[-1][2]:.0%} of the "
        f"forward time at k={ks[-1]} (dispatch, norms, attention softmax and framework overhead "
        "that FLOPs do not count).",
        "",
        f"Layer-wise random k from {{2, 4, 6}} (mean 4, {mean_flops / 1e6:.2f} MFLOP/token expected): "
        f"median step {lw['median'] * 1e3:.1f} ms vs {fixed4['median'] * 1e3:.1f} ms at fixed k=4 "
        f"(ratio {lw['median'] / fixed4['median']:.3f}, p10-p90 of the elastic model "
        f"{lw['p10'] * 1e3:.1f}-{lw['p90'] * 1e3:.1f} ms).",
    ]
    _plot(rows, os.path.join(RESULTS, "cost_vs_k.png"))
    lines += ["", "![cost vs k](bench/results/cost_vs_k.png)"]
    write_result("cost_vs_k", "Cost against k", "\n".join(lines), data_out)
    return 0


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    flops = [r[1] / 1e6 for r in rows]
    ax.plot(flops, [r[2] / rows[0][2] for r in rows], marker="o", label="forward time")
    ax.plot(flops, [r[3] / rows[0][3] for r in rows], marker="s", label="training step time")
    ax.plot(flops, [r[1] / rows[0][1] for r in rows], linestyle="--", color="grey", label="FLOPs")
    for r, x in zip(rows, flops):
        ax.annotate(f"k={r[0]}", (x, r[1] / rows[0][1]), fontsize=7)
    ax.set_xlabel("forward MFLOP per token")
    ax.set_ylabel("relative to k = 1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
