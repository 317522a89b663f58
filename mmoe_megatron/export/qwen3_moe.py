"""megatron-core GPT MoE (global parameter names) <-> Hugging Face Qwen3-MoE (`Qwen3MoeForCausalLM`).

Why Qwen3-MoE: its router is softmax -> top-k -> renormalise iff `norm_topk_prob`, which equals
this project's `topk_softmax` (True) and `softmax_topk` (False); it has RMSNorm, per-head QK-norm
over head_dim (= megatron's `qk_layernorm`), SwiGLU experts without biases, no shared expert, and
dense layers through `mlp_only_layers`. transformers, vLLM and SGLang load it with no custom code.

Parameter mapping, layer N (megatron global name -> HF name; E a global expert number):
    embedding.word_embeddings.weight               model.embed_tokens.weight
    decoder.layers.N.input_layernorm.weight        model.layers.N.input_layernorm.weight
      (Transformer Engine spec: ...self_attention.linear_qkv.layer_norm_weight)
    ...self_attention.linear_qkv.weight [(nh + 2 ng) d, H]   self_attn.{q,k,v}_proj.weight
      rows grouped per query group g: its nh/ng query heads, then one key and one value head
    ...self_attention.{q,k}_layernorm.weight       self_attn.{q,k}_norm.weight
    ...self_attention.linear_proj.weight           self_attn.o_proj.weight
    ...pre_mlp_layernorm.weight                    post_attention_layernorm.weight
      (TE spec, dense layer: ...mlp.linear_fc1.layer_norm_weight)
    ...mlp.router.weight [E, H]                    mlp.gate.weight
    ...mlp.experts.local_experts.E.linear_fc1.weight [2I, H]  (grouped GEMM: ...experts.linear_fc1.weightE)
                                                   mlp.experts.E.gate_proj (first I rows) / up_proj (last I)
    ...mlp.experts.local_experts.E.linear_fc2.weight          mlp.experts.E.down_proj.weight
    ...mlp.linear_fc1.weight / linear_fc2.weight (dense layer)  mlp.gate_proj / up_proj / down_proj
    decoder.final_layernorm.weight                 model.norm.weight
    output_layer.weight (absent when tied)         lm_head.weight
The table reads both ways; this module exports, `qwen3_moe_import` imports. HF keys are written
per expert, the layout of Qwen's own checkpoints, which transformers (fusing
them into `gate_up_proj` on load), vLLM and SGLang all read.

Decisions:
* Vocabulary: megatron pads the embedding table (make_vocab_size_divisible_by x TP). The export
  keeps the padded rows and sets `vocab_size` to the padded size: megatron's softmax runs over the
  padded rows too, so only then do logits and log-probabilities agree exactly (Qwen's checkpoints
  also have vocab_size above the tokenizer's size). The tokenizer never produces the padded ids.
* Layer pattern: megatron's `moe.layer_freq: N` makes 0-based layer i MoE when i % N == 0, HF's
  `decoder_sparse_step: N` when (i + 1) % N == 0; the export always writes the dense layers
  explicitly (`mlp_only_layers`) with `decoder_sparse_step: 1`.
* Routing methods: the top-p and EMoE baselines differ from top-k routing only while training
  (baselines.py); evaluated, they route to exactly the forced k, which Qwen3-MoE expresses. They
  are exported at the chosen k, and the method is recorded.
* Training-only settings carry over as nothing: aux/z-loss coefficients (the aux coefficient is
  kept as `router_aux_loss_coef`), capacity factor (HF is dropless, as is megatron without one).
* Expert width (slimmable experts, `slimmable.py`): a width w < 1 exports every expert sliced to
  its first c = w x I columns (gate_proj and up_proj rows [0, c), down_proj columns [0, c)) with
  `moe_intermediate_size` = c: a plain, smaller Qwen3-MoE. One config has one
  `moe_intermediate_size`, so per-layer widths that differ are refused (`check_serving_width`);
  the vLLM plugin (`mmoe_megatron.serving`) serves per-layer k, not per-layer widths.
* Learned gate temperatures (`matryoshka.gate_temperature: learned`): a layer routing at k divides
  its selected logits by T(k), which Qwen3-MoE has no place for; logits are linear in the gate
  weight, so the export writes `mlp.gate.weight` / T(k) at the served k (the same experts are
  chosen; their weights are megatron's at that k) and records every layer's log-temperatures
  under `matryoshka.gate_temperatures`. `load_hf_model` and the vLLM plugin rescale the gates for
  any other k (`mmoe_megatron.serving.layer_ks.gate_scales`); a plain engine asked for another k
  keeps the served k's temperature.

Shape legend: H hidden, D head dim, NH query heads, NG key/value heads (query groups),
R = (NH + 2 NG) D rows of the fused QKV weight, I expert hidden width, E experts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch

from mmoe_megatron.config import ExperimentConfig
from mmoe_megatron.serving.layer_ks import GAIN_KEY, TEMPERATURE_KEY, floored_log_temperatures, log_temperature_at

KSpec = Union[int, Sequence[int]]
MATRYOSHKA_KEY = "matryoshka"
"""The config.json key recording elastic training (transformers keeps unknown keys, reads none)."""


class ExportError(ValueError):
    """A model or setting that cannot be converted between megatron and Qwen3-MoE. The message
    names the setting, why, and what would work."""


@dataclass(frozen=True)
class Dims:
    """What the conversion needs to know about the architecture, from either side's config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    num_experts: int
    moe_pattern: tuple[int, ...]
    """One 0/1 per layer; 1 = MoE layer."""
    tied: bool

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_pattern) if is_moe]


def dims_from_config(cfg: ExperimentConfig) -> Dims:
    m = cfg.model
    return Dims(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_attention_heads,
        num_groups=m.num_query_groups or m.num_attention_heads,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        num_experts=cfg.moe.num_experts, moe_pattern=tuple(cfg.moe_layer_pattern()),
        tied=m.tie_embeddings,
    )


def dims_from_hf(hf: Mapping) -> Dims:
    num_layers = int(hf["num_hidden_layers"])
    dense = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    num_experts = int(num_experts_of(hf))
    # modeling_qwen3_moe.Qwen3MoeDecoderLayer: MoE unless listed dense, and only every step-th layer.
    pattern = tuple(int(i not in dense and num_experts > 0 and (i + 1) % step == 0) for i in range(num_layers))
    heads = int(hf["num_attention_heads"])
    return Dims(
        num_layers=num_layers, hidden_size=int(hf["hidden_size"]), num_heads=heads,
        num_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        num_experts=num_experts, moe_pattern=pattern, tied=bool(hf.get("tie_word_embeddings", False)),
    )


def num_experts_of(hf: Mapping) -> int:
    # Qwen's config.json says num_experts; transformers 5 saves it as num_local_experts.
    for key in ("num_experts", "num_local_experts"):
        if hf.get(key) is not None:
            return int(hf[key])
    raise ExportError("config.json has neither num_experts nor num_local_experts: not a Qwen3-MoE config")


# --- what can be exported ------------------------------------------------------------------------


def check_exportable(cfg: ExperimentConfig) -> None:
    """Raise ExportError for the first setting Qwen3-MoE cannot express."""
    m = cfg.model
    if m.normalization != "RMSNorm":
        raise ExportError(
            f"model.normalization={m.normalization}: Qwen3-MoE uses RMSNorm everywhere and a LayerNorm "
            "(mean-centred, with a bias) is not expressible as one; train with model.normalization: RMSNorm"
        )
    if cfg.matryoshka.normalization == "nested":
        raise ExportError(
            "matryoshka.normalization=nested: Qwen3-MoE weights its top-k experts by one softmax over "
            "them (or over all experts), not by the softmax over the k_max top ones with a learned gate "
            "per block of ranks, so the model cannot be written without changing its outputs; export a "
            "model trained with topk_softmax or softmax_topk"
        )
    if cfg.matryoshka.gate_gain == "channels":
        raise ExportError(
            "matryoshka.gate_gain=channels: the experimental gains per k and channel are not exported "
            "(at one k they would fold into the experts' down projections, but the serving engines rescale "
            "for other ks by one gain per k); export a model trained with gate_gain none or learned"
        )
    if cfg.matryoshka.rank_gate != "none":
        raise ExportError(
            f"matryoshka.rank_gate={cfg.matryoshka.rank_gate}: Qwen3-MoE weights its top-k experts by one "
            "softmax over their router logits, with no offset per rank, so the experimental gates per block "
            "of ranks cannot be written without changing the model's outputs; export a model trained with "
            "rank_gate none"
        )
    if cfg.matryoshka.k_adapter_rank:
        raise ExportError(
            f"matryoshka.k_adapter_rank={cfg.matryoshka.k_adapter_rank}: the experimental adapters per k are "
            "not exported (at one k they would fold into the experts' down projections, but the serving "
            "engines have no map per k for the other ks); export a model trained with k_adapter_rank 0"
        )
    if cfg.moe.shared_expert_ffn_hidden_size is not None:
        raise ExportError(
            f"moe.shared_expert_ffn_hidden_size={cfg.moe.shared_expert_ffn_hidden_size}: Qwen3-MoE has no "
            "shared expert (its MoE layer is the routed experts alone), so the model cannot be written "
            "without dropping part of every MoE layer's output; export a model trained without one"
        )
    if not m.qk_layernorm:
        raise ExportError(
            "model.qk_layernorm=false: Qwen3-MoE always applies q_norm/k_norm (RMSNorm over head_dim), and "
            "an RMSNorm with weight 1 still rescales each head, so the model cannot be written without "
            "changing its outputs; train with model.qk_layernorm: true"
        )


def check_serving_width(cfg: ExperimentConfig, width, what: str = "width") -> int:
    """The experts' columns at `width` (a fraction, or one per MoE layer that must all be equal),
    or ExportError naming `what`."""
    from mmoe_megatron.slimmable import width_columns

    num_moe = cfg.num_moe_layers
    widths = [width] * num_moe if isinstance(width, (int, float)) and not isinstance(width, bool) else width
    if not isinstance(widths, (list, tuple)) or len(widths) != num_moe:
        raise ExportError(f"{what}={width!r}: give a fraction, or a list with one per MoE layer ({num_moe})")
    if len(set(widths)) > 1:
        raise ExportError(
            f"{what}={list(widths)}: Qwen3-MoE has one moe_intermediate_size for every layer, so "
            "experts of different widths in different layers cannot be written as one config, and "
            "the project's vLLM plugin (mmoe_megatron.serving) serves a k per layer but not a width "
            "per layer; export at one width for all layers (e.g. the narrowest or widest of these)"
        )
    try:
        return width_columns(float(widths[0]), cfg.moe.expert_ffn_hidden_size)
    except ValueError as e:
        raise ExportError(f"{what}={width!r}: {e}") from None


def check_serving_k(cfg_or_dims: Union[ExperimentConfig, Dims], k: KSpec, what: str = "k") -> list[int]:
    """The per-MoE-layer ks of a k spec, or ExportError naming `what` if Qwen3-MoE cannot route it."""
    dims = dims_from_config(cfg_or_dims) if isinstance(cfg_or_dims, ExperimentConfig) else cfg_or_dims
    num_moe = len(dims.moe_layers)
    if isinstance(k, bool) or not isinstance(k, (int, list, tuple)):
        raise ExportError(f"{what}={k!r}: give an int or a list with one int per MoE layer ({num_moe})")
    ks = [k] * num_moe if isinstance(k, int) else list(k)
    if len(ks) != num_moe:
        raise ExportError(
            f"{what}={list(ks)} has {len(ks)} entries but the model has {num_moe} MoE layers "
            f"(layers {dims.moe_layers}); give one k per MoE layer"
        )
    bad = [x for x in ks if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= dims.num_experts]
    if bad:
        raise ExportError(
            f"{what}={k}: every k must be an int in 1..{dims.num_experts} (the experts per layer); got {bad}"
        )
    return ks


# --- config.json ---------------------------------------------------------------------------------


def hf_config_dict(
    cfg: ExperimentConfig, vocab_size: int, k: int, layer_budgets: Optional[Mapping[str, Sequence[int]]] = None,
    dtype: str = "float32", special_tokens: Optional[Mapping[str, Optional[int]]] = None, width: float = 1.0,
    log_temperatures: Optional[Sequence[Sequence[float]]] = None,
    log_gains: Optional[Sequence[Sequence[float]]] = None,
) -> dict:
    """The Qwen3-MoE config.json for a megatron config, served at `k` experts per token with the
    experts at `width` of their FFN.

    `vocab_size` is the padded embedding size; `layer_budgets` (name -> one k per MoE layer,
    i.e. budgets.json), the training range and the learned gate temperatures (`log_temperatures`,
    from `gate_log_temperatures`; folded at `k` by `to_hf_state_dict`) and gains (`log_gains`,
    from `gate_log_gains`, folded the same way) are recorded under the `matryoshka` key.
    """
    columns = check_serving_width(cfg, width)
    check_exportable(cfg)
    dims = dims_from_config(cfg)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ExportError(
            f"k={k!r}: num_experts_per_tok is one int for all layers; record per-layer vectors as "
            "layer budgets (budgets.json) and load them with load_hf_model(path, k=name)"
        )
    check_serving_k(dims, k, "k")
    budgets = {name: check_serving_k(dims, list(v), f"layer budget {name!r}")
               for name, v in (layer_budgets or {}).items()}
    m, moe, mat = cfg.model, cfg.moe, cfg.matryoshka
    theta = float(m.rotary_base)
    out = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": int(vocab_size),
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size or 4 * m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": dims.num_groups,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        # The context the model was trained on; serving engines take it as their default limit
        # (rotary itself has none).
        "max_position_embeddings": cfg.data.seq_length,
        "initializer_range": m.init_method_std,
        "rms_norm_eps": m.norm_epsilon,
        "use_cache": True,
        "tie_word_embeddings": m.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,  # the pre-transformers-5 spelling, read by older serving engines
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, is_moe in enumerate(dims.moe_pattern) if not is_moe],
        "moe_intermediate_size": columns,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": int(k),
        "norm_topk_prob": mat.normalization == "topk_softmax",
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out[name] = (special_tokens or {}).get(name)
    out[MATRYOSHKA_KEY] = matryoshka_record(cfg, k, budgets, columns / moe.expert_ffn_hidden_size,
                                            log_temperatures, log_gains)
    return out


def matryoshka_record(cfg: ExperimentConfig, k: int, budgets: Mapping[str, list[int]], width: float = 1.0,
                      log_temperatures: Optional[Sequence[Sequence[float]]] = None,
                      log_gains: Optional[Sequence[Sequence[float]]] = None) -> dict:
    """How the model was trained to be elastic, and the per-layer budgets found for it."""
    mat = cfg.matryoshka
    num_moe = cfg.num_moe_layers
    if (mat.gate_temperature == "learned") != (log_temperatures is not None):
        raise ExportError(
            f"matryoshka.gate_temperature={mat.gate_temperature} but "
            f"{'no' if log_temperatures is None else 'some'} learned temperatures were given; pass "
            "gate_log_temperatures(cfg, weights) of the checkpoint being exported")
    if (mat.gate_gain == "learned") != (log_gains is not None):
        raise ExportError(
            f"matryoshka.gate_gain={mat.gate_gain} but {'no' if log_gains is None else 'some'} learned "
            "gains were given; pass gate_log_gains(cfg, weights) of the checkpoint being exported")
    # The learned values per k, folded at `k` into the weights, recorded for rescaling to other ks.
    per_k = {key: {"trained_ks": list(mat.ks), "folded_ks": [int(k)] * num_moe,
                   field: [[float(x) for x in layer] for layer in values]}
             for key, field, values in ((TEMPERATURE_KEY, "log_temperatures", log_temperatures),
                                        (GAIN_KEY, "log_gains", log_gains)) if values is not None}
    widths = {} if not mat.elastic_width and width == 1.0 else {
        "trained_widths": list(mat.widths), "serving_width": width,
        "full_moe_intermediate_size": cfg.moe.expert_ffn_hidden_size}
    return {**widths, **per_k,
        "method": mat.method,
        "strategy": mat.strategy,
        "trained_ks": list(mat.ks),
        "k_min": min(mat.ks),
        "k_max": mat.k_max,
        "distribution": mat.distribution,
        "normalization": mat.normalization,
        "serving_k": int(k),
        "moe_layers": dims_from_config(cfg).moe_layers,
        "layer_budgets": {name: list(v) for name, v in budgets.items()},
        "usage": ("any k in 1..num_experts: from_pretrained(path, num_experts_per_tok=k); per MoE layer: "
                  "set model.model.layers[i].mlp.gate.top_k (mmoe_megatron.export.load_hf_model)"
                  if log_temperatures is None and log_gains is None else
                  "mmoe_megatron.export.load_hf_model(path, k) for any k or one k per MoE layer: it also "
                  "rescales the gates by the learned temperatures (gate_temperatures) and the experts' "
                  "down projections by the learned gains (gate_gains); from_pretrained with another "
                  "num_experts_per_tok keeps those of serving_k"),
    }


# --- megatron -> HF weights ------------------------------------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.(\d+)\.linear_(fc[12])\.weight|linear_(fc[12])\.weight(\d+))$")
_SIMPLE_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_SIMPLE_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def split_qkv(qkv_RH: torch.Tensor, dims: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused [(NH + 2 NG) D, H] -> q [NH D, H], k [NG D, H], v [NG D, H].
    Per query group the rows are its NH/NG query heads, then its key head, then its value head
    (attention.py get_query_key_value_tensors)."""
    per_group = dims.num_heads // dims.num_groups
    d, h = dims.head_dim, qkv_RH.shape[1]
    grouped = qkv_RH.reshape(dims.num_groups, (per_group + 2) * d, h)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: Dims) -> torch.Tensor:
    """The inverse of `split_qkv`."""
    per_group = dims.num_heads // dims.num_groups
    d, h = dims.head_dim, q.shape[1]
    grouped = torch.cat([q.reshape(dims.num_groups, per_group * d, h), k.reshape(dims.num_groups, d, h),
                         v.reshape(dims.num_groups, d, h)], dim=1)
    return grouped.reshape(-1, h).contiguous()


def _halves(fc1_2IH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # SwiGLU in megatron (mlp.py glu): chunk(2) along the output; the first half is the gate.
    gate, up = torch.chunk(fc1_2IH, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def expected_hf_keys(dims: Dims) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not dims.tied:
        keys.add("lm_head.weight")
    for n in range(dims.num_layers):
        p = f"model.layers.{n}."
        keys |= {p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                 "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                 "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight")}
        if dims.moe_pattern[n]:
            keys.add(p + "mlp.gate.weight")
            keys |= {f"{p}mlp.experts.{e}.{w}.weight" for e in range(dims.num_experts)
                     for w in ("gate_proj", "up_proj", "down_proj")}
        else:
            keys |= {p + f"mlp.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")}
    return keys


def gate_log_temperatures(cfg: ExperimentConfig, global_sd: Mapping[str, torch.Tensor]) -> Optional[list[list[float]]]:
    """Each MoE layer's learned log-temperatures (one per trained k, `cfg.matryoshka.ks`), in layer
    order; None for a model trained without them."""
    if cfg.matryoshka.gate_temperature != "learned":
        return None
    # What the router applies: clamped at the floor, if the model was trained with one.
    floor = cfg.matryoshka.gate_temperature_floor
    return [[float(x) for x in floored_log_temperatures(v, floor)]
            for v in _router_vectors(cfg, global_sd, "log_temperature", "gate_temperature")]


def _router_vectors(cfg: ExperimentConfig, global_sd: Mapping[str, torch.Tensor], param: str,
                    setting: str) -> list[torch.Tensor]:
    """Each MoE layer's router parameter `param` (fp32), in layer order; ExportError naming the
    first layer without it (the config says `matryoshka.<setting>` learned it)."""
    out = []
    for n in dims_from_config(cfg).moe_layers:
        name = f"decoder.layers.{n}.mlp.router.{param}"
        if name not in global_sd:
            raise ExportError(f"the config says matryoshka.{setting}=learned but the checkpoint has no {name}; "
                              "were the config and the weights saved together?")
        out.append(global_sd[name].float())
    return out


def gate_temperatures(cfg: ExperimentConfig, global_sd: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """k -> each MoE layer's learned temperature at that trained k, in layer order (what the suite
    reports); empty for a model trained without them."""
    return _per_trained_k(cfg, gate_log_temperatures(cfg, global_sd))


def gate_log_gains(cfg: ExperimentConfig, global_sd: Mapping[str, torch.Tensor]) -> Optional[list[list[float]]]:
    """Each MoE layer's learned log-gains (one per trained k, `matryoshka.gate_gain`), in layer
    order; under gate_gain channels each k's mean over the channels (the log of their geometric
    mean: what reports show; such a model is not exported). None for a model trained without them."""
    if cfg.matryoshka.gate_gain == "none":
        return None
    vectors = _router_vectors(cfg, global_sd, "log_gain", "gate_gain")
    return [[float(x) for x in (v.mean(dim=1) if v.dim() == 2 else v)] for v in vectors]


def gate_gains(cfg: ExperimentConfig, global_sd: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """k -> each MoE layer's learned gain at that trained k, in layer order (what the suite
    reports); empty for a model trained without them."""
    return _per_trained_k(cfg, gate_log_gains(cfg, global_sd))


def rank_gates(cfg: ExperimentConfig, global_sd: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Block of ranks ("2", "3-4", "5-8", ...) -> each MoE layer's learned gate on it, in layer order
    (what the suite reports); empty for a model trained without them."""
    if cfg.matryoshka.rank_gate == "none":
        return {}
    from mmoe_megatron.router import rank_blocks

    vectors = _router_vectors(cfg, global_sd, "log_rank_gate", "rank_gate")
    labels = [str(b) if b == a + 1 else f"{a + 1}-{b}" for a, b in rank_blocks(cfg.moe.num_experts)[1:]]
    return {label: [math.exp(float(v[j])) for v in vectors] for j, label in enumerate(labels)}


def _per_trained_k(cfg: ExperimentConfig, log_values: Optional[list[list[float]]]) -> dict[str, list[float]]:
    """k -> exp of each layer's log-value at that trained k; {} for None."""
    return {str(k): [math.exp(layer[i]) for layer in log_values] for i, k in enumerate(cfg.matryoshka.ks)} \
        if log_values else {}


def to_hf_state_dict(cfg: ExperimentConfig, global_sd: Mapping[str, torch.Tensor],
                     width: float = 1.0, k: Optional[int] = None) -> dict[str, torch.Tensor]:
    """HF Qwen3-MoE weights from megatron global weights (`load_global_state_dict`), the experts
    sliced to `width`, learned gate temperatures folded into the gates and learned gains into the
    experts' down projections at `k` (required for such a model). Raises ExportError for a setting
    Qwen3-MoE cannot express or a weight it has no place for."""
    check_exportable(cfg)
    columns = check_serving_width(cfg, width)
    dims = dims_from_config(cfg)
    learned = cfg.matryoshka.gate_temperature == "learned"
    gained = cfg.matryoshka.gate_gain == "learned"
    if learned or gained:
        if isinstance(k, bool) or not isinstance(k, int):
            what = "gate temperature" if learned else "gain"
            raise ExportError(f"k={k!r}: the model learned a {what} per k; give the one k to export at, whose "
                              f"{what} is folded into the weights")
        check_serving_k(dims, k, "k")
    out: dict[str, torch.Tensor] = {}

    def put(name: str, value: torch.Tensor) -> None:
        if name in out:
            raise ExportError(f"two megatron weights map to {name}; the checkpoint mixes layouts")
        out[name] = value.contiguous()

    for name, value in global_sd.items():
        if name in _SIMPLE_TOP:
            put(_SIMPLE_TOP[name], value)
            continue
        match = _LAYER.match(name)
        if match is None:
            raise ExportError(f"megatron weight {name} has no Qwen3-MoE counterpart")
        n, rest = int(match.group(1)), match.group(2)
        p = f"model.layers.{n}."
        expert = _EXPERT.match(rest)
        if rest == "mlp.router.log_temperature" and learned:
            continue  # folded into mlp.gate.weight below
        if rest == "mlp.router.log_gain" and gained:
            continue  # folded into the experts' down_proj below
        if rest in _SIMPLE_LAYER:
            put(p + _SIMPLE_LAYER[rest], value)
        elif rest == "self_attention.linear_qkv.weight":
            for proj, part in zip("qkv", split_qkv(value, dims)):
                put(f"{p}self_attn.{proj}_proj.weight", part)
        elif rest == "mlp.linear_fc1.weight":
            gate, up = _halves(value)
            put(p + "mlp.gate_proj.weight", gate)
            put(p + "mlp.up_proj.weight", up)
        elif expert is not None:
            e = int(expert.group(1) if expert.group(1) is not None else expert.group(4))
            fc = expert.group(2) or expert.group(3)
            # The expert at `width`: the first `columns` of its FFN (slimmable.py).
            if fc == "fc1":
                gate, up = _halves(value)
                put(f"{p}mlp.experts.{e}.gate_proj.weight", gate[:columns])
                put(f"{p}mlp.experts.{e}.up_proj.weight", up[:columns])
            else:
                put(f"{p}mlp.experts.{e}.down_proj.weight", value[:, :columns])
        else:
            raise ExportError(
                f"megatron weight {name} has no Qwen3-MoE counterpart (biases, shared experts and "
                "router expert bias are not part of Qwen3-MoE)"
            )
    check_complete(out, dims, "the megatron checkpoint")
    for n, log_t in zip(dims.moe_layers, gate_log_temperatures(cfg, global_sd) or []):
        # The router multiplies the selected logits by exp(-log T(k)) (router.py _inverse_temperature).
        gate = out[f"model.layers.{n}.mlp.gate.weight"]
        inverse = torch.exp(torch.tensor(-log_temperature_at(cfg.matryoshka.ks, log_t, k)))
        out[f"model.layers.{n}.mlp.gate.weight"] = (gate.float() * inverse).to(gate.dtype).contiguous()
    for n, log_g in zip(dims.moe_layers, gate_log_gains(cfg, global_sd) or []):
        # The router multiplies the combine weights by the gain; the experts' outputs are linear in
        # their down projections, so the gain at k moves into them.
        gain = torch.exp(torch.tensor(log_temperature_at(cfg.matryoshka.ks, log_g, k)))
        for e in range(cfg.moe.num_experts):
            name = f"model.layers.{n}.mlp.experts.{e}.down_proj.weight"
            out[name] = (out[name].float() * gain).to(out[name].dtype).contiguous()
    return out


def check_complete(hf_sd: Mapping[str, torch.Tensor], dims: Dims, source: str) -> None:
    expected = expected_hf_keys(dims)
    missing, extra = sorted(expected - set(hf_sd)), sorted(set(hf_sd) - expected)
    if missing or extra:
        raise ExportError(
            f"{source} does not match its config: {len(missing)} weights missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]}); were the config and the weights saved together?"
        )
