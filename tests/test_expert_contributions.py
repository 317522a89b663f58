"""bench.expert_contributions: the per-token metrics on outputs written by hand, the probe's
recomputed expert outputs against what the MoE layers return, and the report's seed cells."""

import math
from types import SimpleNamespace

import pytest
import torch

from bench import expert_contributions as ec
from tests.helpers import VOCAB, forward_loss, set_gate_log_temperatures, tiny_batch, tiny_config


def test_token_stats_by_hand():
    # Token 0: two orthogonal unit outputs, weights 0.75 / 0.25. Token 1: the same output twice.
    w_TK = torch.tensor([[0.75, 0.25], [0.6, 0.4]])
    f_TKH = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 2.0]]])
    stats = ec.token_stats(w_TK, f_TKH)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert stats["effective"].tolist() == pytest.approx([math.exp(entropy), math.exp(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))])
    assert stats["added_weight"].tolist() == pytest.approx([0.25, 0.4])
    # |0.25 e2| / |0.75 e1 + 0.25 e2|; token 1: 0.8 of a total of 2.
    assert stats["added_norm"].tolist() == pytest.approx([0.25 / math.hypot(0.75, 0.25), 0.4])
    assert stats["alignment"].tolist() == pytest.approx([0.0, 1.0])
    assert stats["similarity"].tolist() == pytest.approx([0.0, 1.0])
    assert stats["output_norm"].tolist() == pytest.approx([math.hypot(0.75, 0.25), 2.0])


def test_token_stats_four_experts_and_one():
    # k = 4: ranks 3 and 4 are the added ones; they point against the prefix.
    w_TK = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    f_TKH = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]]])
    stats = ec.token_stats(w_TK, f_TKH)
    prefix, added = torch.tensor([0.7, 0.0]), torch.tensor([-0.2, -0.1])
    assert stats["added_weight"].item() == pytest.approx(0.3)
    assert stats["added_norm"].item() == pytest.approx(float(added.norm() / (prefix + added).norm()))
    assert stats["alignment"].item() == pytest.approx(-0.2 / math.hypot(0.2, 0.1))
    # Pairs: (1,2) 1, (1,3) -1, (1,4) 0, (2,3) -1, (2,4) 0, (3,4) 0 -> mean -1/6.
    assert stats["similarity"].item() == pytest.approx(-1 / 6)
    one = ec.token_stats(torch.tensor([[1.0]]), torch.tensor([[[3.0, 4.0]]]))
    assert set(one) == {"effective", "output_norm"} and one["effective"].item() == pytest.approx(1.0)
    assert one["output_norm"].item() == pytest.approx(5.0)
    # Weights summing to 2 (a gain): the output is twice the weighted mean.
    two = ec.token_stats(torch.tensor([[1.0, 1.0]]), torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))
    assert two["output_norm"].item() == pytest.approx(2.0)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_probe_recomputes_what_the_moe_layers_return(single_process_mcore, k):
    """At a uniform k, sum_r w_r f_r from the probe's own expert forwards equals each MoE layer's
    output, learned gate temperatures included; the sums count every token of every layer."""
    from mmoe_megatron.evaluation.core import set_point
    from mmoe_megatron.model import build_model, moe_layers

    cfg = tiny_config(**{"matryoshka.ks": [1, 2, 4, 8], "data.seq_length": 16})
    model = build_model(cfg, VOCAB)
    set_gate_log_temperatures(model)
    model.eval()
    outputs = {}
    layers = moe_layers(model)
    # A copy: the transformer layer adds its residual into the MoE output in place.
    handles = [layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out[0].clone()))
               for i, layer in enumerate(layers)]
    tokens, labels = tiny_batch(cfg, 3)
    set_point(model, k)
    try:
        with torch.no_grad(), ec.ContributionProbe(model, keep_last=True) as probe:
            probe.begin("k")
            forward_loss(model, tokens, labels)
    finally:
        for h in handles:
            h.remove()
    assert len(outputs) == len(layers) == len(probe.last_output) > 1
    for i, output_SBH in outputs.items():
        torch.testing.assert_close(probe.last_output[i], output_SBH.reshape(-1, output_SBH.shape[-1]),
                                   rtol=1e-5, atol=1e-6)
    assert probe.tokens["k"] == [3 * 16] * len(layers)
    means = probe.means("k")
    assert ("added_weight" in means) == (k > 1)
    assert 1.0 <= means["effective"] <= k + 1e-9


def test_probe_measures_each_ks_adapter_against_the_layers_output(single_process_mcore):
    """With adapters per k: the layer returns y + B_k A_k y; the probe's y is the experts' part and
    its adapter norm the mean over tokens of |output - y| / |y| (0 with the maps at their start, up to
    the recomputed experts' rounding)."""
    from mmoe_megatron.evaluation.core import set_point
    from mmoe_megatron.model import build_model, moe_layers

    cfg = tiny_config(**{"matryoshka.ks": [1, 2, 4], "data.seq_length": 16, "matryoshka.k_adapter_rank": 4})
    model = build_model(cfg, VOCAB)
    model.eval()
    layers = moe_layers(model)
    outputs = {}
    handles = [layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out[0].clone()))
               for i, layer in enumerate(layers)]
    tokens, labels = tiny_batch(cfg, 2)
    try:
        for scale in (0.0, 0.1):
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for layer in layers:
                    layer.router.k_adapter_out.copy_(torch.randn(layer.router.k_adapter_out.shape, generator=gen) * scale)
            for k in (1, 2, 4):
                set_point(model, k)
                with torch.no_grad(), ec.ContributionProbe(model, keep_last=True) as probe:
                    probe.begin("k")
                    forward_loss(model, tokens, labels)
                means = probe.means("k")
                for i, layer_means in enumerate(means["layers"]):
                    out_TH = outputs[i].reshape(-1, outputs[i].shape[-1]).double()
                    y_TH = probe.last_output[i].double()
                    expected = float(((out_TH - y_TH).norm(dim=1) / y_TH.norm(dim=1)).mean())
                    assert layer_means["adapter_norm"] == pytest.approx(expected, rel=1e-3, abs=1e-5), (scale, k, i)
                    assert (expected > 0.01) == (scale > 0)
    finally:
        for h in handles:
            h.remove()


def test_probe_refuses_tokens_at_different_ks(single_process_mcore):
    from mmoe_megatron.model import build_model, elastic_routers

    cfg = tiny_config(**{"matryoshka.ks": [1, 2, 4, 8], "data.seq_length": 16})
    model = build_model(cfg, VOCAB)
    model.eval()
    tokens, labels = tiny_batch(cfg, 2)
    ks_SB = torch.tensor([1, 2, 4, 8]).repeat(4).unsqueeze(1).expand(16, 2).contiguous()
    for router in elastic_routers(model):
        router.set_token_ks(ks_SB, width=8)
    with torch.no_grad(), ec.ContributionProbe(model) as probe:
        probe.begin("mixed")
        with pytest.raises(ValueError, match="one k for every token; evaluate at a uniform k"):
            forward_loss(model, tokens, labels)


def test_probe_refuses_experts_below_full_width(single_process_mcore):
    from mmoe_megatron.evaluation.core import set_point
    from mmoe_megatron.model import build_model

    cfg = tiny_config(**{"matryoshka.ks": [1, 2, 4, 8], "data.seq_length": 16})
    model = build_model(cfg, VOCAB)
    model.eval()
    tokens, labels = tiny_batch(cfg, 2)
    set_point(model, 2, 0.5)
    with torch.no_grad(), ec.ContributionProbe(model) as probe:
        probe.begin("half width")
        with pytest.raises(ValueError, match="at full width; evaluate at width 1"):
            forward_loss(model, tokens, labels)


def test_report_cells_are_means_and_spreads_over_seeds():
    spec = SimpleNamespace(eval=SimpleNamespace(curve_ks=[1, 2], heldout=[], data_seed=None),
                           members=[SimpleNamespace(name="elastic"), SimpleNamespace(name="k2")])

    def record(member, seed, added_weight):
        return {"member": member, "role": "elastic", "seed": seed, "num_samples": 8, "by_domain": {"valid": {
            "1": {"loss": 4.0, "effective": 1.0},
            "2": {"loss": 3.9, "effective": 1.5, "added_weight": added_weight, "added_norm": 0.2,
                  "alignment": 0.5, "similarity": 0.1}}}}

    markdown, data = ec.report(spec, [record("elastic", 1, 0.2), record("elastic", 2, 0.4), record("k2", 1, 0.3)])
    assert data["metrics"]["elastic"]["valid"]["added_weight"] == {"1": [], "2": [0.2, 0.4]}
    assert "| elastic | 2 | added weight |  | 0.300 ± 0.141 |" in markdown
    assert "| k2 | 1 | added weight |  | 0.300 |" in markdown
