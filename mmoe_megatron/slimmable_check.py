"""GPU check: the grouped-GEMM (Transformer Engine) slimmable experts against the local path.

    python -m mmoe_megatron.slimmable_check [--dtype bfloat16|float32] [--tokens 4096]

`grouped_parity_check()` builds `SlimmableSequentialMLP` (megatron-core's local linears) and
`SlimmableTEGroupedMLP` (Transformer Engine's grouped GEMM) with the same weights on one CUDA
device and compares outputs and weight gradients on the same dispatched rows at full width, at one
narrower width, and with a width level per row (the level column the MoE layer dispatches). It
needs CUDA and Transformer Engine; without them it reports why it did not run (`ok` None).
The command prints the result as JSON and exits 0 when the paths agree, 1 when they do not,
2 when the check could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# Relative error (max |a - b| / max |b|) allowed between two GEMM implementations of the same
# sums: fp32 accumulates in another order; bf16 also rounds the inputs of the second GEMM.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def _skip(reason: str) -> dict:
    return {"ok": None, "skipped": reason}


def _init_single_process() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mmoe_megatron.distributed import free_port

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(0)  # Transformer Engine layers use its RNG tracker


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def grouped_parity_check(num_experts: int = 8, hidden: int = 256, ffn: int = 512, tokens: int = 4096,
                         widths=(0.25, 0.5, 0.75, 1.0), dtype: str = "bfloat16", seed: int = 0) -> dict:
    """{"ok": bool | None, "cases": {case: {output, grad_fc1, grad_fc2 relative errors}}, ...}."""
    from mmoe_megatron import extras

    if not torch.cuda.is_available():
        return _skip("needs a CUDA device (the grouped path runs Transformer Engine's grouped GEMM)")
    if not extras.have_transformer_engine():
        return _skip("needs Transformer Engine (transformer_engine.pytorch) importable with its CUDA libraries")
    import torch.nn.functional as F
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mmoe_megatron.slimmable import SlimmableSequentialMLP, SlimmableTEGroupedMLP

    _init_single_process()
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=max(1, hidden // 64), ffn_hidden_size=ffn,
        moe_ffn_hidden_size=ffn, num_moe_experts=num_experts, moe_router_topk=2, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False, moe_grouped_gemm=True,
        bf16=dtype == "bfloat16", params_dtype=torch_dtype, perform_initialization=False,
    )
    pg = get_default_pg_collection()
    _, local_sub = LocalSpecProvider().grouped_mlp_modules(False, False)
    _, te_sub = TESpecProvider().grouped_mlp_modules(True, False)
    local = SlimmableSequentialMLP(num_experts, config, local_sub, pg, widths=widths).cuda()
    grouped = SlimmableTEGroupedMLP(num_experts, config, te_sub, pg, widths=widths).cuda()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for e, expert in enumerate(local.local_experts):
            fc1 = (torch.randn(2 * ffn, hidden, generator=gen) * 0.02).to(torch_dtype)
            fc2 = (torch.randn(hidden, ffn, generator=gen) * 0.02).to(torch_dtype)
            expert.linear_fc1.weight.copy_(fc1)
            expert.linear_fc2.weight.copy_(fc2)
            getattr(grouped.linear_fc1, f"weight{e}").copy_(fc1)
            getattr(grouped.linear_fc2, f"weight{e}").copy_(fc2)
    counts = torch.multinomial(torch.ones(num_experts), tokens, replacement=True, generator=gen).bincount(
        minlength=num_experts)
    x_NH = torch.randn(tokens, hidden, generator=gen).to(torch_dtype).cuda()
    probs_N = torch.rand(tokens, generator=gen).cuda()
    levels_N = torch.randint(1, len(widths) + 1, (tokens,), generator=gen)
    grad_out = torch.randn(tokens, hidden, generator=gen).to(torch_dtype).cuda()

    cases = {}
    for case in ("full width", f"width {widths[len(widths) // 2 - 1]:g}", "width per row"):
        results = []
        for module in (local, grouped):
            module.zero_grad(set_to_none=True)
            if case == "width per row":
                module.set_token_levels(torch.ones(1, 1, dtype=torch.long))
                x = torch.cat([x_NH, levels_N[:, None].to(x_NH.dtype).cuda()], dim=1)
                out = module(x, counts, probs_N)[0][:, :-1]
            else:
                module.set_width(1.0 if case == "full width" else widths[len(widths) // 2 - 1])
                out = module(x_NH, counts, probs_N)[0]
            out.backward(grad_out)
            if module is local:
                g1 = torch.stack([m.linear_fc1.weight.grad for m in local.local_experts])
                g2 = torch.stack([m.linear_fc2.weight.grad for m in local.local_experts])
            else:
                g1 = torch.stack([getattr(grouped.linear_fc1, f"weight{e}").grad for e in range(num_experts)])
                g2 = torch.stack([getattr(grouped.linear_fc2, f"weight{e}").grad for e in range(num_experts)])
            results.append((out.detach(), g1, g2))
        (a, a1, a2), (b, b1, b2) = results
        cases[case] = {"output": _relative_error(b, a), "grad_fc1": _relative_error(b1, a1),
                       "grad_fc2": _relative_error(b2, a2)}
    worst = max(v for c in cases.values() for v in c.values())
    return {"ok": worst <= TOLERANCE[dtype], "tolerance": TOLERANCE[dtype], "worst": worst, "cases": cases,
            "dtype": dtype, "device": torch.cuda.get_device_name(0),
            "shape": {"experts": num_experts, "hidden": hidden, "ffn": ffn, "tokens": tokens}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = grouped_parity_check(tokens=args.tokens, dtype=args.dtype)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return {True: 0, False: 1, None: 2}[result["ok"]]


if __name__ == "__main__":
    sys.exit(main())
