"""Top-p and EMoE baseline routers: their training-time selection rules, and forced k at eval."""

import pytest
import torch

from mmoe_megatron.config.derive import transformer_config
from tests.helpers import VOCAB, tiny_config
from tests.test_router import E, hidden


def build(single_process_mcore, router_cls, **kwargs):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    cfg = tiny_config(**{"matryoshka.strategy": "fixed", "matryoshka.ks": [4], "moe.aux_loss_coeff": 0.0})
    torch.manual_seed(0)
    return router_cls(transformer_config(cfg), get_default_pg_collection(), **kwargs)


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_top_p_takes_the_fewest_experts_reaching_the_mass(single_process_mcore, p):
    from mmoe_megatron.baselines import TopPRouter

    router = build(single_process_mcore, TopPRouter, top_p=p)
    router.set_k(4)
    router.train()
    x = hidden(seq=32)
    _, map_TE = router(x)
    probs_sorted = torch.sort(torch.softmax(router.gating(x).view(-1, E), -1), dim=1, descending=True).values
    cum = torch.cumsum(probs_sorted, dim=1)
    expected = torch.clamp((cum < p).sum(dim=1) + 1, max=4)  # fewest n with cum[n-1] >= p, capped
    assert torch.equal(map_TE.sum(dim=1), expected)
    assert 1 <= expected.float().mean() <= 4
    router.eval()
    _, eval_map = router(x)
    assert (eval_map.sum(dim=1) == 4).all()


def test_emoe_samples_k_from_the_top_pool(single_process_mcore):
    from mmoe_megatron.baselines import EMoERouter

    router = build(single_process_mcore, EMoERouter, pool_k=6, sharpen_coeff=0.0)
    router.set_k(2)
    router.train()
    x = hidden(seq=64, batch=4)
    order = torch.argsort(router.gating(x).view(-1, E), dim=1, descending=True)
    torch.manual_seed(1)
    _, map_TE = router(x)
    assert (map_TE.sum(dim=1) == 2).all()
    ranks = torch.argsort(order, dim=1)  # rank of each expert for each token
    used_ranks = ranks[map_TE]
    assert used_ranks.max() <= 5  # only inside the pool of 6
    assert (used_ranks >= 2).any()  # co-activation: experts beyond the top 2 get picked
    router.eval()
    _, eval_map = router(x)
    assert torch.equal(eval_map, torch.zeros_like(eval_map).scatter(1, order[:, :2], True))


def test_emoe_sharpening_loss_lowers_router_entropy(single_process_mcore):
    from mmoe_megatron.baselines import EMoERouter

    router = build(single_process_mcore, EMoERouter, pool_k=6, sharpen_coeff=1.0)
    router.set_k(2)
    router.train()
    x = hidden(seq=64)

    def entropy():
        q = torch.softmax(router.gating(x).view(-1, E).float(), -1)
        return -(q * q.log()).sum(-1).mean().item()

    before = entropy()
    probs, _ = router(x)
    (probs * 0).sum().backward()  # only the attached sharpening loss produces a gradient
    assert router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        router.weight -= 1.0 * router.weight.grad
    assert entropy() < before


@pytest.mark.parametrize("method, cls", [("top_p", "TopPRouter"), ("emoe", "EMoERouter")])
def test_config_builds_the_baseline(single_process_mcore, method, cls):
    from mmoe_megatron.model import build_model, elastic_routers

    cfg = tiny_config(**{"matryoshka.method": method, "matryoshka.strategy": "fixed",
                         "matryoshka.ks": [2], "matryoshka.emoe_pool_k": 4})
    routers = elastic_routers(build_model(cfg, VOCAB))
    assert {type(r).__name__ for r in routers} == {cls}
