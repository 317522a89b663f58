import os

import pytest
import torch
import yaml

from mmoe_megatron.config import (
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
    save_config,
)
from mmoe_megatron.config.base import to_dict
from mmoe_megatron.config.derive import (
    flops_per_token,
    padded_vocab_size,
    param_counts,
    transformer_config,
)
from tests.helpers import TINY, VOCAB, tiny_config


def tiny_dict():
    with open(TINY) as f:
        return yaml.safe_load(f)


def test_tiny_config_loads_with_typed_sections():
    cfg = load_config(TINY)
    assert cfg.model.num_layers == 4
    assert cfg.matryoshka.strategy == "token"
    assert cfg.matryoshka.k_max == 4
    assert isinstance(cfg.optimizer.lr, float)


@pytest.mark.parametrize(
    "key, value, field, words",
    [
        ("model.num_layerz", 3, "model.num_layerz", "unknown key"),
        ("train.lr", 0.1, "train.lr", "unknown key"),
        ("model.hidden_size", "wide", "model.hidden_size", "integer"),
        ("model.hidden_size", 0, "model.hidden_size", ">= 1"),
        ("matryoshka.strategy", "random", "matryoshka.strategy", "'layerwise'"),
        ("matryoshka.ks", [2, 1], "matryoshka.ks", "strictly increasing"),
        ("matryoshka.ks", [1, 16], "matryoshka.ks", "exceeds moe.num_experts"),
        ("matryoshka.distribution", "explicit", "matryoshka.probs", "one probability per k"),
        ("matryoshka.distribution", "small_k", "matryoshka.k_max_share", "probability of k_max"),
        ("matryoshka.k_max_share", 0.05, "matryoshka.k_max_share", "only used with distribution: small_k"),
        ("matryoshka.k_max_share", 1.0, "matryoshka.k_max_share", "< 1"),
        ("matryoshka.rank_gate", "yes", "matryoshka.rank_gate", "none"),
        ("moe.dispatcher", "flex", "moe.dispatcher", "'alltoall'"),
        ("parallel.expert", 3, "parallel.expert", "does not divide"),
        ("parallel.pipeline", 2, "parallel.pipeline", "not supported"),
        ("optimizer.zero_stage", 3, "optimizer.zero_stage", "allowed: 1, 2"),
        ("optimizer.lr", float("nan"), "optimizer.lr", "finite"),
        ("train.global_batch_size", 10, "train.global_batch_size", "multiple"),
        ("moe.layer_freq", [1, 0], "moe.layer_freq", "one 0 or 1 per layer"),
        ("data.split", "90,10", "data.split", "three"),
        ("matryoshka.method", "top_p", "matryoshka.strategy", "set strategy: fixed"),
        ("matryoshka.ks", [1], "matryoshka.normalization", "softmax_topk"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(key, value, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [(key, value)])
    assert err.value.path == field
    assert words in str(err.value)


def test_missing_required_field_is_named():
    data = tiny_dict()
    del data["model"]["hidden_size"]
    with pytest.raises(ConfigError, match=r"model.hidden_size: required"):
        config_from_dict(data)


def test_dotted_overrides_parse_types():
    pairs = parse_overrides(["--train.lr=3e-4", "--moe.num_experts", "16", "--data.mock=true",
                             "--matryoshka.ks=[1, 2]", "--checkpoint.load=null"])
    assert pairs == [("train.lr", "3e-4"), ("moe.num_experts", 16), ("data.mock", True),
                     ("matryoshka.ks", [1, 2]), ("checkpoint.load", None)]
    cfg = load_config(TINY, parse_overrides(["--optimizer.lr=3e-4", "--matryoshka.ks=[1,2]"]))
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.matryoshka.ks == [1, 2]


def test_override_without_value_is_an_error():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.train_iters"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, [("optimizer.lr", 1e-3)])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(path))
    again = load_config(str(path))
    assert again == cfg
    assert "lr: 0.001" in dump_config(cfg)


def test_transformer_config_keeps_k_max_and_normalisation():
    cfg = tiny_config(**{"matryoshka.normalization": "softmax_topk"})
    tc = transformer_config(cfg)
    assert tc.moe_router_topk == 4
    assert tc.moe_router_pre_softmax is True
    assert tc.num_moe_experts == 8
    assert tc.moe_token_dispatcher_type == "alltoall"


def test_param_counts_match_the_built_model(single_process_mcore):
    from mmoe_megatron.model import build_model

    for overrides in ({}, {"model.tie_embeddings": True, "moe.layer_freq": 2},
                      {"moe.shared_expert_ffn_hidden_size": 48}, {"matryoshka.k_adapter_rank": 8}):
        cfg = tiny_config(**overrides)
        model = build_model(cfg, vocab_size=VOCAB)
        built = sum(p.numel() for p in model.parameters())
        counts = param_counts(cfg, VOCAB)
        assert counts.total == built, overrides
        # Active at k: the experts a token does not use are exactly the difference.
        expert = sum(p.numel() for n, p in model.named_parameters() if "layers.0.mlp.experts.local_experts.0." in n)
        num_moe = cfg.num_moe_layers
        # Of the adapters per k a token passes through its own k's only.
        adapters = sum(p.numel() for n, p in model.named_parameters() if "layers.0.mlp.router.k_adapter_" in n)
        unused = adapters - adapters // len(cfg.matryoshka.ks)
        assert bool(adapters) == ("matryoshka.k_adapter_rank" in overrides)
        for k in (1, 3, 8):
            active = param_counts(cfg, VOCAB, k).active
            assert counts.total - active == num_moe * ((8 - k) * expert + unused)


def test_active_params_per_layer_vector():
    cfg = tiny_config()
    per_layer = param_counts(cfg, VOCAB, [1, 2, 3, 4]).active
    uniform = [param_counts(cfg, VOCAB, k).active for k in (1, 2, 3, 4)]
    assert per_layer == pytest.approx(sum(uniform) / 4)
    with pytest.raises(ValueError, match="one per MoE layer"):
        param_counts(cfg, VOCAB, [1, 2])


def test_flops_grow_linearly_with_k():
    cfg = tiny_config()
    f = [flops_per_token(cfg, VOCAB, k) for k in (1, 2, 3)]
    expert_flops = 2 * 3 * cfg.model.hidden_size * cfg.moe.expert_ffn_hidden_size * cfg.num_moe_layers
    assert f[1] - f[0] == pytest.approx(expert_flops)
    assert f[2] - f[1] == pytest.approx(expert_flops)


def test_vocab_is_padded_for_tensor_parallelism():
    cfg = tiny_config(**{"model.make_vocab_size_divisible_by": 128})
    assert padded_vocab_size(cfg, 1000) == 1024
    cfg = tiny_config(**{"model.make_vocab_size_divisible_by": 128, "parallel.tensor": 2,
                         "train.global_batch_size": 16})
    assert padded_vocab_size(cfg, 1000) == 1024
    assert padded_vocab_size(cfg, 1025) == 1280


def test_config_tree_round_trips_through_to_dict():
    cfg = load_config(TINY)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_every_shipped_config_loads():
    root = os.path.dirname(TINY)
    names = [n for n in os.listdir(root) if n.endswith(".yaml")]
    assert names
    for name in names:
        load_config(os.path.join(root, name))


@pytest.mark.parametrize("overrides, field, message", [
    ({"matryoshka.sandwich": 0.3}, "matryoshka.sandwich", "whole samples"),     # 0.15 x 16 samples
    ({"matryoshka.coupled": 0.1}, "matryoshka.coupled", "whole samples"),
    ({"matryoshka.sandwich": 0.5, "matryoshka.strategy": "fixed", "matryoshka.ks": [2]},
     "matryoshka.sandwich", "only for an elastic model"),
    ({"matryoshka.distill_coeff": 0.5, "matryoshka.method": "top_p", "matryoshka.strategy": "fixed",
      "matryoshka.ks": [4]}, "matryoshka.distill_coeff", "only for an elastic model"),
    ({"matryoshka.distill_coeff": 0.5, "parallel.tensor": 2}, "matryoshka.distill_coeff", "tensor parallel"),
    ({"matryoshka.distill_coeff": 1.0}, "matryoshka.distill_coeff", "< 1"),
    ({"matryoshka.shrink_fraction": 0.5, "matryoshka.strategy": "fixed", "matryoshka.ks": [4]},
     "matryoshka.shrink_fraction", "only for an elastic model"),
    ({"matryoshka.gate_temperature": "learned", "matryoshka.strategy": "fixed", "matryoshka.ks": [4]},
     "matryoshka.gate_temperature", "needs an elastic model"),
    ({"matryoshka.gate_temperature": "learned", "matryoshka.normalization": "softmax_topk"},
     "matryoshka.gate_temperature", "topk_softmax"),
    ({"matryoshka.gate_temperature": "learned", "matryoshka.normalization": "nested"},
     "matryoshka.gate_temperature", "topk_softmax"),
    ({"matryoshka.normalization": "nested", "matryoshka.method": "emoe", "matryoshka.strategy": "fixed",
      "matryoshka.ks": [2], "matryoshka.emoe_pool_k": 4}, "matryoshka.normalization", "method emoe"),
    ({"matryoshka.normalization": "nested", "matryoshka.strategy": "fixed", "matryoshka.ks": [1]},
     "matryoshka.normalization", "use softmax_topk for a k = 1 model"),
    ({"matryoshka.late_fraction": 0.25}, "matryoshka.late_probs", "one probability per k"),
    ({"matryoshka.late_fraction": 0.25, "matryoshka.late_probs": [0.5, 0.5, 0.5, 0.5]},
     "matryoshka.late_probs", "summing to 1"),
    ({"matryoshka.late_probs": [0.1, 0.2, 0.3, 0.4]}, "matryoshka.late_probs", "only used with late_fraction"),
    ({"matryoshka.late_fraction": 0.5, "matryoshka.late_probs": [1.0], "matryoshka.strategy": "fixed",
      "matryoshka.ks": [4]}, "matryoshka.late_fraction", "only for an elastic model"),
    ({"matryoshka.late_fraction": 0.5, "matryoshka.late_probs": [0.1, 0.2, 0.3, 0.4],
      "matryoshka.shrink_fraction": 0.75, "matryoshka.widths": [1.0]}, "matryoshka.late_fraction", "exceed the run"),
    ({"matryoshka.late_fraction": 0.5, "matryoshka.late_probs": [0.1, 0.2, 0.3, 0.4],
      "matryoshka.widths": [0.5, 1.0], "matryoshka.width_pairing": "joint"}, "matryoshka.late_fraction",
     "width_pairing: independent"),
    ({"matryoshka.gate_gain": "learned", "matryoshka.strategy": "fixed", "matryoshka.ks": [4]},
     "matryoshka.gate_gain", "needs an elastic model"),
    ({"matryoshka.gate_gain": "learned", "matryoshka.normalization": "softmax_topk"},
     "matryoshka.gate_gain", "topk_softmax"),
    ({"matryoshka.gate_gain": "channels", "matryoshka.strategy": "fixed", "matryoshka.ks": [4]},
     "matryoshka.gate_gain", "needs an elastic model"),
    ({"matryoshka.rank_gate": "learned", "matryoshka.strategy": "fixed", "matryoshka.ks": [4]},
     "matryoshka.rank_gate", "needs an elastic model"),
    ({"matryoshka.rank_gate": "learned", "matryoshka.normalization": "nested",
      "matryoshka.gate_temperature": "none"}, "matryoshka.rank_gate", "nested learns its own"),
    ({"matryoshka.k_adapter_rank": 8, "matryoshka.strategy": "fixed", "matryoshka.ks": [4]},
     "matryoshka.k_adapter_rank", "needs an elastic model"),
    ({"matryoshka.k_adapter_rank": 65}, "matryoshka.k_adapter_rank", "exceeds model.hidden_size=64"),
    ({"matryoshka.gate_temperature_floor": 0.3, "matryoshka.gate_temperature": "none"},
     "matryoshka.gate_temperature_floor", "set gate_temperature: learned"),
    ({"matryoshka.gate_temperature_floor": 0.3, "matryoshka.strategy": "fixed", "matryoshka.ks": [4]},
     "matryoshka.gate_temperature_floor", "set gate_temperature: learned"),
    ({"data.mock": True, "model.vocab_size": 256, "data.train_fraction": 0.5}, "data.train_fraction",
     "data.mock has none"),
    ({"data.train_fraction": 0.0}, "data.train_fraction", "must be > 0"),
])
def test_training_methods_refuse_what_they_cannot_do(tiny_config_path, overrides, field, message):
    from mmoe_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message) as err:
        load_config(tiny_config_path, list(overrides.items()))
    assert err.value.path == field


@pytest.mark.parametrize("overrides, field, message", [
    # Experts of 64 columns (tiny.yaml): 0.3 x 64 = 19.2 is not a whole number of columns.
    ({"matryoshka.widths": [0.3, 1.0]}, "matryoshka.widths[0]", r"19\.2 columns.*multiples of 1/64"),
    ({"matryoshka.widths": [0.25, 0.5]}, "matryoshka.widths", "must contain 1.0"),
    ({"matryoshka.widths": [0.5, 0.25, 1.0]}, "matryoshka.widths", "strictly increasing"),
    ({"matryoshka.widths": [0.0, 1.0]}, "matryoshka.widths", "must be > 0"),
    ({"matryoshka.widths": [0.5, 1.0], "matryoshka.width_probs": [1.0]}, "matryoshka.width_probs", "one probability per width"),
    ({"matryoshka.widths": [1.0], "matryoshka.width_strategy": "token"}, "matryoshka.width_strategy", "more than one width"),
    ({"matryoshka.widths": [0.5, 1.0], "matryoshka.width_pairing": "joint", "matryoshka.width_strategy": "layerwise"},
     "matryoshka.width_pairing", "drawn as often"),
    ({"matryoshka.widths": [0.5, 1.0], "parallel.tensor": 2}, "matryoshka.widths", "tensor parallelism"),
    ({"matryoshka.widths": [0.5, 1.0], "matryoshka.shrink_fraction": 0.5}, "matryoshka.shrink_fraction",
     "not the widths"),
    ({"matryoshka.widths": [0.5, 1.0], "matryoshka.method": "top_p", "matryoshka.strategy": "fixed",
      "matryoshka.ks": [4]}, "matryoshka.widths", "method matryoshka"),
])
def test_bad_widths_are_refused_at_load(tiny_config_path, overrides, field, message):
    from mmoe_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message) as err:
        load_config(tiny_config_path, list(overrides.items()))
    assert err.value.path == field


ELASTIC_WIDTHS = [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("overrides, temperature, widths", [
    ({}, "learned", ELASTIC_WIDTHS),  # tiny.yaml: elastic, topk_softmax, experts of 64 columns
    ({"matryoshka.strategy": "fixed", "matryoshka.ks": [2]}, "none", [1.0]),  # a specialist
    ({"matryoshka.ks": [4]}, "none", [1.0]),  # one k, drawn per token
    ({"matryoshka.method": "top_p", "matryoshka.strategy": "fixed", "matryoshka.ks": [4]}, "none", [1.0]),
    ({"matryoshka.normalization": "softmax_topk"}, "none", ELASTIC_WIDTHS),
    ({"matryoshka.normalization": "nested"}, "none", ELASTIC_WIDTHS),
    ({"parallel.tensor": 2}, "learned", [1.0]),
    ({"matryoshka.shrink_fraction": 0.5}, "learned", [1.0]),
    ({"moe.expert_ffn_hidden_size": 30}, "learned", [1.0]),  # 0.25 x 30 is no whole column
    ({"matryoshka.gate_temperature": "none", "matryoshka.widths": [0.5, 1.0]}, "none", [0.5, 1.0]),
    ({"matryoshka.gate_temperature": "auto", "matryoshka.widths": "auto"}, "learned", ELASTIC_WIDTHS),
])
def test_auto_settings_resolve_by_what_the_model_trains(overrides, temperature, widths, tmp_path):
    cfg = load_config(TINY, list(overrides.items()))
    assert (cfg.matryoshka.gate_temperature, cfg.matryoshka.widths) == (temperature, widths)
    # A saved config writes an auto setting as auto and an explicit one as given; it loads equal.
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    saved = yaml.safe_load(path.read_text())["matryoshka"]
    for name, value in (("gate_temperature", temperature), ("widths", widths)):
        given = overrides.get(f"matryoshka.{name}", "auto")
        assert saved[name] == ("auto" if given == "auto" else value)
    assert load_config(str(path)) == cfg
    assert yaml.safe_load(dump_config(cfg))["matryoshka"]["widths"] == widths  # what trains


def test_a_specialist_derived_from_a_saved_elastic_config_trains_full_width_without_temperatures(tmp_path):
    path = tmp_path / "elastic.yaml"
    save_config(load_config(TINY), str(path))
    specialist = load_config(str(path), [("matryoshka.strategy", "fixed"), ("matryoshka.ks", [2])])
    assert (specialist.matryoshka.gate_temperature, specialist.matryoshka.widths) == ("none", [1.0])


def test_auto_widths_that_resolve_to_full_width_refuse_width_settings():
    with pytest.raises(ConfigError, match="more than one width") as err:
        load_config(TINY, [("matryoshka.strategy", "fixed"), ("matryoshka.ks", [2]),
                           ("matryoshka.width_probs", [1.0])])
    assert err.value.path == "matryoshka.width_probs"
    with pytest.raises(ConfigError, match=r"expected 'auto' \| list of float"):
        load_config(TINY, [("matryoshka.widths", "half")])


def test_a_suite_budget_or_point_no_member_can_run_is_refused_at_load(tmp_path):
    """Budgets below every grid point and widths without whole columns fail when the suite loads."""
    import yaml

    from mmoe_megatron.config import ConfigError
    from mmoe_megatron.evaluation.suite import load_suite

    def suite(**eval_spec):
        path = tmp_path / "suite.yaml"
        path.write_text(yaml.safe_dump({
            "name": "s", "base": TINY, "overrides": {"data.mock": True, "model.vocab_size": 256},
            "members": [{"name": "both", "role": "elastic", "overrides": {"matryoshka.widths": [0.25, 0.5, 1.0]}}],
            "eval": eval_spec}))
        return str(path)

    assert load_suite(suite(widths=[0.25, 0.5], budgets=[2.0e6])).eval.budgets == [2.0e6]
    for spec, field, message in [
        ({"widths": [0.3]}, "eval.widths[0]", "19.2 columns"),
        ({"points": ["[1,2]@0.5"]}, "eval.points[0]", "per-layer k vector needs 4 entries"),
        ({"points": ["2@0.1"]}, "eval.points[0]", "6.4 columns"),
        ({"budgets": [1.0e5]}, "eval.budgets[0]", "below every point of the grid"),
        ({"budgets": [2.0e6], "budget_members": ["nobody"]}, "eval.budget_members[0]", "no member 'nobody'"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            load_suite(suite(**spec))
        assert err.value.path == field


def test_override_args_are_read_back_as_the_overrides_they_came_from():
    from mmoe_megatron.config import override_args, parse_overrides

    overrides = [("name", "run-a"), ("train.train_iters", 12), ("optimizer.lr", 3e-4), ("checkpoint.load", None),
                 ("matryoshka.ks", [1, 2, 4]), ("matryoshka.widths", [0.25, 1.0]), ("logging.tensorboard", False),
                 ("data.blend", [{"prefix": "data/x", "weight": 1.0}])]
    args = override_args(overrides)
    assert args[:4] == ["--name=run-a", "--train.train_iters=12", "--optimizer.lr=0.0003", "--checkpoint.load=null"]
    assert parse_overrides(args) == overrides


def test_small_k_draws_need_a_smaller_k_than_k_max():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [("matryoshka.ks", [4]), ("matryoshka.strategy", "global"),
                           ("matryoshka.distribution", "small_k"), ("matryoshka.k_max_share", 0.05)])
    assert err.value.path == "matryoshka.distribution"
    assert "use distribution uniform" in str(err.value)
