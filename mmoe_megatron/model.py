"""Build the megatron-core GPT model with Matryoshka MoE layers, and choose its k.

The elastic router enters through megatron-core's layer spec: every MoE layer spec gets
`MatryoshkaMoELayer` as its module, `MatryoshkaRouter` as `MoESubmodules.router` and slimmable
experts (`slimmable.py`) as `MoESubmodules.experts`. Nothing in megatron-core is patched.
`build_model` refuses a model in which any MoE layer of the config did not get them
(`check_elastic_layers`).

Inference API:
    set_topk(model, 2)             every MoE layer routes to its top-2
    set_topk(model, [1, 2, 4, 8])  one k per MoE layer, in layer order
    set_width(model, 0.5)          every expert at half its FFN width (slimmable experts)
    set_point(model, 2, [1, 0.5, 0.5, 0.25])   k and per-layer widths together
k may exceed the training range, up to the number of experts; a width may be any fraction that
gives whole columns.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from typing import Iterable, Sequence, Union

import torch

from mmoe_megatron import compat
from mmoe_megatron.config import ExperimentConfig
from mmoe_megatron.config.derive import padded_vocab_size, transformer_config, use_transformer_engine
from mmoe_megatron.layout import global_name, is_expert_param, sequential_name
from mmoe_megatron.router import MatryoshkaMoELayer, MatryoshkaRouter


class _SubclassedMoELayerFilter(logging.Filter):
    """transformer_layer.py:351-368 hands `pg_collection` only to MLP classes it knows by
    identity and logs a warning for any other class. MatryoshkaMoELayer then falls back to
    megatron's default process groups, the ones this model is built with: the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_SubclassedMoELayerFilter())


def router_builder(cfg: ExperimentConfig):
    """The router a config asks for (the Matryoshka router, or a baseline from `baselines`),
    as the builder megatron's MoESubmodules.router expects: (config=, pg_collection=) -> router."""
    from mmoe_megatron import baselines

    mat = cfg.matryoshka
    if mat.method == "top_p":
        return functools.partial(baselines.TopPRouter, k1_router_grad=mat.k1_router_grad, top_p=mat.top_p)
    if mat.method == "emoe":
        return functools.partial(baselines.EMoERouter, k1_router_grad=mat.k1_router_grad,
                                 pool_k=mat.emoe_pool_k, sharpen_coeff=mat.emoe_sharpen_coeff)
    temperature_ks = mat.ks if mat.gate_temperature == "learned" else None
    return functools.partial(MatryoshkaRouter, k1_router_grad=mat.k1_router_grad,
                             temperature_ks=temperature_ks, added_grad_ks=mat.added_grad_ks,
                             nested=mat.normalization == "nested",
                             temperature_floor=mat.gate_temperature_floor,
                             gain_ks=mat.ks if mat.gate_gain != "none" else None,
                             gain_channels=mat.gate_gain == "channels",
                             adapter_ks=mat.ks, adapter_rank=mat.k_adapter_rank,
                             rank_gates=mat.rank_gate == "learned")


def experts_spec(cfg: ExperimentConfig, experts):
    """megatron-core's experts entry with its class replaced by the slimmable experts of the same
    kind (local or grouped), which run at full width exactly as the stock ones (`slimmable.py`)."""
    from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

    from mmoe_megatron.slimmable import experts_class

    entry = compat.experts_entry(experts)
    module = entry.module if entry is not None else None
    if module not in (SequentialMLP, TEGroupedMLP):
        if cfg.matryoshka.elastic_width or cfg.matryoshka.expert_grad == "added":
            raise ValueError(f"slimmable experts (elastic widths, expert_grad added) replace SequentialMLP or "
                             f"TEGroupedMLP, not {getattr(module, '__name__', repr(experts))}")
        return experts
    return compat.with_experts(experts, experts_class(module is TEGroupedMLP),
                               widths=tuple(cfg.matryoshka.widths),
                               added_expert_grad=cfg.matryoshka.expert_grad == "added")


def layer_specs(cfg: ExperimentConfig, tconfig, stock_routing: bool = False) -> list:
    """One ModuleSpec per transformer layer, MoE layers using the elastic router and slimmable
    experts.

    `stock_routing=True` keeps megatron-core's own MoELayer and TopKRouter (fixed k = k_max):
    the reference that fixed-k training and the router-overhead benchmark compare against.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

    specs = get_gpt_decoder_layer_specs(
        tconfig, use_transformer_engine=use_transformer_engine(cfg),
        normalization=cfg.model.normalization,
    )
    if stock_routing:
        return specs
    router = router_builder(cfg)
    out = []
    for spec in specs:
        mlp = spec.submodules.mlp
        entry = compat.moe_mlp_entry(mlp)
        if entry is not None:
            submodules = dataclasses.replace(entry.submodules, router=router,
                                             experts=experts_spec(cfg, entry.submodules.experts))
            mlp = compat.with_moe_mlp(mlp, MatryoshkaMoELayer, submodules)
            spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))
        out.append(spec)
    return out


class ElasticRoutingError(RuntimeError):
    """A model whose config has MoE layers was built with a layer that is not elastic."""


def check_elastic_layers(model: torch.nn.Module, cfg: ExperimentConfig) -> None:
    """Every MoE layer of the config must be a MatryoshkaMoELayer with an elastic router, and
    with slimmable experts when the config asks for more than one width.

    Whatever the installed megatron-core returns for a layer spec, a silent fallback to its
    stock MoELayer, TopKRouter or experts would train a model that is not elastic.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from mmoe_megatron.slimmable import SlimmableSequentialMLP, SlimmableTEGroupedMLP

    wanted = set(moe_layer_numbers(cfg))
    layers = list(getattr(getattr(model, "decoder", None), "layers", []))
    problems = [] if layers else ["the model has no transformer layers (model.decoder.layers)"]
    for layer in layers:
        number, mlp = layer.layer_number, getattr(layer, "mlp", None)
        router, experts = getattr(mlp, "router", None), getattr(mlp, "experts", None)
        if number not in wanted:
            if isinstance(mlp, MoELayer):
                problems.append(f"layer {number} is an MoE layer but the config makes it dense")
        elif not isinstance(mlp, MatryoshkaMoELayer):
            problems.append(f"layer {number}: MLP is {type(mlp).__module__}.{type(mlp).__name__}, "
                            "not MatryoshkaMoELayer")
        elif not isinstance(router, MatryoshkaRouter):
            problems.append(f"layer {number}: router is {type(router).__module__}."
                            f"{type(router).__name__}, not an elastic MatryoshkaRouter")
        elif cfg.matryoshka.elastic_width and not isinstance(
                experts, (SlimmableSequentialMLP, SlimmableTEGroupedMLP)):
            problems.append(f"layer {number}: experts are {type(experts).__module__}."
                            f"{type(experts).__name__}, not slimmable experts (matryoshka.widths "
                            f"is {list(cfg.matryoshka.widths)})")
    if problems:
        from megatron.core import package_info

        raise ElasticRoutingError(
            "the model's MoE layers are not all elastic, so it would train at a fixed k or width "
            f"(megatron-core {package_info.__shortversion__}):\n  " + "\n  ".join(problems)
            + "\nThe layer spec megatron-core returned was not recognised by "
            "mmoe_megatron.compat.moe_mlp_entry (the layer) or compat.experts_entry (its experts); "
            "use a supported release (0.16.1 on Python 3.11, 0.19.2 on Python 3.12) or extend "
            "those functions for this one"
        )


def build_model(
    cfg: ExperimentConfig, vocab_size: int, seed: int | None = None, stock_routing: bool = False
):
    """The GPT model for this rank. Needs torch.distributed and parallel_state initialised.

    Weights are drawn by `init_weights` from (seed, global parameter name), so every parallel
    layout of the same config starts from the same model.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.models.backends import LocalSpecProvider

    compat.apply_all()
    tconfig = transformer_config(cfg)
    tconfig = dataclasses.replace(tconfig, perform_initialization=False)
    specs = layer_specs(cfg, tconfig, stock_routing=stock_routing)
    if use_transformer_engine(cfg):
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = LocalSpecProvider().layer_norm(rms_norm=cfg.model.normalization == "RMSNorm")
    block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block,
        vocab_size=padded_vocab_size(cfg, vocab_size),
        max_sequence_length=cfg.data.seq_length,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        parallel_output=True,
    )
    if not stock_routing:
        check_elastic_layers(model, cfg)
    init_weights(model, cfg, cfg.init_seed if seed is None else seed)
    return model


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _shard(full: torch.Tensor, param: torch.nn.Parameter, rank: int, world: int) -> torch.Tensor:
    # Mirror tensor_parallel/layers.py:_initialize_affine_weight_cpu: split the full tensor into
    # per_partition/stride chunks along partition_dim and keep chunks rank, rank+world, ...
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = torch.split(full, param.shape[dim] // stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: ExperimentConfig, seed: int) -> None:
    """Initialise every parameter from (seed, its global name), independent of the layout.

    Follows megatron-core's scheme: normal(0, std) for weights, std / sqrt(2 * num_layers) for
    the output projections of attention and MLPs (linear_proj, linear_fc2), ones for norm
    weights, zeros for biases, for the routers' log-temperatures, log-gains, log block and rank
    gates (temperatures, gains and gates 1) and for the adapters' output maps (the adapters add 0).
    Grouped-GEMM experts draw from their SequentialMLP names and Transformer Engine's linears share
    the local spec's names, so every layer spec of a config starts from the same weights too.
    """
    from megatron.core import parallel_state as ps

    std = cfg.model.init_method_std
    out_std = std / (2.0 * cfg.model.num_layers) ** 0.5
    ep_rank = ps.get_expert_model_parallel_rank()
    for name, param in model.named_parameters():
        if name.endswith(("log_gain", "k_adapter_out")):  # gains 1; the adapters' maps start at 0
            param.fill_(0.0)
            continue
        if param.dim() == 1:
            param.fill_(0.0 if name.endswith(("bias", "log_temperature", "log_block_gate", "log_rank_gate")) else 1.0)
            continue
        if is_expert_param(name):
            num_local = cfg.moe.num_experts // ps.get_expert_model_parallel_world_size()
            name = global_name(name, ep_rank, num_local)
            tp_rank, tp_world = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
        else:
            tp_rank, tp_world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        sharded = getattr(param, "tensor_model_parallel", False) and tp_world > 1
        shape = list(param.shape)
        if sharded:
            shape[param.partition_dim] *= tp_world
        gen = torch.Generator().manual_seed(_param_seed(seed, sequential_name(name)))
        scale = out_std if (".linear_proj." in name or ".linear_fc2." in name) else std
        full = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
        param.copy_(_shard(full, param, tp_rank, tp_world) if sharded else full)


# --- choosing k ------------------------------------------------------------------------------


def elastic_routers(model: torch.nn.Module) -> list[MatryoshkaRouter]:
    """The model's elastic routers in layer order (this pipeline stage's MoE layers)."""
    routers = [m for m in model.modules() if isinstance(m, MatryoshkaRouter)]
    return sorted(routers, key=lambda r: r.layer_number)


def moe_layer_numbers(cfg: ExperimentConfig) -> list[int]:
    """megatron's 1-based layer numbers of the MoE layers; position i is MoE layer i."""
    return [i + 1 for i, is_moe in enumerate(cfg.moe_layer_pattern()) if is_moe]


def set_topk(model: torch.nn.Module, k: Union[int, Sequence[int]]) -> None:
    """Route at one k in every MoE layer, or at `k[i]` in MoE layer i."""
    routers = elastic_routers(model)
    if isinstance(k, int):
        for router in routers:
            router.set_k(k)
        return
    ks = list(k)
    if len(ks) != len(routers):
        raise ValueError(
            f"a per-layer k vector needs one k per MoE layer ({len(routers)}), got {len(ks)}: {ks}"
        )
    for router, layer_k in zip(routers, ks):
        router.set_k(int(layer_k))


def moe_layers(model: torch.nn.Module) -> list[MatryoshkaMoELayer]:
    """The model's Matryoshka MoE layers in layer order (this pipeline stage's)."""
    layers = [m for m in model.modules() if isinstance(m, MatryoshkaMoELayer)]
    return sorted(layers, key=lambda m: m.layer_number)


def slimmable_experts(model: torch.nn.Module) -> list:
    """The slimmable experts of the MoE layers, in layer order (each with `.layer_number` set)."""
    from mmoe_megatron.slimmable import _WidthState

    out = []
    for layer in moe_layers(model):
        if isinstance(layer.experts, _WidthState):
            layer.experts.layer_number = layer.layer_number
            out.append(layer.experts)
    return out


def set_width(model: torch.nn.Module, width: Union[float, Sequence[float]]) -> None:
    """Run every expert at one width fraction, or MoE layer i's experts at `width[i]`."""
    experts = slimmable_experts(model)
    if len(experts) != len(moe_layers(model)):
        raise ValueError("this model's experts are not slimmable (grouped GEMM without Transformer Engine?)")
    widths = [width] * len(experts) if isinstance(width, (int, float)) else list(width)
    if len(widths) != len(experts):
        raise ValueError(
            f"a per-layer width vector needs one width per MoE layer ({len(experts)}), got {len(widths)}: {widths}"
        )
    for module, w in zip(experts, widths):
        module.set_width(float(w))


def set_point(model: torch.nn.Module, k: Union[int, Sequence[int]],
              width: Union[float, Sequence[float], None] = None) -> None:
    """Route at `k` with the experts at `width` (full width when None): one point of the grid."""
    set_topk(model, k)
    if width is not None or slimmable_experts(model):
        set_width(model, 1.0 if width is None else width)


def current_topk(model: torch.nn.Module) -> list:
    """The k each MoE layer will use next (None for a layer holding per-token ks)."""
    return [r.k for r in elastic_routers(model)]


def named_global_parameters(model: torch.nn.Module, cfg: ExperimentConfig) -> Iterable:
    """(global name, parameter) pairs of this rank's parameters."""
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    num_local = cfg.moe.num_experts // ps.get_expert_model_parallel_world_size()
    for name, param in model.named_parameters():
        yield global_name(name, ep_rank, num_local), param
