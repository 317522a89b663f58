"""Building the model: every MoE layer of the config gets the elastic router, whatever form the
installed megatron-core gives its layer specs, or the build fails naming the layers."""

import dataclasses
import functools

import pytest
import torch

from mmoe_megatron import compat, model
from mmoe_megatron.config.derive import transformer_config
from tests.helpers import VOCAB, tiny_config


def test_every_moe_layer_is_elastic(single_process_mcore):
    from mmoe_megatron.router import MatryoshkaMoELayer, MatryoshkaRouter

    cfg = tiny_config(**{"moe.layer_freq": [1, 0, 1, 1]})
    built = model.build_model(cfg, VOCAB)
    kinds = [(type(layer.mlp).__name__, type(getattr(layer.mlp, "router", None)).__name__)
             for layer in built.decoder.layers]
    assert kinds == [("MatryoshkaMoELayer", "MatryoshkaRouter"), ("MLP", "NoneType"),
                     ("MatryoshkaMoELayer", "MatryoshkaRouter"), ("MatryoshkaMoELayer", "MatryoshkaRouter")]
    assert all(isinstance(r, MatryoshkaRouter) for r in model.elastic_routers(built))
    assert isinstance(built.decoder.layers[0].mlp, MatryoshkaMoELayer)


def test_stock_layers_from_the_spec_function_fail_the_build(single_process_mcore, monkeypatch):
    """A spec function that hands back megatron's stock MoE layers (what a spec form the project
    does not recognise amounts to) must not give a silently fixed-k model."""
    original = model.layer_specs
    monkeypatch.setattr(model, "layer_specs",
                        lambda cfg, tconfig, stock_routing=False: original(cfg, tconfig, stock_routing=True))
    with pytest.raises(model.ElasticRoutingError) as error:
        model.build_model(tiny_config(), VOCAB)
    message = str(error.value)
    for number in (1, 2, 3, 4):
        assert f"layer {number}: MLP is megatron.core.transformer.moe.moe_layer.MoELayer" in message
    assert "mmoe_megatron.compat.moe_mlp_entry" in message


def test_an_unrecognised_spec_form_fails_the_build(single_process_mcore, monkeypatch):
    # What 0.19.2 looked like to a project that only knew 0.16.1's ModuleSpec form.
    monkeypatch.setattr(compat, "moe_mlp_entry", lambda mlp: None)
    with pytest.raises(model.ElasticRoutingError, match="layer 1: MLP is"):
        model.build_model(tiny_config(), VOCAB)


def test_the_stock_router_inside_the_elastic_layer_fails_the_build(single_process_mcore, monkeypatch):
    from megatron.core.transformer.moe.router import TopKRouter

    monkeypatch.setattr(model, "router_builder", lambda cfg: TopKRouter)
    with pytest.raises(model.ElasticRoutingError,
                       match="layer 2: router is megatron.core.transformer.moe.router.TopKRouter"):
        model.build_model(tiny_config(), VOCAB)


def test_slimmable_experts_pass_the_check_and_stock_experts_with_widths_fail(single_process_mcore, monkeypatch):
    from mmoe_megatron.slimmable import SlimmableSequentialMLP

    cfg = tiny_config(**{"matryoshka.widths": [0.5, 1.0]})
    built = model.build_model(cfg, VOCAB)
    assert all(type(layer.mlp.experts) is SlimmableSequentialMLP for layer in built.decoder.layers)

    # Experts that megatron-core builds in a form the project does not recognise stay stock.
    monkeypatch.setattr(model, "experts_spec", lambda cfg, experts: experts)
    with pytest.raises(model.ElasticRoutingError,
                       match=r"layer 3: experts are .*SequentialMLP, not slimmable experts"):
        model.build_model(cfg, VOCAB)
    # With one width the stock experts are the same model, and are accepted.
    model.build_model(tiny_config(**{"matryoshka.widths": [1.0]}), VOCAB)


def test_stock_routing_is_still_allowed_when_asked_for(single_process_mcore):
    from megatron.core.transformer.moe.router import TopKRouter

    built = model.build_model(tiny_config(), VOCAB, stock_routing=True)
    assert all(type(layer.mlp.router) is TopKRouter for layer in built.decoder.layers)


def _stock_moe_entry(cfg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

    specs = get_gpt_decoder_layer_specs(transformer_config(cfg), use_transformer_engine=False,
                                        normalization="RMSNorm")
    return specs[0].submodules.mlp


def test_both_forms_of_the_moe_entry_are_recognised_and_rebuilt(single_process_mcore):
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mmoe_megatron.router import MatryoshkaMoELayer

    installed = compat.moe_mlp_entry(_stock_moe_entry(tiny_config()))
    assert installed is not None and installed.module is MoELayer
    assert installed.form == ("partial" if compat.megatron_core_version() >= (0, 17, 0) else "module_spec")

    submodules = MoESubmodules(experts=object())
    as_spec = ModuleSpec(module=MoELayer, submodules=submodules, params={"extra": 1})
    as_partial = functools.partial(MoELayer, submodules=submodules, extra=1)
    for entry, form in ((as_spec, "module_spec"), (as_partial, "partial")):
        found = compat.moe_mlp_entry(entry)
        assert (found.module, found.submodules, found.params, found.form) == (MoELayer, submodules, {"extra": 1}, form)
        new_submodules = dataclasses.replace(submodules, router=object())
        rebuilt = compat.moe_mlp_entry(compat.with_moe_mlp(entry, MatryoshkaMoELayer, new_submodules))
        assert (rebuilt.module, rebuilt.submodules, rebuilt.params, rebuilt.form) == (
            MatryoshkaMoELayer, new_submodules, {"extra": 1}, form)
    # Dense MLP entries are not MoE entries.
    assert compat.moe_mlp_entry(functools.partial(dict)) is None
    assert compat.moe_mlp_entry(ModuleSpec(module=dict)) is None


def test_both_forms_of_the_experts_entry_are_recognised_and_rebuilt(single_process_mcore):
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mmoe_megatron.slimmable import SlimmableSequentialMLP

    installed = compat.experts_entry(compat.moe_mlp_entry(_stock_moe_entry(tiny_config())).submodules.experts)
    assert installed is not None and installed.module is SequentialMLP
    assert installed.form == ("partial" if compat.megatron_core_version() >= (0, 17, 0) else "module_spec")

    submodules = object()
    as_spec = ModuleSpec(module=SequentialMLP, submodules=submodules, params={"extra": 1})
    as_partial = functools.partial(SequentialMLP, submodules=submodules, extra=1)
    for entry, form in ((as_spec, "module_spec"), (as_partial, "partial")):
        found = compat.experts_entry(entry)
        assert (found.module, found.submodules, found.params, found.form) == (SequentialMLP, submodules, {"extra": 1}, form)
        rebuilt = compat.experts_entry(compat.with_experts(entry, SlimmableSequentialMLP, widths=(0.5, 1.0)))
        assert (rebuilt.module, rebuilt.submodules, rebuilt.params, rebuilt.form) == (
            SlimmableSequentialMLP, submodules, {"extra": 1, "widths": (0.5, 1.0)}, form)
    assert compat.experts_entry(object()) is None


def test_grouped_gemm_experts_draw_their_weights_from_the_sequential_names():
    from mmoe_megatron.layout import sequential_name

    assert sequential_name("decoder.layers.3.mlp.experts.linear_fc1.weight12") == \
        "decoder.layers.3.mlp.experts.local_experts.12.linear_fc1.weight"
    assert sequential_name("decoder.layers.0.mlp.experts.linear_fc2.weight0") == \
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"
    for unchanged in ("decoder.layers.3.mlp.experts.local_experts.2.linear_fc2.weight",
                      "decoder.layers.3.self_attention.linear_qkv.weight", "output_layer.weight"):
        assert sequential_name(unchanged) == unchanged


def test_init_seed_fixes_the_initial_weights_whatever_train_seed(single_process_mcore):
    def weights(**overrides):
        return {n: p.detach().clone() for n, p in model.build_model(tiny_config(**overrides), VOCAB).named_parameters()}

    fixed_1 = weights(**{"train.seed": 1, "model.init_seed": 7})
    fixed_2 = weights(**{"train.seed": 2, "model.init_seed": 7})
    default_7 = weights(**{"train.seed": 7})
    default_1 = weights(**{"train.seed": 1})
    matrices = [n for n, p in fixed_1.items() if p.dim() > 1]
    assert matrices
    assert all(torch.equal(fixed_1[n], fixed_2[n]) and torch.equal(fixed_1[n], default_7[n]) for n in fixed_1)
    assert all(not torch.equal(fixed_1[n], default_1[n]) for n in matrices)
