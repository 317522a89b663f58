"""`optimizer.train_only`: training a subset of the parameters (here the routers and their
temperatures) over frozen others, with real gloo ranks against a single-process reference.

The resumed run goes 2 ranks (expert parallel 2, ZeRO-2) -> the same -> 1 rank: its resumes go
through DeepSpeed's own shards (which hold no frozen weights) and then through the layout-free
optimizer state (which holds the trained parameters only).
"""

from __future__ import annotations

import os

import pytest

from tests.dist import run_distributed
from tests.helpers import VOCAB, tiny_config

STEPS, EVERY = 6, 2
ROUTERS = "*.mlp.router.*"
BASE = {
    "data.mock": True, "model.vocab_size": VOCAB, "data.seq_length": 32,
    "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.train_iters": STEPS,
    "train.precision": "fp32", "train.eval_interval": 0, "train.eval_iters": 1, "train.log_interval": 1,
    "optimizer.lr": 3e-2, "optimizer.warmup_iters": 0, "optimizer.weight_decay": 0.1,
    "matryoshka.gate_temperature": "learned", "optimizer.train_only": [ROUTERS],
    "checkpoint.save_interval": 0, "logging.tensorboard": False,
}


def _fit(rank, world_size, overrides):
    """Train; the global weights this rank holds as built (before any resume) and after, the
    names that train, and how many parameters ZeRO's optimizer holds."""
    from mmoe_megatron import distributed
    from mmoe_megatron.model import named_global_parameters
    from mmoe_megatron.training.trainer import Trainer

    cfg = tiny_config(**{**BASE, **overrides})
    distributed.init_distributed(cfg)
    trainer = Trainer(cfg, vocab_size=VOCAB)
    before = {n: p.detach().clone() for n, p in named_global_parameters(trainer.engine.module, cfg)}
    in_optimizer = {id(p) for group in trainer.engine.optimizer.bit16_groups for p in group}
    trainer.fit()
    after = {n: p.detach().clone() for n, p in named_global_parameters(trainer.engine.module, cfg)}
    names = {n for n, p in named_global_parameters(trainer.engine.module, cfg) if p.requires_grad}
    return {"before": before, "after": after, "trained": names,
            "optimizer_params": len(in_optimizer), "trained_params": len(names)}


def _merged(outs, key):
    merged = {}
    for out in outs:
        merged.update(out[key])
    return merged


@pytest.mark.slow
def test_routers_alone_train_and_resume_on_another_layout_like_an_uninterrupted_run(tmp_path):
    import torch

    from mmoe_megatron.training.checkpoint import tag_for
    from mmoe_megatron.training.metrics import read_metrics

    reference = str(tmp_path / "reference")
    [ref] = run_distributed(_fit, world_size=1, overrides={"logging.dir": reference, "parallel.expert": 1,
                                                           "optimizer.zero_stage": 2})
    routers = {n for n in ref["after"] if ".mlp.router." in n}
    assert routers and any(n.endswith("log_temperature") for n in routers)
    assert ref["trained"] == routers
    # ZeRO's parameter groups (flattened into its fp32 partitions) hold the trained parameters only.
    assert ref["optimizer_params"] == ref["trained_params"] < len(ref["after"])
    for name, value in ref["after"].items():
        if name in routers:
            assert not torch.equal(value, ref["before"][name]), f"{name} did not train"
        else:
            assert torch.equal(value, ref["before"][name]), f"{name} is frozen but changed"

    run = str(tmp_path / "run")
    first = run_distributed(_fit, world_size=2, overrides={
        "logging.dir": run, "parallel.expert": 2, "train.exit_interval": EVERY})
    # Each expert-parallel rank holds half of the experts; together they are the reference's start.
    start = _merged(first, "before")
    assert start.keys() == ref["before"].keys()
    assert all(torch.equal(start[n], ref["before"][n]) for n in start)
    checkpoint = os.path.join(run, "checkpoints", tag_for(EVERY))
    optim = [f for f in os.listdir(os.path.join(checkpoint, "optim")) if f.endswith(".safetensors")]
    from safetensors import safe_open

    saved = set()
    for f in optim:
        with safe_open(os.path.join(checkpoint, "optim", f), framework="pt") as handle:
            saved |= {key.split(".", 1)[1] for key in handle.keys()}
    assert saved == routers

    run_distributed(_fit, world_size=2, overrides={
        "logging.dir": run, "parallel.expert": 2, "train.exit_interval": EVERY})
    [resumed] = run_distributed(_fit, world_size=1, overrides={"logging.dir": run, "parallel.expert": 1})
    ref_metrics, got = read_metrics(reference)["train"], read_metrics(run)["train"]
    assert sorted(got) == sorted(ref_metrics) == list(range(1, STEPS + 1))
    for step in ref_metrics:
        assert got[step]["loss"] == pytest.approx(ref_metrics[step]["loss"], rel=1e-5, abs=0), step
    resumes = read_metrics(run)["resumes"]
    assert [r["step"] for r in resumes] == [EVERY, 2 * EVERY] and resumes[0]["layout_change"] is None
    assert resumes[1]["layout_change"][1].startswith("1 rank")
    # fp32 sums run in another order on 2 ranks than on 1, and in another again with each CPU's
    # kernels; Adam turns those last bits of a small gradient into a share of a whole step. The
    # resumed weights therefore match to 3e-3 of one step (of the peak learning rate; measured at
    # most 1.0e-6 with AVX512 kernels, 9.4e-6 with AVX2, 1.7e-5 with scalar ones), which a lost or
    # misplaced optimizer state would exceed by far: it moves a weight by the order of a step.
    tolerance = 3e-3 * BASE["optimizer.lr"]
    for name, value in resumed["after"].items():
        assert torch.allclose(value, ref["after"][name], rtol=1e-4, atol=tolerance), name
        if name not in routers:
            assert torch.equal(value, ref["before"][name]), f"{name} is frozen but changed across the resume"
    # The routers' steps moved the loss, and the routers, by more than the tolerances above.
    assert ref_metrics[STEPS]["loss"] < ref_metrics[1]["loss"] - 0.01
    moved = max(float((ref["after"][n] - ref["before"][n]).abs().max()) for n in routers)
    assert moved > 100 * tolerance


def _refused(rank, world_size):
    from mmoe_megatron import distributed
    from mmoe_megatron.config import ConfigError
    from mmoe_megatron.training.trainer import Trainer

    cfg = tiny_config(**{**BASE, "optimizer.train_only": [ROUTERS, "*.mlp.routers.*"]})
    distributed.init_distributed(cfg)
    try:
        Trainer(cfg, vocab_size=VOCAB)
    except ConfigError as e:
        return str(e)
    return None


def test_a_pattern_that_matches_no_parameter_is_refused_with_the_names():
    for message in run_distributed(_refused, world_size=2):
        assert message is not None
        assert message.startswith("optimizer.train_only") and "['*.mlp.routers.*'] match no parameter" in message
        assert "decoder.layers." in message  # examples of the names to write patterns for
