import collections
import math

import pytest
import torch

from mmoe_megatron.config import MatryoshkaConfig
from mmoe_megatron.schedule import KSchedule, capacity_probs, global_token_ids


def make(strategy="layerwise", ks=(1, 2, 3, 4), probs=None, seed=7):
    probs = probs or tuple(1 / len(ks) for _ in ks)
    return KSchedule(strategy=strategy, ks=tuple(ks), probs=tuple(probs), seed=seed)


def chi_square_ok(counts: dict, ks, probs, n: int) -> bool:
    """Pearson chi-square against the target; threshold is the 0.999 quantile for <= 7 dof."""
    stat = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in zip(ks, probs))
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
    return stat < critical[len(ks) - 1]


def test_deterministic_and_pure():
    """The same indices give the same k in any call order: nothing depends on call history."""
    keys = [(step, layer) for step in range(50) for layer in range(6)]
    forward = {key: make().k(key[0], 0, key[1]) for key in keys}
    s = make()
    backward = {key: s.k(key[0], 0, key[1]) for key in reversed(keys)}
    assert forward == backward
    assert len(set(forward.values())) == 4


def test_seed_changes_draws():
    a = [make(seed=1).k(s, 0, l) for s in range(40) for l in range(4)]
    b = [make(seed=2).k(s, 0, l) for s in range(40) for l in range(4)]
    assert a != b


def test_rank_independent_across_processes():
    """The same schedule in a fresh interpreter (another rank) draws the same ks."""
    import subprocess
    import sys

    code = ("from mmoe_megatron.schedule import KSchedule;"
            "s=KSchedule('layerwise',(1,2,3,4),(0.25,)*4,7);"
            "print([s.k(t,0,l) for t in range(20) for l in range(3)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([make().k(t, 0, l) for t in range(20) for l in range(3)])


def test_resume_draws_the_same_ks():
    """A run resumed at step 30 continues with exactly the ks of an uninterrupted run."""
    full = [make().layer_ks(step, 0, 4) for step in range(60)]
    resumed = make()  # rebuilt from config after a restart, no state carried over
    assert [resumed.layer_ks(step, 0, 4) for step in range(30, 60)] == full[30:]


def test_fixed_always_the_same_k():
    s = make("fixed", ks=(3,), probs=(1.0,))
    assert {s.k(step, mb, layer) for step in range(20) for mb in range(3) for layer in range(4)} == {3}
    with pytest.raises(ValueError, match="exactly one k"):
        make("fixed", ks=(1, 2))


def test_global_one_k_per_step_for_all_layers_and_microbatches():
    s = make("global")
    for step in range(30):
        assert len({s.k(step, mb, layer) for mb in range(3) for layer in range(5)}) == 1
    assert len({s.k(step, 0, 0) for step in range(100)}) == 4


def test_microbatch_varies_with_microbatch_not_layer():
    s = make("microbatch")
    varied = 0
    for step in range(30):
        per_mb = [{s.k(step, mb, layer) for layer in range(5)} for mb in range(4)]
        assert all(len(v) == 1 for v in per_mb)
        varied += len({next(iter(v)) for v in per_mb}) > 1
    assert varied > 15


def test_layerwise_varies_with_layer_not_microbatch():
    s = make("layerwise")
    varied = 0
    for step in range(30):
        for layer in range(5):
            assert len({s.k(step, mb, layer) for mb in range(4)}) == 1
        varied += len(set(s.layer_ks(step, 0, 5))) > 1
    assert varied > 20


def test_token_strategy_scalar_and_vector_agree():
    s = make("token")
    ids = torch.arange(0, 5000, dtype=torch.int64)
    vec = s.token_ks(3, 2, ids).tolist()
    assert vec == [s.k(3, 0, 2, token=int(t)) for t in ids]
    assert s.token_ks(3, 1, ids).tolist() != vec  # layers draw independently
    with pytest.raises(ValueError, match="per token"):
        s.k(0, 0, 0)


def test_token_ids_do_not_depend_on_the_microbatch_split():
    """Samples 0-7 as one micro-batch of 8, or as two of 4, get the same token ids."""
    whole = global_token_ids(0, 8, 16)
    halves = torch.cat([global_token_ids(0, 4, 16), global_token_ids(4, 4, 16)], dim=1)
    assert torch.equal(whole, halves)
    assert whole.shape == (16, 8)
    assert len(set(whole.reshape(-1).tolist())) == 128


@pytest.mark.parametrize("distribution", ["uniform", "capacity", "explicit", "small_k", "equal_compute"])
@pytest.mark.parametrize("strategy", ["global", "layerwise", "token"])
def test_distribution_matches_target(distribution, strategy):
    mat = MatryoshkaConfig(
        strategy=strategy, ks=[1, 2, 4, 8], distribution=distribution, tau=2.0,
        probs=[0.1, 0.2, 0.3, 0.4] if distribution == "explicit" else None,
        k_max_share=0.1 if distribution == "small_k" else None,
    )
    mat.check("matryoshka")
    s = KSchedule.from_config(mat, seed=11)
    n = 20000
    if strategy == "token":
        draws = s.token_ks(5, 0, torch.arange(n, dtype=torch.int64)).tolist()
    elif strategy == "global":
        draws = [s.k(step) for step in range(n)]
    else:
        draws = [s.k(step, 0, layer) for step in range(n // 4) for layer in range(4)]
    target = {
        "uniform": [0.25] * 4,
        "capacity": [k ** 0.5 / sum(j ** 0.5 for j in (1, 2, 4, 8)) for k in (1, 2, 4, 8)],
        "explicit": [0.1, 0.2, 0.3, 0.4],
        "small_k": [0.3, 0.3, 0.3, 0.1],
        "equal_compute": [8 / 15, 4 / 15, 2 / 15, 1 / 15],
    }[distribution]
    assert list(s.probs) == pytest.approx(target)
    assert chi_square_ok(collections.Counter(draws), (1, 2, 4, 8), target, len(draws))


def test_capacity_weighting_prefers_large_k():
    p = capacity_probs([1, 4], tau=2.0)
    assert p[1] / p[0] == pytest.approx(math.sqrt(4))


def test_fingerprint_changes_with_anything_that_changes_draws():
    base = make().fingerprint()
    assert make().fingerprint() == base
    assert make(seed=8).fingerprint() != base
    assert make("global").fingerprint() != base
    assert make(ks=(1, 2, 3, 5)).fingerprint() != base
    assert make(probs=(0.1, 0.2, 0.3, 0.4)).fingerprint() != base


# --- sample plans: sandwich and coupled samples ---------------------------------------------------


def planned(sandwich=0.0, coupled=0.0, strategy="token", ks=(1, 2, 4, 8), batch=32, seed=7):
    return KSchedule(strategy=strategy, ks=tuple(ks), probs=tuple(1 / len(ks) for _ in ks), seed=seed,
                     sandwich=sandwich, coupled=coupled, global_batch_size=batch)


def test_sandwich_gives_exact_shares_every_step():
    """sandwich 0.25 of 32 samples: exactly 4 at k_min and 4 at k_max in every step, the rest free,
    and not always the same samples."""
    s = planned(sandwich=0.25)
    chosen = set()
    for step in range(200):
        plan = s.sample_ks(step)
        assert (plan == 1).sum() == 4 and (plan == 8).sum() == 4 and (plan == 0).sum() == 24
        chosen.add(tuple((plan > 0).nonzero().view(-1).tolist()))
    assert len(chosen) > 150


def test_coupled_samples_draw_from_the_distribution():
    s = KSchedule(strategy="token", ks=(1, 2, 4), probs=(0.5, 0.3, 0.2), seed=3, coupled=0.5,
                  global_batch_size=20)
    counts = collections.Counter()
    for step in range(400):
        plan = s.sample_ks(step)
        assert (plan > 0).sum() == 10
        counts.update(plan[plan > 0].tolist())
    assert chi_square_ok(counts, (1, 2, 4), (0.5, 0.3, 0.2), 4000)


def test_plan_is_pure_and_depends_on_seed_and_step():
    a, b = planned(sandwich=0.5, coupled=0.25), planned(sandwich=0.5, coupled=0.25)
    assert all(torch.equal(a.sample_ks(t), b.sample_ks(t)) for t in reversed(range(30)))
    assert not torch.equal(a.sample_ks(0), a.sample_ks(1))
    assert not torch.equal(a.sample_ks(0), planned(sandwich=0.5, coupled=0.25, seed=8).sample_ks(0))


def test_planned_samples_use_one_k_in_every_layer_and_token():
    seq = 16
    s = planned(sandwich=0.25, coupled=0.25, strategy="token")
    ids = global_token_ids(0, 32, seq)  # [seq, 32]: the whole global batch
    plan = s.sample_ks(11)
    layers = [s.layer_token_ks(11, 0, layer, ids, seq) for layer in range(4)]
    for b in range(32):
        values = {k for ks in layers for k in ks[:, b].tolist()}
        if plan[b] > 0:
            assert values == {int(plan[b])}
        else:
            assert layers[0][:, b].tolist() == s.token_ks(11, 0, ids[:, b]).tolist()
    # The same tokens seen as two micro-batches of 16 give the same ks (layout independence).
    halves = [s.layer_token_ks(11, m, 2, global_token_ids(16 * m, 16, seq), seq) for m in range(2)]
    assert torch.equal(torch.cat(halves, dim=1), layers[2])


def test_plan_over_a_per_layer_strategy():
    seq = 4
    s = planned(sandwich=0.5, strategy="layerwise", batch=8)
    ids = global_token_ids(0, 8, seq)
    plan = s.sample_ks(5)
    for layer in range(3):
        ks = s.layer_token_ks(5, 0, layer, ids, seq)
        free = plan == 0
        assert set(ks[:, free].reshape(-1).tolist()) == {s.k(5, 0, layer)}
        assert torch.equal(ks[:, ~free], plan[~free].expand(seq, -1))


def test_marginal_probabilities_count_the_sandwich():
    # Worked by hand: half the samples are free (0.25 per k of them), a quarter at k=1, a quarter at k=8.
    assert planned(sandwich=0.5).marginal_probs() == pytest.approx((0.375, 0.125, 0.125, 0.375))
    assert planned(coupled=0.5).marginal_probs() == pytest.approx((0.25,) * 4)


def test_plan_enters_the_fingerprint():
    assert planned().fingerprint() != planned(sandwich=0.25).fingerprint()
    assert planned(sandwich=0.25).fingerprint() != planned(coupled=0.25).fingerprint()


@pytest.mark.parametrize("kw, message", [
    ({"sandwich": 0.3}, "whole samples"),            # 0.15 x 32 = 4.8 samples per side
    ({"coupled": 0.1}, "whole samples"),
    ({"sandwich": 0.75, "coupled": 0.5}, r"share in \[0, 1\]"),
])
def test_plan_refuses_fractional_samples(kw, message):
    with pytest.raises(ValueError, match=message):
        planned(**kw)


def test_progressive_shrinking_introduces_ks_from_the_largest_down():
    """ks (1, 2, 4, 8) over 30 shrinking steps: steps 0-9 only 8, 10-19 also 4, 20-29 also 2, then all."""
    s = KSchedule(strategy="token", ks=(1, 2, 4, 8), probs=(0.25,) * 4, seed=3, shrink_steps=30, train_iters=60)
    ids = torch.arange(4096)
    seen = {step: set(s.token_ks(step, 0, ids).tolist()) for step in (0, 9, 10, 19, 20, 29, 30, 59)}
    assert seen == {0: {8}, 9: {8}, 10: {4, 8}, 19: {4, 8}, 20: {2, 4, 8}, 29: {2, 4, 8},
                    30: {1, 2, 4, 8}, 59: {1, 2, 4, 8}}
    # After shrinking, the draws are those of a schedule that never shrank.
    plain = KSchedule(strategy="token", ks=(1, 2, 4, 8), probs=(0.25,) * 4, seed=3)
    assert torch.equal(s.token_ks(45, 2, ids), plain.token_ks(45, 2, ids))
    layerwise = KSchedule(strategy="layerwise", ks=(1, 2, 4, 8), probs=(0.25,) * 4, seed=3, shrink_steps=30)
    assert {layerwise.k(step, 0, layer) for step in range(10) for layer in range(4)} == {8}
    # Over the run: 10 steps at {8}, 10 at {4, 8}, 10 at {2, 4, 8}, 30 at all four (worked by hand).
    expected = [(30 * 0.25) / 60, (10 / 3 + 30 * 0.25) / 60, (10 / 2 + 10 / 3 + 30 * 0.25) / 60,
                (10 + 10 / 2 + 10 / 3 + 30 * 0.25) / 60]
    assert s.marginal_probs() == pytest.approx(expected)
    assert s.fingerprint() != plain.fingerprint()


def test_a_late_phase_draws_its_own_probabilities_over_the_last_steps():
    """ks (1, 2, 4, 8), 60 steps of which the last 15 draw P = (0, 0, 0.5, 0.5): steps 0-44 draw as a
    schedule without the phase, steps 45-59 only 4 and 8, evenly; the run's P(k) is the mix."""
    late = KSchedule(strategy="token", ks=(1, 2, 4, 8), probs=(0.25,) * 4, seed=3, train_iters=60,
                     late_steps=15, late_probs=(0.0, 0.0, 0.5, 0.5))
    plain = KSchedule(strategy="token", ks=(1, 2, 4, 8), probs=(0.25,) * 4, seed=3, train_iters=60)
    ids = torch.arange(4096)
    for step in (0, 30, 44):
        assert torch.equal(late.token_ks(step, 1, ids), plain.token_ks(step, 1, ids))
    for step in (45, 59):
        ks = late.token_ks(step, 1, ids)
        counts = {k: int((ks == k).sum()) for k in (4, 8)}
        assert set(ks.tolist()) == {4, 8} and chi_square_ok(counts, (4, 8), (0.5, 0.5), len(ids))
        # The scalar path agrees with the vectorised one.
        assert [late.k(step, 0, 1, t) for t in range(64)] == ks[:64].tolist()
    assert late.marginal_probs() == pytest.approx((0.75 * 0.25, 0.75 * 0.25, 0.75 * 0.25 + 0.125, 0.75 * 0.25 + 0.125))
    assert late.fingerprint() != plain.fingerprint()
    other = KSchedule(strategy="token", ks=(1, 2, 4, 8), probs=(0.25,) * 4, seed=3, train_iters=60,
                      late_steps=15, late_probs=(0.1, 0.1, 0.4, 0.4))
    assert other.fingerprint() != late.fingerprint()
    layerwise = KSchedule(strategy="layerwise", ks=(1, 2, 4, 8), probs=(0.25,) * 4, seed=3, train_iters=60,
                          late_steps=15, late_probs=(0.0, 0.0, 0.0, 1.0))
    assert {layerwise.k(step, 0, layer) for step in range(45, 60) for layer in range(4)} == {8}
    with pytest.raises(ValueError, match="do not fit"):
        KSchedule(strategy="token", ks=(1, 2), probs=(0.5, 0.5), seed=3, train_iters=10, shrink_steps=6,
                  late_steps=6, late_probs=(0.5, 0.5))


def test_a_late_phase_from_the_config_covers_its_fraction_of_the_run():
    from mmoe_megatron.config import MatryoshkaConfig

    mat = MatryoshkaConfig(ks=[1, 2, 4, 8], late_fraction=0.25, late_probs=[0.1, 0.1, 0.4, 0.4], widths=[1.0])
    mat.check("m")
    s = KSchedule.from_config(mat, seed=3, global_batch_size=8, train_iters=2000)
    assert (s.late_steps, s.late_probs) == (500, (0.1, 0.1, 0.4, 0.4))
    assert s.marginal_probs() == pytest.approx((0.2125, 0.2125, 0.2875, 0.2875))
