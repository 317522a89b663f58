"""Hugging Face Qwen3-MoE -> megatron-core global weights and an experiment config (the inverse
of `qwen3_moe`, whose docstring holds the parameter mapping), for continued pretraining.

Accepted: Qwen's per-expert keys and transformers 5's fused `mlp.experts.gate_up_proj` [E, 2I, H]
/ `down_proj` [E, H, I]. Refused (ExportError naming the config.json field): other model types,
non-SiLU activations, attention biases, sliding windows, scaled rotary.
An export of a model with learned gate temperatures imports with its gates as written (the
temperature of its serving k folded in) and no temperatures; an elastic continued run learns them
again (`matryoshka.gate_temperature: auto`), starting at 1; learned gains likewise stay folded
in the experts' down projections at the serving k. Its experts train at full width only
(`matryoshka.widths: [1.0]`): Qwen's expert columns are not nested prefixes.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

import torch

from mmoe_megatron.export.qwen3_moe import ExportError, check_complete, dims_from_hf, fuse_qkv, num_experts_of


def check_importable(hf: Mapping) -> None:
    """Raise ExportError for a Qwen3-MoE config.json setting the megatron model cannot express."""
    if hf.get("model_type") != "qwen3_moe":
        raise ExportError(f"model_type={hf.get('model_type')!r}: only qwen3_moe checkpoints are imported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act={hf['hidden_act']!r}: the megatron experts are SwiGLU (silu) only")
    if hf.get("attention_bias"):
        raise ExportError("attention_bias=true: the megatron model has no biases in its linear layers")
    if hf.get("use_sliding_window"):
        raise ExportError("use_sliding_window=true: sliding-window attention is not supported; "
                          "every layer of the megatron model attends to the full context")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportError(
            f"rope_parameters.rope_type={rope_type!r}: only plain rotary (rope_type default) is "
            "supported; remove the rope scaling"
        )
    theta = _rope_theta(hf)
    if theta != int(theta):
        raise ExportError(f"rope_theta={theta}: model.rotary_base takes an integer base")
    num_experts_of(hf)


def _rope_theta(hf: Mapping) -> float:
    rope = hf.get("rope_parameters") or {}
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def from_hf_state_dict(
    hf: Mapping, hf_sd: Mapping[str, torch.Tensor], te_names: bool = False,
) -> dict[str, torch.Tensor]:
    """megatron global weights from HF Qwen3-MoE weights (per-expert keys, or transformers 5's
    fused `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I]).

    `te_names`: name the layer norms as the Transformer Engine layer spec does (fused into
    linear_qkv and the dense linear_fc1); otherwise as megatron's local spec.
    """
    check_importable(hf)
    dims = dims_from_hf(hf)
    sd = dict(_unfuse_experts(hf_sd, dims))
    if dims.tied:
        sd.pop("lm_head.weight", None)  # a tied checkpoint may still store the shared tensor
    check_complete(sd, dims, "the Hugging Face checkpoint")
    out = {
        "embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": sd["model.norm.weight"],
    }
    if not dims.tied:
        out["output_layer.weight"] = sd["lm_head.weight"]
    for n in range(dims.num_layers):
        p, q = f"model.layers.{n}.", f"decoder.layers.{n}."
        input_norm = "self_attention.linear_qkv.layer_norm_weight" if te_names else "input_layernorm.weight"
        out[q + input_norm] = sd[p + "input_layernorm.weight"]
        out[q + "self_attention.linear_qkv.weight"] = fuse_qkv(
            *(sd[f"{p}self_attn.{proj}_proj.weight"] for proj in "qkv"), dims)
        out[q + "self_attention.q_layernorm.weight"] = sd[p + "self_attn.q_norm.weight"]
        out[q + "self_attention.k_layernorm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[q + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        if dims.moe_pattern[n]:
            # The TE spec keeps a separate pre-MLP norm in MoE layers (gpt_layer_specs.py).
            out[q + "pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
            out[q + "mlp.router.weight"] = sd[p + "mlp.gate.weight"]
            for e in range(dims.num_experts):
                x = f"{p}mlp.experts.{e}."
                y = f"{q}mlp.experts.local_experts.{e}."
                out[y + "linear_fc1.weight"] = torch.cat([sd[x + "gate_proj.weight"], sd[x + "up_proj.weight"]])
                out[y + "linear_fc2.weight"] = sd[x + "down_proj.weight"]
        else:
            post_norm = "mlp.linear_fc1.layer_norm_weight" if te_names else "pre_mlp_layernorm.weight"
            out[q + post_norm] = sd[p + "post_attention_layernorm.weight"]
            out[q + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            out[q + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _unfuse_experts(hf_sd: Mapping[str, torch.Tensor], dims: Dims):
    fused = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$")
    for name, value in hf_sd.items():
        m = fused.match(name)
        if m is None:
            yield name, value
        elif m.group(2) == "gate_up_proj":  # [E, 2I, H]; modeling_qwen3_moe: gate, up = chunk(2)
            for e in range(value.shape[0]):
                gate, up = torch.chunk(value[e], 2, dim=0)
                yield f"{m.group(1)}{e}.gate_proj.weight", gate
                yield f"{m.group(1)}{e}.up_proj.weight", up
        else:  # [E, H, I]
            for e in range(value.shape[0]):
                yield f"{m.group(1)}{e}.down_proj.weight", value[e]


def experiment_sections(hf: Mapping, ks: Optional[Sequence[int]] = None) -> dict:
    """The model, moe and matryoshka sections of an ExperimentConfig for a Qwen3-MoE config.json.

    `ks`: the Matryoshka training range; default 1..num_experts_per_tok (at least 1..2, since
    top-k-then-softmax cannot train a k_max = 1 model). The vocabulary is taken as it is: the
    padding multiple is chosen so that megatron adds no rows.
    """
    check_importable(hf)
    dims = dims_from_hf(hf)
    vocab = int(hf["vocab_size"])
    k = int(hf.get("num_experts_per_tok", 1))
    norm_topk = bool(hf.get("norm_topk_prob", False))
    if ks is None:
        ks = list(range(1, max(k, 2 if norm_topk else 1) + 1))
    pattern = list(dims.moe_pattern)
    return {
        "model": {
            "num_layers": dims.num_layers, "hidden_size": dims.hidden_size,
            "num_attention_heads": dims.num_heads, "num_query_groups": dims.num_groups,
            "ffn_hidden_size": int(hf.get("intermediate_size") or 4 * dims.hidden_size),
            "kv_channels": dims.head_dim, "vocab_size": vocab,
            # padded_vocab_size rounds up to a multiple of this: a divisor of the vocabulary adds
            # no rows (with tensor parallelism the vocabulary must also divide by 128 x TP).
            "make_vocab_size_divisible_by": math.gcd(vocab, 128),
            "normalization": "RMSNorm", "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
            "qk_layernorm": True, "rotary_base": int(_rope_theta(hf)),
            "init_method_std": float(hf.get("initializer_range", 0.02)),
            "tie_embeddings": dims.tied, "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        },
        "moe": {
            "num_experts": dims.num_experts,
            "expert_ffn_hidden_size": int(hf["moe_intermediate_size"]),
            "layer_freq": 1 if all(pattern) else pattern,
            "aux_loss_coeff": float(hf.get("router_aux_loss_coef", 1e-2)),
        },
        "matryoshka": {
            "ks": sorted(set(int(x) for x in ks)),
            "normalization": "topk_softmax" if norm_topk else "softmax_topk",
            # The imported experts' columns are not ordered as nested prefixes: continued
            # training at narrower widths would start from broken experts. Set widths to train
            # them slimmable anyway.
            "widths": [1.0],
        },
    }
