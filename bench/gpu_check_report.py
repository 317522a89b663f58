"""The Markdown section of the GPU check (RESULTS.md), from what `bench.gpu_check` recorded."""

from __future__ import annotations

from bench import gpu_check_runs as runs


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def markdown(check) -> str:
    env, setup = check.env, check.setup
    failures = check.failures()
    spec = "Transformer Engine" + (" with grouped GEMM" if env.get("grouped_gemm") else "") \
        if check.backend["model.backend"] == "transformer_engine" else "the local megatron-core layer spec"
    lines = [
        f"**Verdict: {'passed' if not failures else 'FAILED'}** ({len(check.outcomes)} checks, "
        f"{len(failures)} failed, {check.data()['elapsed_s']:.0f} s). "
        f"Device: {env.get('device')}; torch {env.get('torch')} (CUDA {env.get('cuda')}), megatron-core "
        f"{env.get('megatron_core')}, DeepSpeed {env.get('deepspeed')}.",
        "",
        f"- Layer spec measured: {spec}."
        + ("" if env.get("transformer_engine") else
           " Transformer Engine is not installed here, so its parity and speed are not measured."),
        f"- Grouped GEMM: {env.get('grouped_gemm_note')}.",
    ]
    if setup.mode != "gpu":
        lines.append("- Run on CPU with a tiny model: this tests the check itself; timings are not judged.")
    for o in failures:
        lines.append(f"- **{o.status}** `{o.name}`: {o.detail}")

    if check.parity:
        lines += ["", "Parity against the local spec in fp32 on the same device, tokens and weights (init std "
                  "1/sqrt(hidden); slimmable experts, full width except in the last two cases), every MoE layer "
                  "routed to the experts the reference chose (route replay); differences in nats and as a "
                  "share of the spread of the reference's "
                  f"per-token losses (tolerance: mean {runs.MEAN_LOSS_TOL:.0%}, per token {runs.TOKEN_LOSS_TOL:.0%}). "
                  "Beside it, not judged: the per-token difference with the candidate's own routing, and the "
                  "share of tokens it ranks as the reference does in the first and the last MoE layer (bf16 "
                  "rounding flips near-tied rankings; a flip changes the token and, through attention, the "
                  "tokens after it, and the flips compound over the layers):", "",
                  "| candidate (bf16) | k or case | reference loss | candidate loss | token loss spread | mean diff | "
                  "per-token diff | within | own routing: per-token diff | ranked as the reference, first / last layer |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
        for r in check.parity:
            own, same = r.get("own_routing"), r.get("routes_identical")
            lines.append(f"| {r['candidate']} | {r['case']} | {r['reference_loss']:.4f} | {r['candidate_loss']:.4f} | "
                         f"{r['token_loss_spread']:.3f} | {r['mean_loss_diff']:.1e} ({r['mean_rel']:.1%}) | "
                         f"{r['token_loss_diff']:.1e} ({r['token_rel']:.1%}) | {'yes' if r['passed'] else '**no**'} | "
                         + (f"{own['token_loss_diff']:.1e} ({own['token_rel']:.1%}) | {same[0]:.1%} / {same[-1]:.1%} |"
                            if own is not None else "- | - |"))

    if check.training:
        first = next(iter(check.training.values()))
        lines += ["", f"Training, bf16, {setup.steps} steps per run ({setup.warmup} untimed), "
                  f"{first['tokens_per_step']:,} tokens per step; MFU = tokens/s x 3 x forward FLOPs per "
                  f"token (config/derive.py) / {_fmt(check.data()['peak_tflops'], '.0f')} TFLOP/s:", "",
                  "| run | k | step (ms, median) | tokens/s | MFU | peak memory (GiB) | loss first -> last |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in check.training.values():
            lines.append(f"| {r['variant']} | {r['k']:g} | {r['step_s_median'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{_fmt(r['mfu'], '.1%')} | {_fmt(r['peak_memory_gib'], '.1f')} | "
                         f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")

    verdicts = [o for o in check.outcomes if o.name.startswith("verdict:")]
    if verdicts:
        lines += ["", "| verdict | status | detail |", "|---|---|---|"]
        lines += [f"| {o.name.split(':', 1)[1]} | {o.status} | {o.detail} |" for o in verdicts]
    return "\n".join(lines)
