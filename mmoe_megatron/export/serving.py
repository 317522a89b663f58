"""Load an exported model with transformers (no custom code) and choose its k.

    model = load_hf_model("exports/tiny")                  # k from config.json
    model = load_hf_model("exports/tiny", k=1)             # every MoE layer at top-1
    model = load_hf_model("exports/tiny", k=[1, 2, 4, 2])  # one k per MoE layer
    model = load_hf_model("exports/tiny", k="mean_k=1.5")  # a budget recorded at export

Why two mechanisms (transformers 5.23, models/qwen3_moe/modeling_qwen3_moe.py): the router copies
`config.num_experts_per_tok` into `gate.top_k` when the model is built, so changing the config
afterwards does nothing; one k is therefore passed to `from_pretrained`. The experts read k from
the shape of the routing indices, so a per-layer k is set on each layer's `mlp.gate.top_k`.
A model trained with learned gate temperatures holds them folded at its export k; setting
another k also rescales that layer's gate weight (`mmoe_megatron.serving.layer_ks.gate_scales`),
and learned gains, folded into the experts' down projections, rescale those (`down_scales`).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from mmoe_megatron.export.qwen3_moe import MATRYOSHKA_KEY, ExportError
from mmoe_megatron.serving.layer_ks import down_scales, gate_scales

HFKSpec = Union[None, int, str, Sequence[int]]


def moe_gates(model) -> list:
    """The routers (`Qwen3MoeTopKRouter`) of the model's MoE layers, in layer order."""
    return list(_indexed_gates(model).values())


def _indexed_gates(model) -> dict:
    return {i: layer.mlp.gate for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")}


def set_hf_topk(model, k: Union[int, Sequence[int]]) -> None:
    """Route every MoE layer at `k`, or MoE layer i at `k[i]` (dense layers are skipped)."""
    indexed = _indexed_gates(model)
    gates = list(indexed.values())
    num_experts = gates[0].num_experts if gates else 0
    ks = [k] * len(gates) if isinstance(k, int) else [int(x) for x in k]
    if len(ks) != len(gates):
        raise ExportError(f"k={list(ks)}: the model has {len(gates)} MoE layers; give one k per MoE layer")
    bad = [x for x in ks if not 1 <= x <= num_experts]
    if bad:
        raise ExportError(f"k={k}: every k must lie in 1..{num_experts} (the experts per layer); got {bad}")
    layer_ks = dict(zip(indexed, ks))
    # The k whose temperature each gate holds now (the export's until a first rescale).
    folded = {i: gate.folded_k for i, gate in indexed.items() if hasattr(gate, "folded_k")}
    scales = gate_scales(model.config, layer_ks, folded)
    # The k whose gain each layer's experts hold now.
    gain_folded = {i: gate.gain_folded_k for i, gate in indexed.items() if hasattr(gate, "gain_folded_k")}
    gains = down_scales(model.config, layer_ks, gain_folded)
    with torch.no_grad():
        for i, gate in indexed.items():
            gate.top_k = layer_ks[i]
            if i in scales:
                gate.weight.mul_(scales[i])
                gate.folded_k = layer_ks[i]
            if i in gains:
                model.model.layers[i].mlp.experts.down_proj.mul_(gains[i])
                gate.gain_folded_k = layer_ks[i]


def current_hf_topk(model) -> list[int]:
    return [gate.top_k for gate in moe_gates(model)]


def load_hf_model(path: str, k: HFKSpec = None, **from_pretrained_kwargs):
    """`AutoModelForCausalLM.from_pretrained(path)` routing at `k`: None keeps config.json's
    num_experts_per_tok; an int applies to every MoE layer; a list gives one k per MoE layer; a
    string names a per-layer budget recorded in config.json (`matryoshka.layer_budgets`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(k, str):
        record = getattr(AutoConfig.from_pretrained(path), MATRYOSHKA_KEY, None) or {}
        budgets = record.get("layer_budgets", {})
        if k not in budgets:
            raise ExportError(f"k={k!r}: no such budget in {path}/config.json; recorded: {sorted(budgets)}")
        k = list(budgets[k])
    if isinstance(k, bool) or (k is not None and not isinstance(k, (int, list, tuple))):
        raise ExportError(f"k={k!r}: give None, an int, a list of ints or a budget name")
    if isinstance(k, int):
        if k < 1:
            raise ExportError(f"k={k}: must be at least 1")
        from_pretrained_kwargs["num_experts_per_tok"] = k
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    if isinstance(k, int):
        set_hf_topk(model, k)  # validates k against the number of experts
    elif k is not None:
        set_hf_topk(model, list(k))
    return model

