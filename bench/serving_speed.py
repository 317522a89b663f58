"""Serving speed against k: vLLM (CPU) output tokens/s and time to first token of one export served
at k = 1..k_max and at a per-layer budget, next to the FLOPs per token of each setting.

    python -m bench.serving_speed [--ks 1,2,3,4] [--budget 1,2,3,4] [--prompts 256] [--prompt-len 32]
        [--new-tokens 32] [--repeats 3] [--hidden 512] [--experts 8] [--expert-ffn 2048] [--quick]
    python -m bench.serving_speed --expert-ffn 4096 --name serving_speed_ffn4096   # experts twice as wide

The model has random weights (megatron's initialisation, seeded; routing is then close to uniform
over experts, which is what the timing needs) and is exported through the project's exporter. It
is sized so that the experts dominate the FLOPs: 4 MoE layers, hidden 512, 8 heads of 64
(2 key/value groups), 8 experts of width 2048, a 512-token vocabulary. vLLM runs in the serving
venv (`make serving-setup`), one engine per setting (k is fixed when an engine starts), fp32,
eager mode; every setting answers the same batch of prompts, all submitted at once, with exactly
--new-tokens greedy tokens each. Why a large batch: at batch 1 a decode step reads every expert a
token touches from memory and the weight reads, not the FLOPs, set the time; with hundreds of
tokens per step each expert's matrix multiply serves many tokens and the arithmetic dominates.
The load average is recorded: timings on a busy machine are not results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench.common import ROOT, single_process, write_result

SERVING_PYTHON = os.path.join(os.environ.get("MMOE_SERVING_VENV", os.path.join(ROOT, ".venv-serving")),
                              "bin", "python")
WORKER = os.path.join(ROOT, "bench", "serving_worker.py")
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--ks", default="1,2,3,4", help="uniform ks to serve at (the largest is k_max)")
    p.add_argument("--budget", default="1,2,3,4", help="a per-layer k vector, one k per MoE layer")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quick", action="store_true",
                   help="a small check of the script (hidden 128, 16 prompts): its numbers are not results")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "serving_speed"))
    p.add_argument("--name", default="serving_speed",
                   help="results record bench/results/<name>.json; another name keeps a second model size beside the first")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.heads, args.groups, args.expert_ffn = 128, 4, 2, 256
        args.prompts, args.prompt_len, args.new_tokens, args.repeats = 16, 16, 8, 1
    return args


def model_config(args):
    from mmoe_megatron.config import load_config

    ks = [int(k) for k in args.ks.split(",")]
    overrides = [
        ("model.num_layers", args.layers), ("model.hidden_size", args.hidden),
        ("model.num_attention_heads", args.heads), ("model.num_query_groups", args.groups),
        ("model.ffn_hidden_size", 4 * args.hidden), ("model.vocab_size", args.vocab),
        ("moe.num_experts", args.experts), ("moe.expert_ffn_hidden_size", args.expert_ffn), ("moe.layer_freq", 1),
        ("matryoshka.ks", ks), ("matryoshka.eval_ks", [max(ks)]), ("data.mock", True),
        ("data.seq_length", args.prompt_len + args.new_tokens), ("logging.dir", args.out),
    ]
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides), ks


def export_random_model(cfg, budget: list[int], out_dir: str) -> str:
    """The model with its seeded initial weights, exported as Qwen3-MoE with the budget recorded."""
    from mmoe_megatron.export.convert import export_to_hf
    from mmoe_megatron.model import build_model, named_global_parameters

    single_process(cfg)
    model = build_model(cfg, cfg.model.vocab_size)
    weights = {name: p.detach() for name, p in named_global_parameters(model, cfg)}
    path = os.path.join(out_dir, "export")
    export_to_hf(cfg, weights, path, k=cfg.matryoshka.k_max, layer_budgets={"budget": budget})
    return path


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isfile(SERVING_PYTHON):
        print(f"no serving venv ({SERVING_PYTHON}): run `make serving-setup` first", file=sys.stderr)
        return 2
    import torch

    from mmoe_megatron.config.derive import flops_per_token

    cfg, ks = model_config(args)
    budget = [int(k) for k in args.budget.split(",")]
    load_before = os.getloadavg()
    export = export_random_model(cfg, budget, args.out)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
    settings = {f"k={k}": ({"num_experts_per_tok": k}, k) for k in ks}
    settings[f"budget {budget}"] = ({"architectures": ["MatryoshkaQwen3MoeForCausalLM"],
                                     "matryoshka_budget": "budget"}, budget)
    spec = {"model": export, "dtype": args.dtype, "prompts": prompts, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "engines": [{"name": n, "hf_overrides": o} for n, (o, _) in settings.items()]}
    spec_path, out_path = os.path.join(args.out, "spec.json"), os.path.join(args.out, "timings.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    subprocess.run([SERVING_PYTHON, WORKER, spec_path, out_path], check=True, cwd=ROOT,
                   env={**os.environ, **ENGINE_ENV})
    with open(out_path) as f:
        timings = json.load(f)
    load_after = os.getloadavg()

    k_max = max(ks)
    rows = []
    for name, (_, k) in settings.items():
        runs = timings[name]["runs"]
        rows.append({"setting": name, "k": k, "flops_per_token": flops_per_token(cfg, args.vocab, k),
                     "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in runs),
                     "ttft_median_s": statistics.median(r["ttft_median_s"] for r in runs),
                     "engine_start_s": timings[name]["engine_start_s"], "runs": runs})
    top = next(r for r in rows if r["k"] == k_max)
    for r in rows:
        r["speedup_vs_kmax"] = r["output_tokens_per_s"] / top["output_tokens_per_s"]
        r["flops_ratio_vs_kmax"] = top["flops_per_token"] / r["flops_per_token"]
    k1 = next(r for r in rows if r["k"] == min(ks))
    gap = k1["speedup_vs_kmax"] / k1["flops_ratio_vs_kmax"] - 1
    lines = [
        f"vLLM {args.dtype} on CPU, one export (random weights; {args.layers} MoE layers, hidden {args.hidden}, "
        f"{args.heads} heads, {args.experts} experts of width {args.expert_ffn}, vocabulary {args.vocab}), "
        f"{args.prompts} prompts of {args.prompt_len} tokens submitted at once, {args.new_tokens} greedy tokens "
        f"each; median of {args.repeats} runs per setting. Load average before / after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f}.", "",
        "| setting | forward MFLOP/token | FLOPs ratio k_max / setting | output tokens/s | speed-up vs k_max "
        "| time to first token (median) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['flops_per_token'] / 1e6:.1f} | {r['flops_ratio_vs_kmax']:.2f}x | "
                     f"{r['output_tokens_per_s']:.1f} | {r['speedup_vs_kmax']:.2f}x | {r['ttft_median_s']:.2f} s |")
    lines += ["", f"k={min(ks)} against k={k_max}: {k1['speedup_vs_kmax']:.2f}x the throughput for "
                  f"{k1['flops_ratio_vs_kmax']:.2f}x fewer FLOPs per token ({gap:+.0%} from the FLOPs ratio; "
                  f"goal: within 20%)."]
    data = {"config": vars(args), "load_average_before": load_before, "load_average_after": load_after,
            "rows": rows, "throughput_vs_flops_gap": gap}
    if args.quick:
        print("\n".join(lines))
        print("--quick: not written to bench/results")
        return 0
    title = "Serving speed against k (vLLM, CPU)"
    if args.name != "serving_speed":
        title += f": experts of width {args.expert_ffn}, hidden {args.hidden}"
    write_result(args.name, title, "\n".join(lines), data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
