"""MatryoshkaRouter on one process: selection, nesting, normalisation, gradients, inference API."""

import pytest
import torch

from mmoe_megatron.config.derive import transformer_config
from tests.helpers import VOCAB, forward_loss, tiny_batch, tiny_config

E = 8


def make_router(single_process_mcore, **overrides):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from mmoe_megatron.router import MatryoshkaRouter

    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    router = MatryoshkaRouter(
        transformer_config(cfg), get_default_pg_collection(),
        k1_router_grad=cfg.matryoshka.k1_router_grad,
        temperature_ks=cfg.matryoshka.ks if cfg.matryoshka.gate_temperature == "learned" else None,
        nested=cfg.matryoshka.normalization == "nested",
        temperature_floor=cfg.matryoshka.gate_temperature_floor,
        gain_ks=cfg.matryoshka.ks if cfg.matryoshka.gate_gain == "learned" else None,
        rank_gates=cfg.matryoshka.rank_gate == "learned",
    )
    return router


def hidden(seq=16, batch=3, seed=0):
    return torch.randn(seq, batch, 64, generator=torch.Generator().manual_seed(seed))


def expected_topk_sets(logits_TE, k):
    """Reference selection, independent of the router: argsort of the logits."""
    order = torch.argsort(logits_TE, dim=1, descending=True)
    return [set(row[:k].tolist()) for row in order]


@pytest.mark.parametrize("normalization", ["topk_softmax", "softmax_topk"])
def test_exactly_k_experts_and_they_are_the_top_k(single_process_mcore, normalization):
    router = make_router(single_process_mcore, **{"matryoshka.normalization": normalization})
    router.eval()
    x = hidden()
    logits_TE = router.gating(x).view(-1, E)
    previous = None
    for k in range(1, E + 1):  # beyond the training range (k_max=4) up to all experts
        router.set_k(k)
        probs_TE, map_TE = router(x)
        assert (map_TE.sum(dim=1) == k).all()
        chosen = [set(torch.nonzero(row).flatten().tolist()) for row in map_TE]
        assert chosen == expected_topk_sets(logits_TE, k)
        # Nesting: the experts at k are a prefix of those at k + 1.
        if previous is not None:
            assert all(p < c for p, c in zip(previous, chosen))
        previous = chosen
        assert ((probs_TE > 0) == map_TE).all()


def test_weight_sums_follow_the_normalisation(single_process_mcore):
    x = hidden()
    ra = make_router(single_process_mcore)
    rb = make_router(single_process_mcore, **{"matryoshka.normalization": "softmax_topk"})
    full_TE = torch.softmax(ra.gating(x).view(-1, E), dim=-1)
    sorted_TE = torch.sort(full_TE, dim=1, descending=True).values
    sums = []
    for k in (1, 2, 4, 8):
        ra.set_k(k)
        rb.set_k(k)
        pa, _ = ra(x)
        pb, _ = rb(x)
        # top-k then softmax: the weights of every token sum to 1 at every k.
        assert torch.allclose(pa.sum(dim=1), torch.ones(pa.shape[0]), atol=1e-6)
        # softmax then top-k: they sum to the top-k mass of the full softmax (< 1 below k = E).
        assert torch.allclose(pb.sum(dim=1), sorted_TE[:, :k].sum(dim=1), atol=1e-6)
        sums.append(pb.sum(dim=1).mean().item())
    assert sums == sorted(sums) and sums[0] < 1 and sums[-1] == pytest.approx(1.0)


def test_per_token_ks(single_process_mcore):
    router = make_router(single_process_mcore)
    x = hidden(seq=16, batch=3)
    ks_SB = torch.randint(1, 5, (16, 3), generator=torch.Generator().manual_seed(1))
    router.set_token_ks(ks_SB, width=4)
    probs_TE, map_TE = router(x)
    assert torch.equal(map_TE.sum(dim=1), ks_SB.reshape(-1))
    logits_TE = router.gating(x).view(-1, E)
    for t, k in enumerate(ks_SB.reshape(-1).tolist()):
        assert set(torch.nonzero(map_TE[t]).flatten().tolist()) == expected_topk_sets(logits_TE[t:t + 1], k)[0]
    assert torch.allclose(probs_TE.sum(dim=1), torch.ones(48), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        router.set_token_ks(ks_SB[:8], width=4)
        router(x)


def test_invalid_k_is_refused(single_process_mcore):
    router = make_router(single_process_mcore)
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="1..8"):
            router.set_k(bad)


@pytest.mark.parametrize(
    "norm, k", [("softmax_topk", 1), ("softmax_topk", 2), ("topk_softmax", 2), ("topk_softmax", 4)]
)
def test_fixed_k_equals_stock_megatron_topk_router(single_process_mcore, norm, k):
    """At one k the Matryoshka router reproduces megatron-core's TopKRouter (probs, map, aux)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    if True:
        cfg = tiny_config(**{"matryoshka.normalization": norm, "matryoshka.strategy": "fixed",
                             "matryoshka.ks": [k], "matryoshka.k1_router_grad": "none"})
        tc = transformer_config(cfg)
        ours = make_router(single_process_mcore, **{"matryoshka.normalization": norm,
                                                    "matryoshka.strategy": "fixed", "matryoshka.ks": [k],
                                                    "matryoshka.k1_router_grad": "none"})
        stock = TopKRouter(tc, get_default_pg_collection())
        stock.load_state_dict(ours.state_dict())
        x = hidden().requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        p1, m1 = ours(x)
        p2, m2 = stock(x2)
        assert torch.equal(m1, m2)
        assert torch.allclose(p1, p2, atol=1e-7)
        # The aux loss attached to the probabilities gives the same gradients too.
        w = torch.randn_like(p1)
        (p1 * w).sum().backward()
        (p2 * w).sum().backward()
        assert torch.allclose(ours.weight.grad, stock.weight.grad, atol=1e-6)
        assert torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_k1_straight_through_gives_the_router_an_lm_gradient(single_process_mcore):
    """At k = 1 under top-k-then-softmax the weight is 1: with 'none' the router's LM gradient is
    exactly zero; with the straight-through estimator it is not, and the forward is unchanged."""
    x = hidden()
    outs = {}
    for mode in ("none", "straight_through"):
        router = make_router(single_process_mcore, **{"matryoshka.k1_router_grad": mode,
                                                      "moe.aux_loss_coeff": 0.0})
        router.train()
        router.set_k(1)
        probs_TE, _ = router(x)
        (probs_TE * torch.arange(1.0, E + 1)).sum().backward()  # a stand-in for the LM loss
        outs[mode] = (probs_TE.detach(), router.weight.grad.abs().sum().item())
    assert torch.equal(outs["none"][0], outs["straight_through"][0])
    assert outs["none"][1] == 0.0
    assert outs["straight_through"][1] > 1e-3


def test_set_topk_applies_a_per_layer_vector_to_the_right_layers(single_process_mcore):
    from mmoe_megatron.model import build_model, current_topk, elastic_routers, set_topk

    cfg = tiny_config()
    model = build_model(cfg, VOCAB)
    tokens, labels = tiny_batch(cfg, 2)
    set_topk(model, [1, 5, 2, 8])  # 5 and 8 lie beyond the training range (k_max = 4)
    assert current_topk(model) == [1, 5, 2, 8]
    with torch.no_grad():
        forward_loss(model, tokens, labels)
    routers = elastic_routers(model)
    assert [r.layer_number for r in routers] == [1, 2, 3, 4]
    assert [r.last_k for r in routers] == [1, 5, 2, 8]
    with pytest.raises(ValueError, match="one k per MoE layer"):
        set_topk(model, [1, 2])


def test_loss_changes_with_k_and_is_reproducible(single_process_mcore):
    from mmoe_megatron.model import build_model, set_topk

    cfg = tiny_config()
    model = build_model(cfg, VOCAB)
    model.eval()
    tokens, labels = tiny_batch(cfg, 2)
    losses = {}
    with torch.no_grad():
        for k in (1, 2, 4):
            set_topk(model, k)
            losses[k] = forward_loss(model, tokens, labels).item()
        set_topk(model, 1)
        assert forward_loss(model, tokens, labels).item() == losses[1]
    assert len(set(losses.values())) == 3


# --- learned temperature per k ------------------------------------------------------------------


def test_temperature_interpolates_in_log_k_between_trained_ks():
    from mmoe_megatron.router import temperature_weights

    w_KE = temperature_weights((1, 2, 4, 8), 16)
    assert torch.equal(w_KE[:, 0], torch.zeros(4))
    for k, i in ((1, 0), (2, 1), (4, 2), (8, 3), (9, 3), (16, 3)):
        assert torch.equal(w_KE[:, k], torch.eye(4)[i])
    # log 3 lies 0.585 of the way from log 2 to log 4 (log2(1.5)); log 6 as far from log 4 to log 8.
    assert torch.allclose(w_KE[:, 3], torch.tensor([0.0, 0.41504, 0.58496, 0.0]), atol=1e-5)
    assert torch.allclose(w_KE[:, 6], torch.tensor([0.0, 0.0, 0.41504, 0.58496]), atol=1e-5)


def test_learned_temperature_divides_the_selected_logits_of_each_k(single_process_mcore):
    ks = [1, 2, 4]
    plain = make_router(single_process_mcore, **{"matryoshka.ks": ks})
    tempered = make_router(single_process_mcore, **{"matryoshka.ks": ks, "matryoshka.gate_temperature": "learned"})
    assert torch.equal(plain.weight, tempered.weight)  # same seed, same gate
    x = hidden()
    logits_TE = plain.gating(x).view(-1, E)
    # At temperature 1 (the initial value) the routing is the plain router's.
    for k in (1, 2, 3, 4):
        plain.set_k(k)
        tempered.set_k(k)
        assert torch.equal(plain(x)[0], tempered(x)[0])
    with torch.no_grad():
        tempered.log_temperature.copy_(torch.log(torch.tensor([1.0, 0.5, 3.0])))
    for k, t in ((2, 0.5), (4, 3.0), (3, 0.5 ** 0.41504 * 3.0 ** 0.58496), (6, 3.0)):
        tempered.set_k(k)
        probs_TE, map_TE = tempered(x)
        assert tempered.temperature(k) == pytest.approx(t, rel=1e-4)
        top_TK, ids_TK = torch.topk(logits_TE, k, dim=1)
        expected_TE = torch.zeros_like(logits_TE).scatter(1, ids_TK, torch.softmax(top_TK / t, dim=1))
        assert torch.equal(map_TE, expected_TE > 0)  # the same experts as at temperature 1
        assert torch.allclose(probs_TE, expected_TE, atol=1e-6)
    # Per-token ks: every token at its own k's temperature.
    assert_per_token_ks_route_as_each_k(tempered, x)


def assert_per_token_ks_route_as_each_k(router, x):
    """Random per-token ks in 1..4: each token's weights are those of the router set to its k."""
    ks_SB = torch.randint(1, 5, (16, 3), generator=torch.Generator().manual_seed(2))
    router.set_token_ks(ks_SB, width=4)
    per_token_TE, _ = router(x)
    for k in (1, 2, 3, 4):
        router.set_k(k)
        rows_T = ks_SB.reshape(-1) == k
        assert torch.allclose(per_token_TE[rows_T], router(x)[0][rows_T], atol=1e-6)


def test_learned_temperature_routes_a_bf16_router_as_its_fp32_original(single_process_mcore):
    # A bf16 model casts its buffers too; the temperature stays computed in fp32.
    ks = [1, 2, 4]
    router = make_router(single_process_mcore, **{"matryoshka.ks": ks, "matryoshka.gate_temperature": "learned"})
    with torch.no_grad():
        router.log_temperature.copy_(torch.log(torch.tensor([1.0, 0.5, 2.0])))
    half = make_router(single_process_mcore, **{"matryoshka.ks": ks, "matryoshka.gate_temperature": "learned"})
    half.load_state_dict(router.state_dict())
    half = half.to(torch.bfloat16)
    x = hidden()
    for k in (2, 3, 4):
        router.set_k(k)
        half.set_k(k)
        probs_TE, map_TE = router(x)
        half_TE, half_map_TE = half(x.to(torch.bfloat16))
        assert half.temperature(k) == pytest.approx(router.temperature(k), rel=1e-2)
        assert torch.allclose(half_TE.float(), probs_TE, atol=2e-2)


def test_learned_temperature_gets_a_gradient_only_from_ks_that_mix_experts(single_process_mcore):
    router = make_router(single_process_mcore, **{"matryoshka.ks": [1, 2, 4], "moe.aux_loss_coeff": 0.0,
                                                  "matryoshka.gate_temperature": "learned"})
    router.train()
    x = hidden()
    for k, moved in ((1, [False, False, False]), (4, [False, False, True]), (3, [False, True, True])):
        router.log_temperature.grad = None
        router.set_k(k)
        probs_TE, _ = router(x)
        (probs_TE * torch.arange(1.0, E + 1)).sum().backward()
        grad_K = router.log_temperature.grad
        assert [bool(g != 0) for g in grad_K] == moved, (k, grad_K)


def test_a_temperature_floor_clamps_the_learned_temperature_and_stops_its_gradient(single_process_mcore):
    """With a floor of 0.4: a learned temperature of 0.2 routes as 0.4 (the same weights as a router
    whose temperature is 0.4), gets no gradient, and temperatures above the floor are untouched."""
    ks = {"matryoshka.ks": [1, 2, 4], "matryoshka.gate_temperature": "learned", "moe.aux_loss_coeff": 0.0}
    floored = make_router(single_process_mcore, **ks, **{"matryoshka.gate_temperature_floor": 0.4})
    free = make_router(single_process_mcore, **ks)
    with torch.no_grad():
        floored.log_temperature.copy_(torch.log(torch.tensor([1.0, 0.8, 0.2])))
        free.log_temperature.copy_(torch.log(torch.tensor([1.0, 0.8, 0.4])))
    floored.train(), free.train()
    x = hidden()
    assert floored.temperature(4) == pytest.approx(0.4) and floored.temperature(2) == pytest.approx(0.8)
    for k in (2, 3, 4):
        floored.set_k(k), free.set_k(k)
        assert torch.allclose(floored(x)[0], free(x)[0], atol=1e-6)
    floored.set_k(4)
    (floored(x)[0] * torch.arange(1.0, E + 1)).sum().backward()
    assert floored.log_temperature.grad[2] == 0
    floored.log_temperature.grad = None
    floored.set_k(2)
    (floored(x)[0] * torch.arange(1.0, E + 1)).sum().backward()
    assert floored.log_temperature.grad[1] != 0  # above the floor it still learns


def test_a_model_with_learned_temperatures_starts_as_the_model_without(single_process_mcore):
    """Temperatures start at 1: the initial model's loss at every k equals the plain model's."""
    from mmoe_megatron.model import build_model, set_topk

    plain = build_model(tiny_config(), VOCAB)
    tempered = build_model(tiny_config(**{"matryoshka.gate_temperature": "learned"}), VOCAB)
    names = [n for n, _ in tempered.named_parameters() if n.endswith("log_temperature")]
    assert len(names) == 4  # one per MoE layer of tiny.yaml
    tokens, labels = tiny_batch(tiny_config(), 2)
    plain.eval(), tempered.eval()
    with torch.no_grad():
        for k in (1, 2, 3, 4, 6):
            set_topk(plain, k)
            set_topk(tempered, k)
            assert forward_loss(tempered, tokens, labels).item() == forward_loss(plain, tokens, labels).item()


def test_a_learned_gain_scales_the_combine_weights_of_each_k(single_process_mcore):
    """Gains 1, 2, 4 at ks 1, 2, 4: the weights are the plain router's times the gain of the token's
    k (interpolated in log k at k = 3), the experts chosen unchanged; per-token ks take their own."""
    ks = {"matryoshka.ks": [1, 2, 4], "moe.aux_loss_coeff": 0.0}
    plain = make_router(single_process_mcore, **ks)
    gained = make_router(single_process_mcore, **ks, **{"matryoshka.gate_gain": "learned"})
    x = hidden()
    for k in (1, 2, 4):  # at gain 1 (the initial value) the routing is the plain router's
        plain.set_k(k), gained.set_k(k)
        assert torch.equal(plain(x)[0], gained(x)[0])
    with torch.no_grad():
        gained.log_gain.copy_(torch.log(torch.tensor([1.0, 2.0, 4.0])))
    for k, g in ((1, 1.0), (2, 2.0), (4, 4.0), (3, 2.0 ** 0.41504 * 4.0 ** 0.58496)):
        plain.set_k(k), gained.set_k(k)
        (probs_TE, map_TE), (expected_TE, expected_map_TE) = gained(x), plain(x)
        assert gained.gain(k) == pytest.approx(g, rel=1e-5)
        assert torch.equal(map_TE, expected_map_TE)
        assert torch.allclose(probs_TE, g * expected_TE, atol=1e-6)
        assert torch.allclose(probs_TE.sum(dim=1), torch.full((probs_TE.shape[0],), g), atol=1e-5)
    assert_per_token_ks_route_as_each_k(gained, x)
    # Training: every k's gain learns from the tokens at that k (k = 1 too: its weight is the gain).
    gained.train()
    for k, moved in ((1, [True, False, False]), (4, [False, False, True])):
        gained.log_gain.grad = None
        gained.set_k(k)
        (gained(x)[0] * torch.arange(1.0, E + 1)).sum().backward()
        assert [bool(g != 0) for g in gained.log_gain.grad] == moved, (k, gained.log_gain.grad)


def assert_same_losses(plain, other, ks=(1, 2, 4)):
    """`other` computes `plain`'s loss bit for bit at each k."""
    from mmoe_megatron.model import set_topk

    tokens, labels = tiny_batch(tiny_config(), 2)
    plain.eval(), other.eval()
    with torch.no_grad():
        for k in ks:
            set_topk(plain, k), set_topk(other, k)
            assert forward_loss(other, tokens, labels).item() == forward_loss(plain, tokens, labels).item()


def test_a_model_with_learned_gains_starts_as_the_model_without(single_process_mcore):
    from mmoe_megatron.model import build_model

    plain = build_model(tiny_config(), VOCAB)
    gained = build_model(tiny_config(**{"matryoshka.gate_gain": "learned"}), VOCAB)
    assert len([n for n, _ in gained.named_parameters() if n.endswith("router.log_gain")]) == 4
    assert_same_losses(plain, gained)


def assert_per_k_rows_serve_and_learn_from_their_tokens(layer, x, params):
    """An MoE layer (trained ks 1, 2, 4) with a part per trained k (`params`, one row per k): per-token
    ks give each token its own k's output (k = 3 too), and in training each row learns from the
    tokens at its k only."""
    ks_SB = torch.randint(1, 5, (16, 3), generator=torch.Generator().manual_seed(2))
    layer.router.set_token_ks(ks_SB, width=4)
    with torch.no_grad():
        per_token = layer(x)[0]
    for k in (1, 2, 3, 4):
        layer.router.set_k(k)
        with torch.no_grad():
            alone = layer(x)[0]
        assert torch.allclose(per_token[ks_SB == k], alone[ks_SB == k], atol=1e-6)
    layer.train()
    for k, moved in ((1, [True, False, False]), (4, [False, False, True])):
        for param in params:
            param.grad = None
        layer.router.set_k(k)
        layer(x)[0].square().sum().backward()
        for param in params:
            assert [bool(row.abs().sum() > 0) for row in param.grad] == moved, k


def test_a_model_with_gains_per_channel_starts_as_the_model_without_and_scales_each_ks_output(
        single_process_mcore):
    """gate_gain channels: [K, H] log-gains per MoE layer, not weight-decayed; at gain 1 the model
    is the plain one bit for bit; set, the routed output of a token at k is the plain layer's times
    the gain vector of its k (per-token ks each take their own, k = 3 interpolated in log k), and in
    training each k's row learns from its tokens only."""
    from mmoe_megatron.engine import optimizer_param_groups
    from mmoe_megatron.model import build_model, moe_layers

    ks = {"matryoshka.ks": [1, 2, 4], "moe.aux_loss_coeff": 0.0}
    plain = build_model(tiny_config(**ks), VOCAB)
    gained = build_model(tiny_config(**ks, **{"matryoshka.gate_gain": "channels"}), VOCAB)
    names = [n for n, p in gained.named_parameters() if n.endswith("router.log_gain")]
    assert len(names) == 4 and dict(gained.named_parameters())[names[0]].shape == (3, 64)
    decayed = [g for g in optimizer_param_groups(gained, 0.1) if g["weight_decay"] > 0]
    gains = {id(p) for n, p in gained.named_parameters() if n.endswith("log_gain")}
    assert not any(id(p) in gains for g in decayed for p in g["params"])
    assert_same_losses(plain, gained)

    layer, reference = moe_layers(gained)[1], moe_layers(plain)[1]
    g_KH = torch.stack([torch.linspace(0.5, 1.5, 64), torch.full((64,), 2.0), torch.linspace(3.0, 1.0, 64)])
    with torch.no_grad():
        layer.router.log_gain.copy_(torch.log(g_KH))
    x = hidden()
    w = 0.58496  # k = 3 between the trained ks 2 and 4, linear in log k: log2(3) - 1
    for k, g_H in ((1, g_KH[0]), (2, g_KH[1]), (4, g_KH[2]), (3, g_KH[1] ** (1 - w) * g_KH[2] ** w)):
        layer.router.set_k(k), reference.router.set_k(k)
        with torch.no_grad():
            out, expected = layer(x)[0], reference(x)[0]
        assert torch.allclose(out, expected * g_H, rtol=1e-5, atol=1e-6), k
        assert not torch.allclose(out, expected, atol=1e-3)
        assert layer.router.gain(k) == pytest.approx(float(torch.exp(torch.log(g_H).mean())), rel=1e-5)
    assert_per_k_rows_serve_and_learn_from_their_tokens(layer, x, [layer.router.log_gain])


def test_a_model_with_adapters_per_k_starts_as_the_model_without_and_adds_each_ks_map(single_process_mcore):
    """k_adapter_rank r: per MoE layer maps A [K, r, H] (normal init) and B [K, H, r] (zeros); at
    the start the model is the plain one bit for bit; set, the routed output y of a token at k
    becomes y + B_k A_k y (k = 3 mixes the maps of 2 and 4 with the log-k weights; per-token ks each
    take their own), and in training each k's maps learn from its tokens only."""
    from mmoe_megatron.model import build_model, moe_layers

    ks = {"matryoshka.ks": [1, 2, 4], "moe.aux_loss_coeff": 0.0}
    plain = build_model(tiny_config(**ks), VOCAB)
    adapted = build_model(tiny_config(**ks, **{"matryoshka.k_adapter_rank": 8}), VOCAB)
    params = dict(adapted.named_parameters())
    ins = [p for n, p in params.items() if n.endswith("router.k_adapter_in")]
    outs = [p for n, p in params.items() if n.endswith("router.k_adapter_out")]
    assert len(ins) == len(outs) == 4
    assert all(a.shape == (3, 8, 64) and a.std() > 0.01 for a in ins)
    assert all(b.shape == (3, 64, 8) and not b.any() for b in outs)
    assert_same_losses(plain, adapted)

    layer, reference = moe_layers(adapted)[1], moe_layers(plain)[1]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.router.k_adapter_in.copy_(torch.randn(3, 8, 64, generator=gen) * 0.1)
        layer.router.k_adapter_out.copy_(torch.randn(3, 64, 8, generator=gen) * 0.1)
    A, B = layer.router.k_adapter_in.detach(), layer.router.k_adapter_out.detach()

    def mapped(y, i):
        return y @ A[i].t() @ B[i].t()

    x = hidden()
    w = 0.58496  # k = 3 between the trained ks 2 and 4, linear in log k: log2(3) - 1
    for k, maps in ((1, {0: 1.0}), (2, {1: 1.0}), (4, {2: 1.0}), (3, {1: 1 - w, 2: w})):
        layer.router.set_k(k), reference.router.set_k(k)
        with torch.no_grad():
            out, y = layer(x)[0], reference(x)[0]
        expected = y + sum(share * mapped(y, i) for i, share in maps.items())
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-8), k
        assert (out - y).abs().max() > 0.05 * y.abs().max()  # the maps move the output
    assert_per_k_rows_serve_and_learn_from_their_tokens(layer, x, [layer.router.k_adapter_in,
                                                                    layer.router.k_adapter_out])


# --- gates per block of ranks ---------------------------------------------------------------------


def test_rank_gates_weight_the_experts_of_each_block_of_ranks_before_the_softmax(single_process_mcore):
    """With learned temperatures and gates 0.5 (rank 2), 2 (ranks 3-4), 0.25 (ranks 5-8): at k the
    weights are softmax(top-k logits / T(k)) with each expert's term multiplied by its rank's gate;
    the ranking is unchanged and a k = 1 weight stays 1."""
    ks = {"matryoshka.ks": [1, 2, 4, 8], "matryoshka.gate_temperature": "learned"}
    plain = make_router(single_process_mcore, **ks)
    gated = make_router(single_process_mcore, **ks, **{"matryoshka.rank_gate": "learned"})
    plain.eval(), gated.eval()
    x = hidden()
    assert gated.log_rank_gate.shape == (3,)  # blocks 2 | 3-4 | 5-8 of E = 8
    for k in (1, 2, 3, 4, 8):  # gates 1 at the start: the router without them
        plain.set_k(k), gated.set_k(k)
        assert torch.equal(plain(x)[0], gated(x)[0])
    with torch.no_grad():
        gated.log_temperature.copy_(torch.log(torch.tensor([1.0, 0.5, 0.4, 0.3])))
        gated.log_rank_gate.copy_(torch.log(torch.tensor([0.5, 2.0, 0.25])))
    logits_TE = gated.gating(x).view(-1, E)
    gate_E = torch.tensor([1.0, 0.5, 2.0, 2.0, 0.25, 0.25, 0.25, 0.25])
    for k, t in ((1, 1.0), (2, 0.5), (4, 0.4), (8, 0.3)):
        gated.set_k(k)
        probs_TE, map_TE = gated(x)
        top_TK, ids_TK = torch.topk(logits_TE, k, dim=1)
        terms_TK = torch.exp(top_TK / t) * gate_E[:k]
        expected_TE = torch.zeros_like(logits_TE).scatter(1, ids_TK, terms_TK / terms_TK.sum(dim=1, keepdim=True))
        assert torch.equal(map_TE, expected_TE > 0)
        assert torch.allclose(probs_TE, expected_TE, atol=1e-6)
    gated.set_k(1)
    assert torch.equal(gated(x)[0].sum(dim=1), torch.ones(logits_TE.shape[0]))
    assert_per_token_ks_route_as_each_k(gated, x)


def test_a_rank_gate_learns_only_from_the_ks_that_route_its_ranks(single_process_mcore):
    router = make_router(single_process_mcore, **{"matryoshka.ks": [1, 2, 4, 8], "moe.aux_loss_coeff": 0.0,
                                                  "matryoshka.rank_gate": "learned"})
    router.train()
    x = hidden()
    for k, moved in ((1, [False, False, False]), (2, [True, False, False]), (4, [True, True, False]),
                     (5, [True, True, True])):
        router.zero_grad()
        router.set_k(k)
        probs_TE, _ = router(x)
        (probs_TE * torch.arange(1.0, E + 1)).sum().backward()  # a stand-in for the LM loss
        assert [bool(g != 0) for g in router.log_rank_gate.grad] == moved, (k, router.log_rank_gate.grad)


def test_a_model_with_rank_gates_starts_as_the_model_without_and_refuses_export(single_process_mcore):
    from mmoe_megatron.export.qwen3_moe import ExportError, check_exportable, rank_gates
    from mmoe_megatron.model import build_model, set_topk

    plain = build_model(tiny_config(), VOCAB)
    gated_cfg = tiny_config(**{"matryoshka.rank_gate": "learned"})
    gated = build_model(gated_cfg, VOCAB)
    gates = {n: p for n, p in gated.named_parameters() if n.endswith("log_rank_gate")}
    assert len(gates) == 4 and all(torch.equal(p, torch.zeros(3)) for p in gates.values())
    tokens, labels = tiny_batch(tiny_config(), 2)
    plain.eval(), gated.eval()
    with torch.no_grad():
        for k in (1, 2, 4, 6):
            set_topk(plain, k)
            set_topk(gated, k)
            assert forward_loss(gated, tokens, labels).item() == forward_loss(plain, tokens, labels).item()
    with pytest.raises(ExportError, match="rank_gate none"):
        check_exportable(gated_cfg)
    # What the suite records: each block's gate per layer, by the ranks it covers.
    with torch.no_grad():
        for i, name in enumerate(sorted(gates)):
            gates[name].copy_(torch.log(torch.tensor([0.5, 2.0, 0.25]) * (i + 1)))
    recorded = rank_gates(gated_cfg, gated.state_dict())
    assert list(recorded) == ["2", "3-4", "5-8"]
    assert recorded["5-8"] == pytest.approx([0.25, 0.5, 0.75, 1.0])


# --- the nested combine ---------------------------------------------------------------------------


def test_rank_blocks_double():
    from mmoe_megatron.router import rank_blocks

    assert rank_blocks(1) == [(0, 1)]
    assert rank_blocks(8) == [(0, 1), (1, 2), (2, 4), (4, 8)]
    assert rank_blocks(6) == [(0, 1), (1, 2), (2, 4), (4, 6)]
    assert rank_blocks(9) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 9)]


def test_nested_weights_are_the_k_max_softmax_truncated_and_gated_per_doubling_block(single_process_mcore):
    # tiny.yaml trains ks 1-4: k_max = 4; E = 8, so ks 5-8 are served beyond the training range.
    router = make_router(single_process_mcore, **{"matryoshka.normalization": "nested",
                                                  "matryoshka.gate_temperature": "none"})
    plain = make_router(single_process_mcore, **{"matryoshka.gate_temperature": "none"})
    router.eval(), plain.eval()
    x = hidden()
    # Gates 1 (the initial value): at k_max the weights are top-k-then-softmax's.
    router.set_k(4), plain.set_k(4)
    assert torch.allclose(router(x)[0], plain(x)[0], atol=1e-6)
    gates = [1.5, 0.5, 2.0, 0.25]  # blocks: rank 1 | rank 2 | ranks 3-4 | ranks 5-8
    with torch.no_grad():
        router.log_block_gate.copy_(torch.log(torch.tensor(gates)))
    logits_TE = router.gating(x).view(-1, E)
    top_TE, ids_TE = torch.sort(logits_TE, dim=1, descending=True)
    share_TE = torch.exp(top_TE - torch.logsumexp(top_TE[:, :4], dim=1, keepdim=True))
    gate_E = torch.tensor([1.5, 0.5, 2.0, 2.0, 0.25, 0.25, 0.25, 0.25])
    weights = {}
    for k in range(1, E + 1):
        router.set_k(k)
        probs_TE, map_TE = router(x)
        expected_TE = torch.zeros_like(logits_TE).scatter(1, ids_TE[:, :k], (share_TE * gate_E)[:, :k])
        assert torch.equal(map_TE, expected_TE > 0)
        assert torch.allclose(probs_TE, expected_TE, atol=1e-6)
        weights[k] = probs_TE
    # A larger k adds experts and leaves the weights of those it had exactly as they were.
    for k in range(1, E):
        assert torch.equal(weights[k + 1] * (weights[k] > 0), weights[k])


def test_nested_gates_learn_from_the_blocks_in_use_and_k1_weights_depend_on_the_router(single_process_mcore):
    router = make_router(single_process_mcore, **{"matryoshka.normalization": "nested", "moe.aux_loss_coeff": 0.0,
                                                  "matryoshka.k1_router_grad": "none"})
    router.train()
    x = hidden()
    for k, moved in ((1, [True, False, False, False]), (3, [True, True, True, False]), (5, [True] * 4)):
        router.zero_grad()
        router.set_k(k)
        probs_TE, _ = router(x)
        (probs_TE * torch.arange(1.0, E + 1)).sum().backward()  # a stand-in for the LM loss
        assert [bool(g != 0) for g in router.log_block_gate.grad] == moved, (k, router.log_block_gate.grad)
        # Even at k = 1, with no straight-through estimator, the router learns from the LM loss:
        # the weight is the expert's share of the k_max softmax.
        assert router.weight.grad.abs().sum() > 1e-3


def test_a_nested_model_starts_as_top_k_then_softmax_at_k_max(single_process_mcore):
    """Gates start at 1: at k_max the initial model's loss is the plain model's; at a smaller k it
    is not (the weights are no longer renormalised over the k experts)."""
    from mmoe_megatron.model import build_model, set_topk

    overrides = {"matryoshka.gate_temperature": "none"}
    plain = build_model(tiny_config(**overrides), VOCAB)
    nested = build_model(tiny_config(**overrides, **{"matryoshka.normalization": "nested"}), VOCAB)
    gates = {n: p for n, p in nested.named_parameters() if n.endswith("log_block_gate")}
    assert len(gates) == 4 and all(torch.equal(p, torch.zeros(4)) for p in gates.values())
    tokens, labels = tiny_batch(tiny_config(), 2)
    plain.eval(), nested.eval()
    with torch.no_grad():
        losses = {}
        for k in (2, 4):
            set_topk(plain, k)
            set_topk(nested, k)
            losses[k] = (forward_loss(plain, tokens, labels).item(), forward_loss(nested, tokens, labels).item())
    assert losses[4][1] == pytest.approx(losses[4][0], abs=1e-5)
    assert abs(losses[2][1] - losses[2][0]) > 1e-4


def test_a_replayed_ranking_routes_another_copy_to_the_logged_experts(single_process_mcore):
    router = make_router(single_process_mcore)
    other = make_router(single_process_mcore)
    with torch.no_grad():  # another copy whose own ranking differs
        other.weight.copy_(torch.randn(other.weight.shape, generator=torch.Generator().manual_seed(5)))
    x = hidden()
    router.set_k(2)
    router.route_log = []
    probs_TE, map_TE = router(x)
    (logged,) = router.route_log
    assert [set(row.tolist()) for row in logged] == expected_topk_sets(router.gating(x).view(-1, E), 2)
    other.set_k(2)
    own_TE = other(x)[1]
    assert not torch.equal(own_TE, map_TE)  # the test means something
    other.route_replay = [logged]
    replayed_probs_TE, replayed_TE = other(x)
    assert torch.equal(replayed_TE, map_TE) and other.route_replay == []
    # The weights are the copy's own scores of those experts (topk_softmax over them).
    logits_TE = other.gating(x).view(-1, E).float()
    expected = torch.softmax(logits_TE.gather(1, logged), dim=1)
    assert torch.allclose(replayed_probs_TE.gather(1, logged), expected, atol=1e-6)
    # A copy routed at a wider k keeps the logged experts first and adds its own best after them.
    other.set_k(3)
    other.route_replay = [logged]
    wider_TE = other(x)[1]
    own_order = torch.argsort(logits_TE, dim=1, descending=True)
    for t in range(wider_TE.shape[0]):
        third = next(e for e in own_order[t].tolist() if e not in logged[t].tolist())
        assert set(torch.nonzero(wider_TE[t]).flatten().tolist()) == set(logged[t].tolist()) | {third}
    with pytest.raises(RuntimeError, match="route_replay ran out"):
        other(x)
