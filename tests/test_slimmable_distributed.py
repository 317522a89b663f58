"""Slimmable experts with expert parallelism: real gloo processes (world 2, EP 2) against a
single-process reference, at mixed (k, width) draws, under both dispatchers.

As in test_elastic_distributed.py, each rank takes its half of one global batch and the reference
runs the two halves as two micro-batches with all eight experts on one process. Variants: k and
width drawn per token (independently), the same with expert_grad added (the marked weights
travel with their tokens), and one k and one width per layer drawn jointly. Losses, every gradient
and the ks and widths used must agree, and the sync check must name a rank whose experts run at
another width.
"""

import pytest
import torch

from tests.dist import run_distributed
from tests.helpers import VOCAB, forward_loss, tiny_batch, tiny_config

MBS = 2
STEP = 3
WIDTHS = [0.25, 0.5, 0.75, 1.0]
VARIANTS = {
    "token": {"matryoshka.strategy": "token"},
    "token-added": {"matryoshka.strategy": "token", "matryoshka.expert_grad": "added"},
    "layerwise-joint": {"matryoshka.strategy": "layerwise", "matryoshka.width_pairing": "joint"},
}


def config(dispatcher, variant, expert):
    return tiny_config(**{
        "moe.dispatcher": dispatcher, "parallel.expert": expert, **VARIANTS[variant],
        "matryoshka.widths": WIDTHS, "train.micro_batch_size": MBS, "train.global_batch_size": 2 * MBS,
        "data.seq_length": 32,
    })


def _grads(model, cfg):
    from mmoe_megatron.model import named_global_parameters

    return {name: p.grad.detach().clone() for name, p in named_global_parameters(model, cfg)}


def _used(ek):
    """What every router and every layer's experts used in the last forward."""
    ks = [r.last_k if isinstance(r.last_k, int) else r.last_k.tolist() for r in ek.routers]
    widths = [e.last_width if isinstance(e.last_width, float) else e.last_width.tolist() for e in ek.experts]
    return ks, widths


def _ep_worker(rank, world_size, dispatcher):
    import torch.distributed as dist

    from mmoe_megatron import distributed
    from mmoe_megatron.elastic import ElasticK, KDesyncError
    from mmoe_megatron.layout import is_expert_param
    from mmoe_megatron.model import build_model

    out = {}
    distributed.init_distributed(config(dispatcher, "token", expert=2))
    for variant in VARIANTS:
        cfg = config(dispatcher, variant, expert=2)
        model = build_model(cfg, VOCAB)
        tokens, labels = tiny_batch(cfg, 2 * MBS, seed=3)
        ek = ElasticK.from_config(model, cfg, dp_rank=rank, dp_size=world_size)
        ek.set_microbatch(STEP, 0)
        mine = slice(rank * MBS, (rank + 1) * MBS)
        loss = forward_loss(model, tokens[mine], labels[mine])
        loss.backward()
        grads = _grads(model, cfg)
        for name, g in grads.items():
            if not is_expert_param(name):
                dist.all_reduce(g)
            grads[name] = g / world_size
        ek.check_sync()  # in sync: must not raise
        out[variant] = {"loss": loss.item(), "grads": grads, "used": _used(ek)}
        # Rank 1's experts of MoE layer 1 run at another width: caught on every rank, named.
        if rank == 1:
            experts = ek.experts[1]
            if experts.carries_levels:
                levels = experts.token_levels_SB.clone()
                levels[0, 0] = 1 if levels[0, 0] != 1 else 2
                experts.set_token_levels(levels)
            else:
                experts.set_width(0.25 if experts.width != 0.25 else 0.5)
        with torch.no_grad():
            forward_loss(model, tokens[mine], labels[mine])
        try:
            ek.check_sync()
            out[variant]["desync"] = None
        except KDesyncError as e:
            out[variant]["desync"] = str(e)
    return out


def reference(dispatcher, variant):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mmoe_megatron.elastic import ElasticK
    from mmoe_megatron.model import build_model

    cfg = config(dispatcher, variant, expert=1)
    model = build_model(cfg, VOCAB)
    tokens, labels = tiny_batch(cfg, 2 * MBS, seed=3)
    ek = ElasticK.from_config(model, cfg, dp_rank=0, dp_size=1)
    losses, used = [], []
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.5))
    try:
        for mb in range(2):
            ek.set_microbatch(STEP, mb)
            loss = forward_loss(model, tokens[mb * MBS:(mb + 1) * MBS], labels[mb * MBS:(mb + 1) * MBS])
            (loss / 2).backward()
            losses.append(loss.item())
            used.append(_used(ek))
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    return losses, _grads(model, cfg), used


@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_expert_parallel_matches_single_process_at_mixed_k_and_width(single_process_mcore, dispatcher):
    ranks = run_distributed(_ep_worker, world_size=2, dispatcher=dispatcher)
    for variant in VARIANTS:
        ref_losses, ref_grads, ref_used = reference(dispatcher, variant)
        for rank, result in enumerate(ranks):
            r = result[variant]
            assert r["loss"] == pytest.approx(ref_losses[rank], rel=1e-6, abs=1e-6)
            assert r["used"] == ref_used[rank]
        ks, widths = ranks[0][variant]["used"]
        if variant.startswith("token"):
            # Per-token draws: every width occurs, and k and width are not the same draw.
            levels = torch.tensor(widths)
            assert set(levels.unique().tolist()) == {1, 2, 3, 4}
            assert not torch.equal(torch.tensor(ks), levels)  # ks 1..4 would equal joint levels 1..4
        else:
            # One width per layer, drawn with the layer's k (joint): the q-th quantile of each.
            assert all(WIDTHS.index(w) + 1 == k for k, w in zip(ks, widths)), (ks, widths)
        merged = {**ranks[0][variant]["grads"], **ranks[1][variant]["grads"]}
        assert set(merged) == set(ref_grads)
        for name, ref in ref_grads.items():
            assert torch.allclose(merged[name], ref, rtol=1e-4, atol=1e-7), (variant, name)
        for result in ranks:
            message = result[variant]["desync"]
            assert message is not None and "MoE layer 1" in message and "rank 1" in message, message
            assert ("per-token widths differ" in message) if variant.startswith("token") else ("width level" in message)
    # expert_grad added keeps every value and changes the experts' gradients, on every rank.
    for result in ranks:
        assert result["token-added"]["loss"] == result["token"]["loss"]
        plain, added = result["token"]["grads"], result["token-added"]["grads"]
        experts = [n for n in plain if ".experts." in n and plain[n].any()]
        assert experts and all(not torch.allclose(added[n], plain[n]) for n in experts)


def _resume_worker(rank, world_size, tmp):
    """Train 2 steps (ZeRO-2, EP 2, k and width per token), checkpoint, train 2 more; a fresh
    trainer resumes and must reproduce the last 2 steps bit for bit, drawing the same widths. A
    trainer with other widths must refuse the checkpoint."""
    from mmoe_megatron import distributed
    from mmoe_megatron.training.checkpoint import CheckpointError
    from mmoe_megatron.training.trainer import Trainer
    from tests.test_training_distributed import global_tokens, make_batch

    def cfg_with(widths):
        return tiny_config(**{
            "parallel.expert": 2, "matryoshka.widths": widths, "data.seq_length": 32,
            "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.train_iters": 10,
            "train.precision": "fp32", "optimizer.warmup_iters": 1, "optimizer.zero_stage": 2,
            "logging.dir": tmp, "logging.tensorboard": False, "matryoshka.sync_check_interval": 1,
        })

    cfg = cfg_with(WIDTHS)
    distributed.init_distributed(cfg)
    tokens = global_tokens(cfg, 4)

    def run(trainer, steps):
        out = []
        for step in steps:
            mbs = [make_batch(tokens, trainer.layout.sample_indices(step, m, trainer.dp_rank))
                   for m in range(trainer.layout.num_microbatches)]
            out.append((trainer.train_step(step, mbs)["loss"],
                        [e.last_width.clone() for e in trainer.elastic.experts]))
            trainer.step = step + 1
        return out

    trainer = Trainer(cfg, vocab_size=VOCAB, datasets=())
    run(trainer, range(2))
    trainer.save()
    continued = run(trainer, range(2, 4))
    fresh = Trainer(cfg, vocab_size=VOCAB, datasets=())
    assert fresh.maybe_resume() and fresh.step == 2
    resumed = run(fresh, range(2, 4))
    other = Trainer(cfg_with([0.5, 1.0]), vocab_size=VOCAB, datasets=())
    try:
        other.maybe_resume()
        refused = None
    except CheckpointError as e:
        refused = str(e)
    return {"continued": continued, "resumed": resumed, "refused": refused}


@pytest.mark.slow
def test_resume_draws_the_same_widths_and_other_widths_are_refused(tmp_path):
    ranks = run_distributed(_resume_worker, world_size=2, timeout=400, tmp=str(tmp_path))
    for r in ranks:
        for (loss_c, widths_c), (loss_r, widths_r) in zip(r["continued"], r["resumed"]):
            assert loss_c == loss_r  # bitwise: fp32 on CPU
            assert all(torch.equal(a, b) for a, b in zip(widths_c, widths_r))
        assert "another k or width schedule" in r["refused"]
