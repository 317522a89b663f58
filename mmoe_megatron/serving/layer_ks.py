"""One top-k per MoE layer from an exported Qwen3-MoE config, for serving engines.

A serving engine reads config.json and the start-up overrides (vLLM: `--hf-overrides`). Two keys
ask for a per-layer k; neither is part of Qwen3-MoE, so the export stays a plain Qwen3-MoE:

    matryoshka_layer_ks: [1, 4, 2]      one k per MoE layer, in layer order (dense layers skipped)
    matryoshka_budget: "mean_k=2"       a per-layer vector recorded at export
                                        (config.json matryoshka.layer_budgets = budgets.json)

With neither, every MoE layer routes at `num_experts_per_tok`. Pure Python (no torch, no vLLM):
the engine plugin and the tests use the same resolution and the same errors.

A model trained with learned gate temperatures (`matryoshka.gate_temperature: learned`) divides
a layer's selected logits by a temperature T(k) that depends on the k it routes at. Logits are
linear in the gate weight, so the export writes each MoE layer's gate weight divided by T(k) at
the k it was exported for (`folded_ks`) and records the log-temperatures; a layer served at
another k multiplies its gate weight by T(folded k) / T(k) (`gate_scales`). An engine that
changes k without the plugin keeps the exported k's temperature: the same experts, mixed with
slightly different weights.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Mapping, Optional, Sequence

LAYER_KS_KEY = "matryoshka_layer_ks"
BUDGET_KEY = "matryoshka_budget"
RECORD_KEY = "matryoshka"
"""config.json's record of elastic training, written by mmoe_megatron.export (its `layer_budgets`)."""
TEMPERATURE_KEY = "gate_temperatures"
"""Under RECORD_KEY: {"trained_ks": [...], "log_temperatures": [[one per trained k] per MoE layer],
"folded_ks": [the k whose temperature each MoE layer's gate weight holds]}."""
GAIN_KEY = "gate_gains"
"""Under RECORD_KEY: {"trained_ks": [...], "log_gains": [[one per trained k] per MoE layer],
"folded_ks": [the k whose gain each MoE layer's expert down projections hold]}."""
ARCHITECTURE = "MatryoshkaQwen3MoeForCausalLM"
"""The architecture name the vLLM plugin registers; select it with --hf-overrides."""


class ServingConfigError(ValueError):
    """A per-layer k request the model cannot serve; the message names the key and the fix."""


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def moe_layer_indices(config: Any) -> list[int]:
    """The MoE layers of a Qwen3-MoE config: not in `mlp_only_layers`, and every
    `decoder_sparse_step`-th layer (the rule of transformers' and vLLM's Qwen3MoeDecoderLayer)."""
    dense = set(_get(config, "mlp_only_layers") or [])
    step = int(_get(config, "decoder_sparse_step", 1) or 1)
    num_experts = int(_get(config, "num_experts", 0) or 0)
    return [i for i in range(int(_get(config, "num_hidden_layers")))
            if i not in dense and num_experts > 0 and (i + 1) % step == 0]


def example_override(ks: list[int]) -> str:
    return f"--hf-overrides '{{\"architectures\": [\"{ARCHITECTURE}\"], \"{LAYER_KS_KEY}\": {ks}}}'"


def serving_layer_ks(config: Any) -> dict[int, int]:
    """{MoE layer index: top-k} for `config` (a transformers config or a config.json dict with the
    overrides applied). Raises ServingConfigError for a request the model cannot serve."""
    layers = moe_layer_indices(config)
    num_experts = int(_get(config, "num_experts", 0) or 0)
    layer_ks, budget = _get(config, LAYER_KS_KEY), _get(config, BUDGET_KEY)
    if layer_ks is not None and budget is not None:
        raise ServingConfigError(
            f"both {LAYER_KS_KEY} and {BUDGET_KEY} are set; give one of them in --hf-overrides")
    what = f"{LAYER_KS_KEY}={layer_ks}"
    if budget is not None:
        recorded = dict((_get(config, RECORD_KEY) or {}).get("layer_budgets") or {})
        if budget not in recorded:
            raise ServingConfigError(
                f"{BUDGET_KEY}={budget!r}: this export records no such budget (recorded in config.json "
                f"{RECORD_KEY}.layer_budgets: {sorted(recorded) or 'none'}); name one of those, or give "
                f"the vector itself as {LAYER_KS_KEY}")
        layer_ks, what = recorded[budget], f"{BUDGET_KEY}={budget!r} ({recorded[budget]})"
    if layer_ks is None:
        layer_ks = [_get(config, "num_experts_per_tok")] * len(layers)
        what = f"num_experts_per_tok={layer_ks[0] if layer_ks else None}"
    if not isinstance(layer_ks, (list, tuple)):
        raise ServingConfigError(f"{what}: give a list with one int per MoE layer ({len(layers)})")
    ks = list(layer_ks)
    if len(ks) != len(layers):
        raise ServingConfigError(
            f"{what} has {len(ks)} entries but the model has {len(layers)} MoE layers (layers {layers}); "
            f"give one k per MoE layer, e.g. {example_override([1] * len(layers))}")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts]
    if bad:
        raise ServingConfigError(
            f"{what}: every k must be an int in 1..{num_experts} (the experts per MoE layer); got {bad}")
    return dict(zip(layers, ks))


# --- learned gate temperatures ---------------------------------------------------------------------


def log_k_weights(ks: Sequence[int], k: int) -> list[tuple[int, float]]:
    """(index into `ks`, weight) pairs whose weighted sum of the trained ks' log-temperatures is
    the log-temperature at `k`: linear in log k between neighbouring trained ks (sorted), the
    nearest end's beyond them."""
    if k <= ks[0]:
        return [(0, 1.0)]
    if k >= ks[-1]:
        return [(len(ks) - 1, 1.0)]
    hi = bisect.bisect_left(ks, k)
    lo = hi - 1
    frac = (math.log(k) - math.log(ks[lo])) / (math.log(ks[hi]) - math.log(ks[lo]))
    return [(lo, 1.0 - frac), (hi, frac)]


def floored_log_temperatures(log_t, floor: float):
    """Log-temperatures (a tensor) clamped from below at log(floor), as a router trained with
    `matryoshka.gate_temperature_floor` applies them; unchanged without a floor (0)."""
    return log_t.clamp(min=math.log(floor)) if floor > 0 else log_t


def log_temperature_at(ks: Sequence[int], log_temperatures: Sequence[float], k: int) -> float:
    return sum(w * float(log_temperatures[i]) for i, w in log_k_weights(ks, k))


def gate_scales(config: Any, layer_ks: Mapping[int, int],
                folded: Optional[Mapping[int, int]] = None) -> dict[int, float]:
    """{MoE layer index: the factor its exported gate weight is multiplied by to route at
    `layer_ks[layer]`}: T(folded k) / T(k). Empty for a model without learned temperatures.
    `folded` overrides the recorded folded k of some layers (a model already rescaled)."""
    return _rescale(config, TEMPERATURE_KEY, "log_temperatures", "temperatures", layer_ks, folded, -1.0)


def down_scales(config: Any, layer_ks: Mapping[int, int],
                folded: Optional[Mapping[int, int]] = None) -> dict[int, float]:
    """{MoE layer index: the factor its experts' exported down projections are multiplied by to
    route at `layer_ks[layer]`}: g(k) / g(folded k), g the learned gain. Empty for a model without
    learned gains. `folded` as in `gate_scales`."""
    return _rescale(config, GAIN_KEY, "log_gains", "gains", layer_ks, folded, 1.0)


def _rescale(config: Any, key: str, field: str, what: str, layer_ks: Mapping[int, int],
             folded: Optional[Mapping[int, int]], sign: float) -> dict[int, float]:
    """exp(sign * (log q(k) - log q(folded k))) per MoE layer for the per-k quantity q recorded
    under `key` (its log values per layer in `field`)."""
    record = (_get(config, RECORD_KEY) or {}).get(key)
    if not record:
        return {}
    ks, logs = list(record["trained_ks"]), record[field]
    layers = moe_layer_indices(config)
    if len(logs) != len(layers) or len(record["folded_ks"]) != len(layers):
        raise ServingConfigError(
            f"config.json {RECORD_KEY}.{key} has {len(logs)} layers' {what} but the model has "
            f"{len(layers)} MoE layers; the config does not belong to these weights, re-export")
    folded_ks = dict(zip(layers, record["folded_ks"]))
    folded_ks.update(folded or {})
    by_layer = dict(zip(layers, logs))
    return {layer: math.exp(sign * (log_temperature_at(ks, by_layer[layer], k)
                                    - log_temperature_at(ks, by_layer[layer], folded_ks[layer])))
            for layer, k in layer_ks.items()}
