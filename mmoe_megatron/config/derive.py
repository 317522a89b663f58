"""Settings derived from the config tree, each by exactly one function.

* `transformer_config(cfg)`: megatron-core's `TransformerConfig` (the only place it is built).
* `padded_vocab_size(cfg, vocab)`: the embedding rows megatron allocates.
* `param_counts(cfg, vocab, k, width)`: total and active parameters at any k and expert width
  (or per-layer vectors of either).
* `flops_per_token(cfg, vocab, k, width)`: forward FLOPs per token at that point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from mmoe_megatron import extras
from mmoe_megatron.config.schema import ExperimentConfig

KSpec = Union[int, Sequence[int]]
WidthSpec = Union[float, Sequence[float], None]


def padded_vocab_size(cfg: ExperimentConfig, vocab_size: int) -> int:
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor
    return int(math.ceil(vocab_size / multiple) * multiple)


def use_transformer_engine(cfg: ExperimentConfig) -> bool:
    backend = cfg.model.backend
    if backend == "auto":
        return extras.have_transformer_engine() and torch.cuda.is_available()
    if backend == "transformer_engine" and not extras.have_transformer_engine():
        raise ValueError(
            "model.backend is transformer_engine but Transformer Engine is not importable; "
            "install it on the GPU cluster (see README, 'GPU extras') or set model.backend: local"
        )
    return backend == "transformer_engine"


def transformer_config(cfg: ExperimentConfig):
    """Build megatron-core's TransformerConfig. `moe_router_topk` is k_max and never changes."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, moe, mat = cfg.model, cfg.moe, cfg.matryoshka
    bf16 = cfg.train.precision == "bf16"
    te = use_transformer_engine(cfg)
    recompute = cfg.train.recompute
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        # SwiGLU MLPs without biases, as in Qwen3-MoE (and required by the local expert spec).
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=te,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # MoE. The router is built at k_max; the elastic k is chosen per forward by the router.
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_layer_freq=moe.layer_freq,
        moe_router_topk=mat.k_max,
        moe_router_pre_softmax=mat.normalization == "softmax_topk",
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_router_dtype=None if moe.router_dtype == "model" else moe.router_dtype,
        moe_token_dispatcher_type=moe.dispatcher,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.token_drop_policy,
        moe_grouped_gemm=moe.grouped_gemm,
        moe_permute_fusion=moe.permute_fusion,
        # Parallelism. TP > 1 with MoE requires sequence parallelism in megatron-core.
        tensor_model_parallel_size=cfg.parallel.tensor,
        pipeline_model_parallel_size=cfg.parallel.pipeline,
        expert_model_parallel_size=cfg.parallel.expert,
        sequence_parallel=cfg.parallel.tensor > 1,
        # Precision: the model is built in fp32 and DeepSpeed casts it for bf16 runs.
        bf16=bf16,
        params_dtype=torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        recompute_modules=["moe"] if recompute == "selective" else None,
    )


def _per_layer_ks(cfg: ExperimentConfig, k: KSpec) -> list[int]:
    n = cfg.num_moe_layers
    if isinstance(k, int):
        return [k] * n
    ks = list(k)
    if len(ks) != n:
        raise ValueError(f"a per-layer k vector needs {n} entries (one per MoE layer), got {ks}")
    return ks


def expert_columns(cfg: ExperimentConfig, width: WidthSpec) -> list[int]:
    """Active FFN columns of an expert in each MoE layer at `width` (full width when None)."""
    from mmoe_megatron.slimmable import width_columns

    n, ffn = cfg.num_moe_layers, cfg.moe.expert_ffn_hidden_size
    if width is None:
        return [ffn] * n
    widths = [width] * n if isinstance(width, (int, float)) else list(width)
    if len(widths) != n:
        raise ValueError(f"a per-layer width vector needs {n} entries (one per MoE layer), got {widths}")
    return [width_columns(float(w), ffn) for w in widths]


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    embedding: int
    """Input embedding (and output layer when untied) rows times hidden size."""


def param_counts(cfg: ExperimentConfig, vocab_size: int, k: KSpec | None = None,
                 width: WidthSpec = None) -> ParamCounts:
    """Parameters of the model, and those a token touches at `k` (default k_max) with its experts
    at `width` (default full): an expert at width w has 3 x hidden x (w x expert FFN) weights.

    Counts what megatron-core allocates: padded vocabulary, QK-norm weights, the router (with its
    learned temperatures), the adapters per k.
    """
    m, moe = cfg.model, cfg.moe
    h = m.hidden_size
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    head_dim = m.kv_channels or h // heads
    vocab = padded_vocab_size(cfg, vocab_size)
    norm = h if m.normalization == "RMSNorm" else 2 * h
    qk_norm = (head_dim if m.normalization == "RMSNorm" else 2 * head_dim) * 2 if m.qk_layernorm else 0
    attention = h * (heads + 2 * groups) * head_dim + heads * head_dim * h + qk_norm
    dense_mlp = 3 * h * (m.ffn_hidden_size or 4 * h)
    expert = 3 * h * moe.expert_ffn_hidden_size
    shared = 3 * h * (moe.shared_expert_ffn_hidden_size or 0)
    columns = iter(expert_columns(cfg, width))
    router = moe.num_experts * h
    if cfg.matryoshka.gate_temperature == "learned":
        router += len(cfg.matryoshka.ks)  # one log-temperature per trained k
    # The adapters per k (matryoshka.k_adapter_rank): a token passes through its k's map only
    # (a k between trained ks through its two neighbours'; counted as one).
    adapter = 2 * cfg.matryoshka.k_adapter_rank * h
    embedding = vocab * h * (1 if m.tie_embeddings else 2)

    ks = iter(_per_layer_ks(cfg, cfg.matryoshka.k_max if k is None else k))
    total = active = embedding + norm  # final norm
    for is_moe in cfg.moe_layer_pattern():
        layer = attention + 2 * norm
        if is_moe:
            total += layer + router + len(cfg.matryoshka.ks) * adapter + moe.num_experts * expert + shared
            active += layer + router + adapter + next(ks) * 3 * h * next(columns) + shared
        else:
            total += layer + dense_mlp
            active += layer + dense_mlp
    return ParamCounts(total=total, active=active, embedding=embedding)


def flops_per_token(cfg: ExperimentConfig, vocab_size: int, k: KSpec | None = None,
                    width: WidthSpec = None) -> float:
    """Forward FLOPs per token at `k` and expert `width`: 2 per active matmul weight plus causal
    attention scores.

    Training costs about three times this (forward + backward). Norms and softmax are ignored.
    """
    m = cfg.model
    counts = param_counts(cfg, vocab_size, k, width)
    # Weights a token multiplies: the active parameters minus the input-embedding lookup, plus
    # the output layer when it shares the embedding's storage (counted once in `active`).
    # Norm weights stay in; they are a rounding error.
    table = padded_vocab_size(cfg, vocab_size) * m.hidden_size
    matmul = counts.active - table + (table if m.tie_embeddings else 0)
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    # QK^T and AV over on average seq/2 previous tokens (causal), per layer and head.
    attention = 2 * 2 * m.num_layers * m.num_attention_heads * head_dim * (cfg.data.seq_length / 2)
    return float(2 * matmul + attention)
