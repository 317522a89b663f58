"""The width axis of the schedule (`WidthSchedule`): the guarantees of the k draws (pure, the same
in any process and after a resume, in the fingerprint), independence of or joint with k, the
sample plan on both axes, and the expected training compute."""

import subprocess
import sys

import pytest
import torch

from mmoe_megatron.config import MatryoshkaConfig
from mmoe_megatron.schedule import KSchedule, WidthSchedule, global_token_ids, grid_fingerprint, grid_probs
from tests.test_schedule import chi_square_ok

WIDTHS = [0.25, 0.5, 0.75, 1.0]


def schedules(gbs=8, seed=7, **mat):
    cfg = MatryoshkaConfig(**{"widths": WIDTHS, **mat})
    cfg.check("m")
    cfg.check_widths("m")
    return KSchedule.from_config(cfg, seed, gbs), WidthSchedule.from_config(cfg, seed, gbs)


def test_full_width_only_means_no_width_axis_and_the_k_fingerprint_unchanged():
    cfg = MatryoshkaConfig(widths=[1.0])
    k = KSchedule.from_config(cfg, 7, 8)
    assert WidthSchedule.from_config(cfg, 7, 8) is None
    assert grid_fingerprint(k, None) == k.fingerprint()


def test_width_draws_are_pure_and_the_same_in_another_process():
    _, w = schedules(strategy="layerwise")
    draws = [w.levels.k(step, 0, layer) for step in range(30) for layer in range(4)]
    assert draws == [schedules(strategy="layerwise")[1].levels.k(s, 0, l) for s in range(30) for l in range(4)]
    assert set(draws) == {1, 2, 3, 4}
    code = ("from mmoe_megatron.config import MatryoshkaConfig as M; from mmoe_megatron.schedule import "
            "WidthSchedule as W; c=M(widths=[0.25,0.5,0.75,1.0], strategy='layerwise');"
            "w=W.from_config(c,7,8); print([w.levels.k(s,0,l) for s in range(30) for l in range(4)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(draws)


def test_resume_draws_the_same_widths():
    full = [schedules()[1].levels.layer_token_ks(s, 0, 2, global_token_ids(0, 8, 16), 16) for s in range(20)]
    resumed = schedules()[1]  # rebuilt from the config after a restart
    assert all(torch.equal(resumed.levels.layer_token_ks(s, 0, 2, global_token_ids(0, 8, 16), 16), full[s])
               for s in range(10, 20))


def test_independent_widths_are_uniform_and_independent_of_k():
    k, w = schedules(strategy="token")
    ids = global_token_ids(0, 64, 128)
    ks = k.layer_token_ks(3, 0, 1, ids, 128).flatten()
    levels = w.levels.layer_token_ks(3, 0, 1, ids, 128).flatten()
    n = ks.numel()
    assert chi_square_ok({lv: int((levels == lv).sum()) for lv in range(1, 5)}, [1, 2, 3, 4], [0.25] * 4, n)
    # Independent: every (k, level) pair as often as the product of the marginals (5 sigma), and
    # no correlation.
    counts = torch.bincount((ks - 1) * 4 + (levels - 1), minlength=16).float()
    assert (counts - n / 16).abs().max() < 5 * (n / 16) ** 0.5
    assert abs(float(torch.corrcoef(torch.stack([ks.float(), levels.float()]))[0, 1])) < 0.05


def test_joint_widths_take_the_same_quantile_as_k():
    k, w = schedules(strategy="token", width_pairing="joint")
    ids = global_token_ids(0, 8, 64)
    ks = k.layer_token_ks(5, 0, 0, ids, 64)
    levels = w.levels.layer_token_ks(5, 0, 0, ids, 64)
    order = {1: 1, 2: 2, 3: 3, 4: 4}  # ks [1, 2, 3, 4] and four widths, both uniform
    assert torch.equal(levels, ks.clone().apply_(order.get))
    assert w.fingerprint() != schedules(strategy="token")[1].fingerprint()


def test_width_strategies_follow_the_k_strategies():
    _, w = schedules(strategy="fixed", ks=[8])  # MoSE: fixed k, width per token
    assert w.levels.strategy == "token"
    _, w = schedules(strategy="token", width_strategy="layerwise")
    assert not w.levels.per_token
    assert {w.levels.k(4, mb, 2) for mb in range(5)} == {w.levels.k(4, 0, 2)}


def test_the_sample_plan_puts_sandwich_samples_at_both_ends_of_both_axes():
    k, w = schedules(gbs=8, strategy="token", sandwich=0.5)
    assert torch.equal(k.sample_ks(6) == 1, w.levels.sample_ks(6) == 1)
    assert torch.equal(k.sample_ks(6) == 4, w.levels.sample_ks(6) == 4)
    assert int((k.sample_ks(6) > 0).sum()) == 4


def test_fingerprint_covers_the_width_axis():
    k, w = schedules()
    base = grid_fingerprint(k, w)
    assert base != k.fingerprint()
    assert grid_fingerprint(*schedules(widths=[0.5, 1.0])) != base
    assert grid_fingerprint(*schedules(width_probs=[0.1, 0.2, 0.3, 0.4])) != base
    assert grid_fingerprint(*schedules(width_strategy="layerwise")) != base
    assert grid_fingerprint(*schedules(seed=8)) != base
    assert grid_fingerprint(*schedules()) == base


@pytest.mark.parametrize("pairing, expected_mean", [("independent", 2.5 * 0.625), ("joint", None)])
def test_grid_probabilities_give_the_expected_compute(pairing, expected_mean):
    k, w = schedules(strategy="token", width_pairing=pairing)
    probs = grid_probs(k, w)
    assert sum(probs.values()) == pytest.approx(1.0)
    mean = sum(p * kk * ww for (kk, ww), p in probs.items())
    if pairing == "joint":
        assert set(probs) == {(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)}
        expected_mean = (0.25 + 1.0 + 2.25 + 4.0) / 4
    assert mean == pytest.approx(expected_mean)
    k, w = schedules(strategy="token", sandwich=0.5, width_pairing=pairing)
    probs = grid_probs(k, w)
    assert probs[(1, 0.25)] >= 0.25 and probs[(4, 1.0)] >= 0.25


def test_grid_probabilities_count_the_late_phase():
    """Independent widths under a late phase: P(k, w) is the run's P(k) (3/4 uniform, 1/4 only k = 4)
    times the uniform P(w)."""
    cfg = MatryoshkaConfig(widths=WIDTHS, strategy="token", late_fraction=0.25, late_probs=[0.0, 0.0, 0.0, 1.0])
    cfg.check("m")
    cfg.check_widths("m")
    k = KSchedule.from_config(cfg, 7, 8, train_iters=100)
    probs = grid_probs(k, WidthSchedule.from_config(cfg, 7, 8))
    assert probs[(1, 0.25)] == pytest.approx(0.75 * 0.25 * 0.25)
    assert probs[(4, 1.0)] == pytest.approx((0.75 * 0.25 + 0.25) * 0.25)
    assert sum(probs.values()) == pytest.approx(1.0)
