"""The serving-side pieces that need no engine: which k each MoE layer gets from config.json and
the start-up overrides (shared by the vLLM plugin), the exporter's warning for head sizes vLLM
cannot run, and that the plugin module leaves vLLM unimported until vLLM loads it."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import math

from mmoe_megatron.serving.layer_ks import (BUDGET_KEY, GAIN_KEY, LAYER_KS_KEY, TEMPERATURE_KEY, ServingConfigError,
                                            down_scales, gate_scales, moe_layer_indices, serving_layer_ks)
from tests.helpers import ROOT, tiny_config

# A config.json as the exporter writes it: 4 layers, layer 1 dense, 8 experts, served at k = 2.
CONFIG = {"num_hidden_layers": 4, "mlp_only_layers": [1], "decoder_sparse_step": 1, "num_experts": 8,
          "num_experts_per_tok": 2, "matryoshka": {"layer_budgets": {"mean_k=2.33": [1, 4, 2]}}}


def test_moe_layers_follow_mlp_only_layers_and_sparse_step():
    assert moe_layer_indices(CONFIG) == [0, 2, 3]
    assert moe_layer_indices({**CONFIG, "mlp_only_layers": [], "decoder_sparse_step": 2}) == [1, 3]


def test_layer_ks_from_default_list_and_budget():
    assert serving_layer_ks(CONFIG) == {0: 2, 2: 2, 3: 2}
    assert serving_layer_ks({**CONFIG, LAYER_KS_KEY: [1, 8, 3]}) == {0: 1, 2: 8, 3: 3}
    assert serving_layer_ks({**CONFIG, BUDGET_KEY: "mean_k=2.33"}) == {0: 1, 2: 4, 3: 2}


@pytest.mark.parametrize("overrides, message", [
    ({LAYER_KS_KEY: [1, 2]}, r"matryoshka_layer_ks=\[1, 2\] has 2 entries but the model has 3 MoE layers "
                             r"\(layers \[0, 2, 3\]\); give one k per MoE layer, e.g. --hf-overrides"),
    ({LAYER_KS_KEY: [1, 9, 0]}, r"every k must be an int in 1\.\.8 .*got \[9, 0\]"),
    ({LAYER_KS_KEY: 2}, r"give a list with one int per MoE layer \(3\)"),
    ({BUDGET_KEY: "mean_k=9"}, r"matryoshka_budget='mean_k=9': this export records no such budget "
                               r".*\['mean_k=2\.33'\]\); name one of those, or give the vector itself"),
    ({BUDGET_KEY: "x", LAYER_KS_KEY: [1, 1, 1]}, r"both matryoshka_layer_ks and matryoshka_budget are set"),
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok=9: every k must be an int in 1\.\.8"),
])
def test_bad_requests_name_the_problem_and_the_fix(overrides, message):
    with pytest.raises(ServingConfigError, match=message):
        serving_layer_ks({**CONFIG, **overrides})


def test_a_budget_name_needs_a_recorded_budget():
    with pytest.raises(ServingConfigError, match=r"recorded in config.json matryoshka.layer_budgets: none"):
        serving_layer_ks({**{k: v for k, v in CONFIG.items() if k != "matryoshka"}, BUDGET_KEY: "mean_k=2"})


# Learned temperatures at trained ks 1, 2, 4, folded into the gates at k = 2 (log T(2) = 0 here).
TEMPERATURES = {"trained_ks": [1, 2, 4], "folded_ks": [2, 2, 2],
                "log_temperatures": [[0.3, 0.0, -0.6], [0.0, 0.2, 0.4], [0.5, 0.0, -1.0]]}


def test_gate_scales_move_the_folded_temperature_to_each_layers_k():
    config = {**CONFIG, "matryoshka": {TEMPERATURE_KEY: TEMPERATURES}}
    scales = gate_scales(config, {0: 1, 2: 4, 3: 3})
    # T(2) / T(k): layer 0 at k=1 exp(0 - 0.3); layer 2 at k=4 exp(0.2 - 0.4); layer 3 at k=3, a
    # log2(1.5) = 0.585 share of the way from log T(2) = 0 to log T(4) = -1: exp(0 + 0.585).
    assert scales == pytest.approx({0: math.exp(-0.3), 2: math.exp(-0.2), 3: math.exp(0.5849625)}, rel=1e-6)
    assert gate_scales(config, {0: 2, 2: 2, 3: 2}) == {0: 1.0, 2: 1.0, 3: 1.0}
    # Beyond the trained range: the nearest end's temperature.
    assert gate_scales(config, {0: 8})[0] == pytest.approx(math.exp(0.6))
    # A model already rescaled to k = 4 in layer 2 goes back to k = 2 by the inverse factor.
    assert gate_scales(config, {2: 2}, folded={2: 4})[2] == pytest.approx(math.exp(0.2))
    assert gate_scales(CONFIG, {0: 1, 2: 4, 3: 3}) == {}  # trained without learned temperatures


def test_gate_scales_refuse_a_record_of_another_model():
    short = {**TEMPERATURES, "log_temperatures": TEMPERATURES["log_temperatures"][:2]}
    with pytest.raises(ServingConfigError, match=r"2 layers' temperatures but the model has 3 MoE layers"):
        gate_scales({**CONFIG, "matryoshka": {TEMPERATURE_KEY: short}}, {0: 1})


def test_down_scales_move_the_folded_gain_to_each_layers_k():
    # Gains 1, 2, 4 at ks 1, 2, 4 in every layer, folded at k = 2: g(k) / g(2).
    gains = {"trained_ks": [1, 2, 4], "folded_ks": [2, 2, 2], "log_gains": [[0.0, math.log(2), math.log(4)]] * 3}
    config = {**CONFIG, "matryoshka": {TEMPERATURE_KEY: TEMPERATURES, GAIN_KEY: gains}}
    scales = down_scales(config, {0: 1, 2: 4, 3: 3})
    assert scales == pytest.approx({0: 0.5, 2: 2.0, 3: 2 ** 0.5849625}, rel=1e-6)
    assert down_scales(config, {2: 2}, folded={2: 4})[2] == pytest.approx(0.5)
    # The gates' temperatures and the experts' gains are rescaled apart.
    assert gate_scales(config, {2: 4})[2] == pytest.approx(math.exp(-0.2))
    assert down_scales({**CONFIG, "matryoshka": {TEMPERATURE_KEY: TEMPERATURES}}, {0: 1}) == {}
    with pytest.raises(ServingConfigError, match=r"2 layers' gains but the model has 3 MoE layers"):
        down_scales({**CONFIG, "matryoshka": {GAIN_KEY: {**gains, "log_gains": gains["log_gains"][:2]}}}, {0: 1})


def test_importing_the_plugin_does_not_import_vllm():
    code = ("import sys, mmoe_megatron.serving.vllm_plugin, mmoe_megatron.serving.layer_ks; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_pyproject_registers_the_plugin_entry_point():
    import tomllib

    with open(f"{ROOT}/pyproject.toml", "rb") as f:
        entry_points = tomllib.load(f)["project"]["entry-points"]["vllm.general_plugins"]
    assert entry_points == {"mmoe_matryoshka": "mmoe_megatron.serving.vllm_plugin:register"}


# --- the exporter's warning ----------------------------------------------------------------------


@pytest.mark.parametrize("overrides, warned", [
    ({}, []),  # the tiny config: 2 heads of 32
    ({"model.num_attention_heads": 4, "model.num_query_groups": 2}, ["CPU"]),  # 16: GPU's FlashAttention runs it
    ({"model.kv_channels": 24}, ["CPU"]),
    ({"model.kv_channels": 20}, ["CPU", "GPU"]),  # neither a multiple of 8 nor 32 or more
])
def test_export_warns_when_vllm_cannot_run_the_head_size(tmp_path, overrides, warned):
    from mmoe_megatron.export import ExportError
    from mmoe_megatron.export.convert import export_to_hf
    from mmoe_megatron.export.engines import ServingCompatibilityWarning

    cfg = tiny_config(**{"data.mock": True, **overrides})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ExportError, match="weights missing"):  # no weights: it stops after its checks
            export_to_hf(cfg, {}, str(tmp_path / "x"), k=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, ServingCompatibilityWarning)]
    assert [("CPU" if "CPU" in m else "GPU") for m in messages] == warned, messages
    setting = "model.kv_channels" if "model.kv_channels" in overrides else "model.hidden_size / model.num_attention_heads"
    assert all(setting in m and "train with" in m for m in messages)
