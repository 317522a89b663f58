"""Router overhead: training-step time of the Matryoshka router against megatron-core's stock
TopKRouter at the same fixed k, on the same model, weights and data (the real demo corpus).

    python -m bench.router_overhead [--steps 40] [--k 2] [--experts 16]

Both models live in one process and their steps are interleaved (A B B A ...), so drift in
machine load hits both alike; the result is the per-pair time ratio with its spread.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import ROOT, single_process, spread, write_result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    p.add_argument("--steps", type=int, default=40, help="timed step pairs")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args, rest = p.parse_known_args(argv)
    torch.set_num_threads(args.threads)

    from mmoe_megatron.config import load_config, parse_overrides
    from mmoe_megatron.training.trainer import Trainer

    overrides = [
        ("model.hidden_size", args.hidden), ("model.ffn_hidden_size", 4 * args.hidden),
        ("moe.num_experts", args.experts), ("moe.expert_ffn_hidden_size", args.hidden),
        ("matryoshka.strategy", "fixed"), ("matryoshka.ks", [args.k]), ("matryoshka.eval_ks", [args.k]),
        ("train.train_iters", args.warmup + args.steps), ("train.eval_interval", 0),
        ("optimizer.warmup_iters", 1),
        ("checkpoint.save_interval", 0), ("logging.tensorboard", False),
        ("logging.dir", os.path.join(ROOT, "runs", "bench", "router_overhead")),
    ] + parse_overrides(rest)
    cfg = load_config(args.config, overrides)
    single_process(cfg)
    ours = Trainer(cfg)
    stock = Trainer(cfg, vocab_size=ours.vocab_size, datasets=ours._ensure_datasets(), stock_routing=True)

    def timed(trainer, step, batches):
        start = time.perf_counter()
        out = trainer.train_step(step, batches)
        return time.perf_counter() - start, out["loss"]

    ratios, t_ours, t_stock, loss_diffs = [], [], [], []
    for step in range(args.warmup + args.steps):
        batches = ours.microbatches(step)
        order = (ours, stock) if step % 2 == 0 else (stock, ours)
        times = {}
        losses = {}
        for trainer in order:
            times[id(trainer)], losses[id(trainer)] = timed(trainer, step, batches)
        if step >= args.warmup:
            t_ours.append(times[id(ours)])
            t_stock.append(times[id(stock)])
            ratios.append(times[id(ours)] / times[id(stock)])
            loss_diffs.append(abs(losses[id(ours)] - losses[id(stock)]))

    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    r, a, b = spread(ratios), spread(t_ours), spread(t_stock)
    data = {"ratio": r, "matryoshka_s": a, "stock_s": b, "tokens_per_step": tokens, "k": args.k,
            "experts": args.experts, "hidden": args.hidden, "max_loss_difference": max(loss_diffs)}
    md = "\n".join([
        f"Model: {cfg.model.num_layers} layers, hidden {args.hidden}, {args.experts} experts, fixed k = {args.k}, "
        f"{tokens} tokens per step, fp32, {args.threads} thread(s); {args.steps} interleaved step pairs "
        f"after {args.warmup} warm-up pairs.",
        "",
        "| router | median step (ms) | p10-p90 (ms) | tokens/s (median) |",
        "|---|---:|---:|---:|",
        f"| megatron-core TopKRouter | {b['median'] * 1e3:.1f} | {b['p10'] * 1e3:.1f}-{b['p90'] * 1e3:.1f} | {tokens / b['median']:,.0f} |",
        f"| MatryoshkaRouter | {a['median'] * 1e3:.1f} | {a['p10'] * 1e3:.1f}-{a['p90'] * 1e3:.1f} | {tokens / a['median']:,.0f} |",
        "",
        f"Per-pair time ratio Matryoshka / stock: median **{r['median']:.3f}** (p10 {r['p10']:.3f}, "
        f"p90 {r['p90']:.3f}, mean {r['mean']:.3f}); overhead {100 * (r['median'] - 1):+.1f} % "
        f"(target: within 2 %). Largest per-step loss difference between the two: "
        f"{max(loss_diffs):.2e} (the same model: fixed k trains like the stock router).",
    ])
    write_result("router_overhead", "Router overhead vs stock megatron-core routing", md, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
