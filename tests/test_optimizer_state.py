"""Resuming on another layout through the layout-free optimizer state, with real gloo ranks.

One run goes 4 ranks (expert parallel 2 x data parallel 2, ZeRO-2) -> 2 ranks (EP 2) -> 1 rank ->
4 ranks (EP 4, ZeRO-1), stopping every 3 steps (`train.exit_interval`); an uninterrupted run on one
process is the reference. Same global batch, same ks (drawn per token from its place in the
global batch): only the reduction order differs, so the losses agree to fp32 rounding.
"""

from __future__ import annotations

import os

import pytest

from tests.dist import run_distributed
from tests.helpers import VOCAB, tiny_config

STEPS, EVERY = 12, 3
BASE = {
    "data.mock": True, "model.vocab_size": VOCAB, "data.seq_length": 32,
    "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.train_iters": STEPS,
    "train.precision": "fp32", "train.eval_interval": 0, "train.eval_iters": 1, "train.log_interval": 1,
    "optimizer.lr": 3e-3, "optimizer.warmup_iters": 2, "optimizer.clip_grad": 1.0,
    "checkpoint.save_interval": 0, "logging.tensorboard": False,
}
# (world size, expert parallel, ZeRO stage) of each launch of the resumed run.
LAUNCHES = [(4, 2, 2), (2, 2, 2), (1, 1, 2), (4, 4, 1)]


def _fit(rank, world_size, overrides, also=None):
    from mmoe_megatron import distributed
    from mmoe_megatron.training.trainer import Trainer

    cfg = tiny_config(**{**BASE, **overrides})
    distributed.init_distributed(cfg)
    Trainer(cfg, vocab_size=VOCAB).fit()
    return also(cfg) if also else None


def _unsupported_then_advice(cfg):
    """On 2 ranks: the 1-rank reference checkpoint, which has no layout-free optimizer state, is
    refused with what to do instead; doing that (its weights, a fresh optimizer) then works."""
    import torch

    from mmoe_megatron.model import named_global_parameters
    from mmoe_megatron.training.checkpoint import CheckpointError, load_global_state_dict
    from mmoe_megatron.training.trainer import Trainer

    ref_ckpt = os.path.join(os.path.dirname(cfg.run_dir), "reference", "checkpoints", f"step_{STEPS:08d}")
    other = os.path.join(os.path.dirname(cfg.run_dir), "advice")
    refused = Trainer(tiny_config(**{**BASE, "logging.dir": other, "checkpoint.load": ref_ckpt}), vocab_size=VOCAB)
    try:
        refused.restore()
        message = None
    except CheckpointError as e:
        message = str(e)
    advised = Trainer(tiny_config(**{**BASE, "logging.dir": other, "checkpoint.load": None,
                                     "checkpoint.init_weights": ref_ckpt}), vocab_size=VOCAB)
    resumed = advised.restore()
    saved = load_global_state_dict(ref_ckpt)
    same = all(torch.equal(p.detach(), saved[n]) for n, p in named_global_parameters(advised.engine.module, advised.cfg))
    return {"message": message, "advice_resumed": resumed, "advice_step": advised.step, "advice_weights": same}


@pytest.mark.slow
def test_resume_across_world_sizes_and_expert_splits_matches_an_uninterrupted_run(tmp_path):
    from mmoe_megatron.training.metrics import read_metrics

    # The reference keeps no layout-free optimizer state; its checkpoint serves the refusal below.
    reference = str(tmp_path / "reference")
    run_distributed(_fit, world_size=1, overrides={
        "logging.dir": reference, "parallel.expert": 1, "optimizer.zero_stage": 2,
        "checkpoint.layout_free_optimizer": False})
    run = str(tmp_path / "run")
    for i, (world, expert, zero) in enumerate(LAUNCHES):
        out = run_distributed(_fit, world_size=world, overrides={
            "logging.dir": run, "parallel.expert": expert, "optimizer.zero_stage": zero,
            "train.exit_interval": EVERY}, also=_unsupported_then_advice if world == 2 else None)
        assert max(read_metrics(run)["train"]) == EVERY * (i + 1)
        if world == 2:
            refusal = out[0]

    ref, got = read_metrics(reference)["train"], read_metrics(run)["train"]
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    worst = max(abs(got[s]["loss"] - ref[s]["loss"]) / ref[s]["loss"] for s in ref)
    print(f"\nlargest relative loss difference over {STEPS} steps and 3 layout changes: {worst:.2e}")
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=0), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step
        assert got[step]["lr"] == ref[step]["lr"]
    # Training moved the loss far more than the tolerance: a resume that lost the optimizer
    # state would not stay within it (the reference's step-to-step changes are checked too).
    assert ref[STEPS]["loss"] < ref[1]["loss"] - 0.1

    resumes = read_metrics(run)["resumes"]
    assert [(r["step"], r["attempt"], len(r["hosts"]), r["world_size"]) for r in resumes] == [
        (3, 2, 2, 2), (6, 3, 1, 1), (9, 4, 4, 4)]
    assert resumes[0]["layout_change"] == ["4 ranks, expert parallel 2, data parallel 4, ZeRO-2",
                                           "2 ranks, expert parallel 2, data parallel 2, ZeRO-2"]

    message = refusal["message"]
    assert message and "no layout-free optimizer state" in message
    assert "Resume with 1 rank and parallel.expert=1" in message
    advice = f"--checkpoint.load=null --checkpoint.init_weights={reference}/checkpoints/step_{STEPS:08d}"
    assert advice in message
    assert refusal == {"message": message, "advice_resumed": False, "advice_step": 0, "advice_weights": True}


def test_layout_changes_that_cannot_be_resumed_say_what_to_do():
    from mmoe_megatron.training.optimizer_state import layout_change_problem, same_layout

    saved = {"world_size": 8, "tensor_parallel": 2, "expert_parallel": 2, "zero_stage": 1,
             "layout_free_optimizer": True}
    now = {"world_size": 4, "tensor_parallel": 2, "expert_parallel": 2, "zero_stage": 1}
    assert not same_layout(saved, now)
    problem = layout_change_problem(saved, now, "/c/step_00000010")
    assert "parallel.tensor=1 only" in problem and "--checkpoint.init_weights=/c/step_00000010" in problem
    # A checkpoint from before the layout fields existed compares on what it has.
    old = {"world_size": 2, "expert_parallel": 2, "dp_size": 2}
    assert same_layout(old, {"world_size": 2, "tensor_parallel": 1, "expert_parallel": 2, "zero_stage": 1})
    assert "no layout-free optimizer state" in layout_change_problem(
        old, {"world_size": 1, "tensor_parallel": 1, "expert_parallel": 1, "zero_stage": 2}, "/c")
