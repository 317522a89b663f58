"""matryoshka.expert_grad: added, on one process: the router marks exactly each token's experts
ranked within k // 2 (in training only), the experts keep every value and cut exactly the marked
rows' gradient to themselves while the router's gradient is unchanged, and the config refuses ks
that would leave an expert rank untrained."""

import pytest
import torch

from mmoe_megatron.config import ConfigError
from tests.helpers import VOCAB, forward_loss, tiny_batch, tiny_config

KS = [1, 2, 4, 8]
E, H = 8, 64  # tiny.yaml: 8 experts, hidden 64


def added_config(**overrides):
    return tiny_config(**{"matryoshka.ks": KS, "matryoshka.expert_grad": "added", "data.seq_length": 16,
                          **overrides})


@pytest.mark.parametrize("added_ks", [None, [8]])
def test_the_router_marks_the_experts_ranked_within_half_of_each_tokens_k(single_process_mcore, added_ks):
    """Every k (expert_grad_ks null), or only k = 8: the tokens drawn at the other ks are unmarked."""
    from mmoe_megatron.model import build_model, elastic_routers

    router = elastic_routers(build_model(added_config(**{"matryoshka.expert_grad_ks": added_ks}), VOCAB))[0]
    gen = torch.Generator().manual_seed(3)
    seq, batch = 16, 2
    logits_SBE = torch.randn(seq, batch, E, generator=gen)
    ks_SB = torch.tensor(KS)[torch.randint(0, len(KS), (seq, batch), generator=gen)]
    router.train()
    router.set_token_ks(ks_SB, width=max(KS))
    marked_TE, _ = router.routing(logits_SBE)
    marks = router.untrained_prefix
    router.untrained_prefix = (0,) * (E + 1)
    plain_TE, routing_map_TE = router.routing(logits_SBE)
    router.untrained_prefix = marks

    assert torch.equal(marked_TE.abs(), plain_TE)  # every weight's magnitude unchanged
    order_TE = torch.argsort(logits_SBE.reshape(-1, E), dim=1, descending=True)
    expected_TE = torch.zeros(seq * batch, E, dtype=torch.bool)
    for t, k in enumerate(ks_SB.reshape(-1).tolist()):
        if added_ks is None or k in added_ks:
            expected_TE[t, order_TE[t, :k // 2]] = True
    assert expected_TE.sum() > 0 and (routing_map_TE | ~expected_TE).all()
    assert torch.equal(torch.signbit(marked_TE), expected_TE)

    router.eval()  # evaluation and serving see the plain weights
    assert torch.equal(router.routing(logits_SBE)[0], plain_TE)


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_marked_rows_keep_their_values_and_train_only_the_router(single_process_mcore, width):
    """Against the same experts without marks: outputs equal (==); the expert weights' gradient
    equals the one from the unmarked rows alone; marked rows pass no gradient to their input;
    the weights' (router's) gradient is the same."""
    from mmoe_megatron.model import build_model, slimmable_experts

    experts = slimmable_experts(build_model(added_config(**{"matryoshka.widths": [0.5, 1.0]}), VOCAB))[0]
    experts.set_width(width)
    gen = torch.Generator().manual_seed(5)
    counts = [5, 0, 3, 7, 1, 2, 2, 4]
    n = sum(counts)
    x_NH = torch.randn(n, H, generator=gen)
    probs_N = torch.rand(n, generator=gen) + 0.05
    marked_N = torch.rand(n, generator=gen) < 0.5
    upstream_NH = torch.randn(n, H, generator=gen)

    def run(marks: bool, upstream):
        experts.added_expert_grad = marks
        experts.zero_grad()
        x, p = x_NH.clone().requires_grad_(), probs_N.clone().requires_grad_()
        out_NH, _ = experts(x, torch.tensor(counts), torch.where(marked_N, -p, p) if marks else p)
        (out_NH * upstream).sum().backward()
        weights = {name: w.grad.clone() for name, w in experts.named_parameters()}
        return out_NH.detach(), x.grad, p.grad, weights

    out, x_grad, p_grad, w_grads = run(True, upstream_NH)
    ref_out, ref_x_grad, ref_p_grad, _ = run(False, upstream_NH)
    _, _, _, ref_w_grads = run(False, upstream_NH.masked_fill(marked_N[:, None], 0.0))
    experts.added_expert_grad = True

    assert torch.equal(out, ref_out)
    assert marked_N.any() and (~marked_N).any()
    assert torch.equal(x_grad[marked_N], torch.zeros_like(x_grad[marked_N]))
    assert torch.equal(x_grad[~marked_N], ref_x_grad[~marked_N])
    assert w_grads.keys() == ref_w_grads.keys()
    for name in w_grads:
        torch.testing.assert_close(w_grads[name], ref_w_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(w.abs().sum() > 0 for w in w_grads.values())
    torch.testing.assert_close(p_grad, ref_p_grad, rtol=1e-4, atol=1e-6)


def test_a_model_computes_the_same_loss_and_at_k_1_the_same_gradients(single_process_mcore):
    """Values never change; at k = 1 nothing is marked (1 // 2 = 0), so every gradient is equal;
    at k = 2 the experts' gradients change and the router's do not vanish."""
    from mmoe_megatron.model import build_model, set_point

    cfg = added_config()
    tokens, labels = tiny_batch(cfg, 2, seed=2)
    results = {}
    for mode in ("all", "added"):
        model = build_model(added_config(**{"matryoshka.expert_grad": mode}), VOCAB)
        model.train()
        for k in (1, 2):
            set_point(model, k, 1.0)
            model.zero_grad()
            loss = forward_loss(model, tokens, labels)
            loss.backward()
            results[mode, k] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    for k in (1, 2):
        assert torch.equal(results["all", k][0], results["added", k][0]), k
    grads_all, grads_added = results["all", 1][1], results["added", 1][1]
    assert all(torch.equal(grads_all[n], grads_added[n]) for n in grads_all)
    grads_all, grads_added = results["all", 2][1], results["added", 2][1]
    experts = [n for n in grads_all if ".experts." in n]
    assert experts and all(not torch.equal(grads_all[n], grads_added[n]) for n in experts if grads_all[n].any())
    assert all(grads_added[n].abs().sum() > 0 for n in grads_added if n.endswith("router.weight"))


@pytest.mark.parametrize("overrides, fragment", [
    ({"matryoshka.ks": [1, 3, 8]}, "ranked [4]"),
    ({"matryoshka.ks": [2, 4, 8]}, "ranked [1]"),
    ({"matryoshka.ks": [8], "matryoshka.strategy": "fixed"}, "needs an elastic model"),
    ({"matryoshka.ks": [1, 8], "matryoshka.expert_grad_ks": [8]}, "ranked [2, 3, 4]"),
    ({"matryoshka.expert_grad_ks": [3]}, "some of the trained ks"),
    ({"matryoshka.expert_grad": "all", "matryoshka.expert_grad_ks": [8]}, "only used with expert_grad: added"),
])
def test_ks_that_leave_a_rank_untrained_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match="expert_grad") as err:
        added_config(**overrides)
    assert fragment in str(err.value)
