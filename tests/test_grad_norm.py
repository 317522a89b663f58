"""Gradient clipping on any number of data-parallel ranks, with real gloo processes.

One seed trained on 1 and on 2 ranks sees the same global batches; each rank's gradients sum to
the single process's to the last bit, but ZeRO's gradient norm is summed over the ranks' partitions,
and a norm that differs in its last bit clips by a different factor. With the clipping threshold
low enough to clip at every step, the two runs must still log the same loss and norm at every step.
(With DeepSpeed's own norm this model, the 2x rung's k = 8 specialist on mock data, parts at step 2.)
"""

from __future__ import annotations

import pytest

from tests.dist import run_distributed
from tests.helpers import VOCAB, tiny_config

STEPS, CLIP = 10, 0.05
BASE = {
    "data.mock": True, "model.vocab_size": VOCAB, "data.seq_length": 32,
    "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.train_iters": STEPS,
    "train.precision": "fp32", "train.eval_interval": 0, "train.eval_iters": 1, "train.log_interval": 1,
    "optimizer.lr": 3e-3, "optimizer.warmup_iters": 2, "optimizer.clip_grad": CLIP,
    "moe.num_experts": 32, "moe.expert_ffn_hidden_size": 32, "matryoshka.strategy": "fixed", "matryoshka.ks": [8],
    "parallel.expert": 1, "checkpoint.save_interval": 0, "logging.tensorboard": False,
}


def _fit(rank, world_size, overrides):
    from mmoe_megatron import distributed
    from mmoe_megatron.training.trainer import Trainer

    cfg = tiny_config(**{**BASE, **overrides})
    distributed.init_distributed(cfg)
    Trainer(cfg, vocab_size=VOCAB).fit()


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_a_clipped_run_trains_the_same_weights_on_one_and_two_ranks(tmp_path, zero_stage):
    from mmoe_megatron.training.metrics import read_metrics

    logged = {}
    for world in (1, 2):
        run = str(tmp_path / f"world{world}")
        run_distributed(_fit, world_size=world, overrides={"logging.dir": run, "optimizer.zero_stage": zero_stage})
        logged[world] = read_metrics(run)["train"]
    assert sorted(logged[1]) == list(range(1, STEPS + 1))
    assert all(logged[1][s]["grad_norm"] > CLIP for s in logged[1])  # clipped at every step
    for step, one in logged[1].items():
        two = logged[2][step]
        assert (two["loss"], two["grad_norm"]) == (one["loss"], one["grad_norm"]), f"step {step}"
