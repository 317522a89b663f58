"""bench.router_temperature: a temperature folded into the router weights changes weights, never
the experts chosen; the choice of T and the paired tax it reports."""

from types import SimpleNamespace

import pytest
import torch

from bench import router_temperature as rt
from tests.test_router import E, hidden, make_router


def test_folded_temperature_changes_weights_not_choices(single_process_mcore):
    router = make_router(single_process_mcore)
    router.eval()
    model = torch.nn.Sequential(router)
    originals = [router.weight.detach().clone()]
    x = hidden()
    logits_TE = router.gating(x).view(-1, E)
    router.set_k(3)
    probs1, map1 = router(x)
    rt.set_temperature(model, originals, 0.5)
    probs_half, map_half = router(x)
    assert torch.equal(map1, map_half)
    # Top-k then softmax at T: softmax of the chosen logits divided by T, from the T = 1 logits.
    chosen = logits_TE.masked_fill(~map1.bool(), float("-inf")) / 0.5
    torch.testing.assert_close(probs_half.view(-1, E), torch.softmax(chosen, dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probs_half, probs1)
    rt.set_temperature(model, originals, 1.0)
    assert torch.equal(router(x)[0], probs1)


def test_choose_keeps_one_unless_another_t_clearly_wins():
    assert rt.choose({0.5: 3.0, 1.0: 3.0 + rt.MIN_GAIN / 2, 1.3: 3.1}) == 1.0
    assert rt.choose({0.5: 2.9, 0.7: 2.95, 1.0: 3.0}) == 0.5


def _record(member, role, seed, trained_k, valid):
    """valid: {k: (loss at T=1, calibrated loss)}."""
    return {"member": member, "role": role, "seed": seed, "trained_k": trained_k, "num_calibration": 8,
            "num_samples": 8, "by_k": {str(k): {"temperature": 0.7, "valid": {"t1": a, "calibrated": b}}
                                       for k, (a, b) in valid.items()}}


def test_tax_pairs_elastic_and_specialist_by_seed():
    from mmoe_megatron.evaluation.suite import MemberSpec

    spec = SimpleNamespace(eval=SimpleNamespace(curve_ks=[2], heldout=[], data_seed=None), members=[
        MemberSpec("elastic", "elastic"),
        MemberSpec("k2", "specialist", {"matryoshka.strategy": "fixed", "matryoshka.ks": [2]})])
    records = [_record("elastic", "elastic", 1, None, {2: (4.0, 3.9)}),
               _record("elastic", "elastic", 2, None, {2: (4.2, 4.0)}),
               _record("k2", "specialist", 1, 2, {2: (3.8, 3.8)}),
               _record("k2", "specialist", 2, 2, {2: (3.9, 3.85)})]
    _, data = rt.report(spec, records)
    tax = data["taxes"]["elastic"]["valid"]["2"]
    assert tax["t1"] == pytest.approx([0.2, 0.3])
    assert tax["calibrated"] == pytest.approx([0.1, 0.15])
    assert data["deltas"]["elastic"]["valid"]["2"] == pytest.approx([-0.1, -0.2])
