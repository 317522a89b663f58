"""Real gloo processes, world 2 with expert parallelism 2, against a single-process reference.

Each rank takes its half of one global batch (data parallel for dense weights, experts split
over the two ranks). The reference runs the same two halves as two micro-batches on one
process with all eight experts. Losses and every gradient must agree, for the layer-wise and
the per-token strategies and for a sample plan (sandwich and coupled samples on top of
layer-wise draws), under both dispatchers; the ks must agree across ranks, and the sync
check must catch a rank that routes with different ks.
"""

import dataclasses

import pytest
import torch

from tests.dist import run_distributed
from tests.helpers import VOCAB, forward_loss, tiny_batch, tiny_config

MBS = 2
STEP = 5


# Variant -> matryoshka overrides. "plan": of the 4 samples of the global batch, one at k_min and
# one at k_max in every layer (sandwich 0.5), one at a per-sample draw (coupled 0.25), one free.
VARIANTS = {
    "layerwise": {"matryoshka.strategy": "layerwise"},
    "token": {"matryoshka.strategy": "token"},
    "plan": {"matryoshka.strategy": "layerwise", "matryoshka.sandwich": 0.5, "matryoshka.coupled": 0.25},
    # Step 5 of 10 lies in the late phase (the last 6 steps), which draws only k = 3 and 4; the
    # learned gains are dense router weights averaged over the ranks.
    "late": {"matryoshka.strategy": "token", "train.train_iters": 10, "optimizer.warmup_iters": 1,
             "matryoshka.late_fraction": 0.6, "matryoshka.late_probs": [0.0, 0.0, 0.5, 0.5],
             "matryoshka.gate_gain": "learned"},
    # Gains per k and channel scale each token's combined output on the rank that holds the
    # token, after the experts' outputs came back: their gradients need every token's own k.
    "channels": {"matryoshka.strategy": "token", "matryoshka.gate_gain": "channels"},
    # Adapters per k, the same way; their output maps start at zero, so the worker sets them
    # (the same values on every rank and in the reference) for the input maps to get gradients.
    "adapter": {"matryoshka.strategy": "token", "matryoshka.k_adapter_rank": 4},
}


def config(dispatcher, variant, expert):
    return tiny_config(**{
        "moe.dispatcher": dispatcher, "parallel.expert": expert, **VARIANTS[variant],
        "train.micro_batch_size": MBS, "train.global_batch_size": 2 * MBS,
        "data.seq_length": 32, "moe.z_loss_coeff": 1e-3,
    })


def _grads(model, cfg):
    from mmoe_megatron.model import named_global_parameters

    return {name: p.grad.detach().clone() for name, p in named_global_parameters(model, cfg)}


def _set_adapter_maps(model):
    """Non-zero output maps of the adapters per k (variant "adapter"), the same in every copy."""
    for name, param in model.named_parameters():
        if name.endswith("k_adapter_out"):
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _ep_worker(rank, world_size, dispatcher):
    import torch.distributed as dist

    from mmoe_megatron import distributed
    from mmoe_megatron.elastic import ElasticK, KDesyncError
    from mmoe_megatron.layout import is_expert_param
    from mmoe_megatron.model import build_model, elastic_routers

    out = {}
    distributed.init_distributed(config(dispatcher, "layerwise", expert=2))
    for strategy in VARIANTS:
        cfg = config(dispatcher, strategy, expert=2)
        model = build_model(cfg, VOCAB)
        _set_adapter_maps(model)
        tokens, labels = tiny_batch(cfg, 2 * MBS, seed=3)  # the global batch, same on all ranks
        ek = ElasticK.from_config(model, cfg, dp_rank=rank, dp_size=world_size)
        ek.set_microbatch(STEP, 0)
        mine = slice(rank * MBS, (rank + 1) * MBS)
        loss = forward_loss(model, tokens[mine], labels[mine])
        loss.backward()
        grads = _grads(model, cfg)
        for name, g in grads.items():
            if not is_expert_param(name):  # dense: average over data-parallel ranks
                dist.all_reduce(g)
            grads[name] = g / world_size  # experts: megatron divides by the full DP size too
        ek.check_sync()  # in sync: must not raise
        used = [r.last_k if isinstance(r.last_k, int) else r.last_k.tolist() for r in elastic_routers(model)]
        out[strategy] = {"loss": loss.item(), "grads": grads, "used": used}

        # Desynchronise rank 1 on purpose: the check must fail on every rank and name it.
        if strategy == "layerwise":
            if rank == 1:
                routers = elastic_routers(model)
                routers[2].set_k(1 if ek.layer_ks[2] != 1 else 2)
        elif rank == 1:
            ek.schedule = dataclasses.replace(ek.schedule, seed=999)
            ek.set_microbatch(STEP, 0)
        with torch.no_grad():
            forward_loss(model, tokens[mine], labels[mine])
        try:
            ek.check_sync()
            out[strategy]["desync"] = None
        except KDesyncError as e:
            out[strategy]["desync"] = str(e)
    return out


def reference(dispatcher, strategy):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mmoe_megatron.elastic import ElasticK
    from mmoe_megatron.model import build_model, elastic_routers

    cfg = config(dispatcher, strategy, expert=1)
    model = build_model(cfg, VOCAB)
    _set_adapter_maps(model)
    tokens, labels = tiny_batch(cfg, 2 * MBS, seed=3)
    ek = ElasticK.from_config(model, cfg, dp_rank=0, dp_size=1)
    losses, used = [], []
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.5))  # two micro-batches
    try:
        for mb in range(2):
            ek.set_microbatch(STEP, mb)
            loss = forward_loss(model, tokens[mb * MBS:(mb + 1) * MBS], labels[mb * MBS:(mb + 1) * MBS])
            (loss / 2).backward()
            losses.append(loss.item())
            used.append([r.last_k if isinstance(r.last_k, int) else r.last_k.tolist()
                         for r in elastic_routers(model)])
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    return losses, _grads(model, cfg), used


@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_expert_parallel_matches_single_process(single_process_mcore, dispatcher):
    ranks = run_distributed(_ep_worker, world_size=2, dispatcher=dispatcher)
    for strategy in VARIANTS:
        ref_losses, ref_grads, ref_used = reference(dispatcher, strategy)
        for rank, result in enumerate(ranks):
            r = result[strategy]
            assert r["loss"] == pytest.approx(ref_losses[rank], rel=1e-6, abs=1e-6)
            assert r["used"] == ref_used[rank]
        if strategy == "layerwise":
            # One k per layer per step, the same on both ranks; layers differ.
            assert ranks[0][strategy]["used"] == ranks[1][strategy]["used"]
        else:
            # Per-token ks: each rank's tokens got their own ks (not a copy of the other's).
            assert ranks[0][strategy]["used"] != ranks[1][strategy]["used"]
        if strategy == "plan":
            # Planned samples use one k at every token of every layer: k_min and k_max once each.
            per_sample = []
            for result in ranks:
                for b in range(MBS):
                    ks = {k for layer in result[strategy]["used"] for k in torch.tensor(layer).view(-1, MBS)[:, b].tolist()}
                    per_sample.append(ks)
            assert {1} in per_sample and {4} in per_sample
            assert sum(len(ks) == 1 for ks in per_sample) >= 3
        if strategy == "late":
            drawn = {k for result in ranks for layer in result[strategy]["used"] for k in torch.tensor(layer).view(-1).tolist()}
            assert drawn == {3, 4}
            assert any(name.endswith("router.log_gain") for name in ref_grads)
        if strategy == "channels":
            gains = [g for name, g in ref_grads.items() if name.endswith("router.log_gain")]
            assert len(gains) == 4 and all(g.shape == (4, 64) and (g.abs().sum(dim=1) > 0).all() for g in gains)
        if strategy == "adapter":
            maps = [g for name, g in ref_grads.items() if ".k_adapter_" in name]
            assert len(maps) == 8 and all(g.shape[0] == 4 and (g.flatten(1).abs().sum(dim=1) > 0).all() for g in maps)
        merged = {**ranks[0][strategy]["grads"], **ranks[1][strategy]["grads"]}
        assert set(merged) == set(ref_grads)
        experts = {n for n in merged if ".local_experts." in n}
        assert len({n.split(".local_experts.")[1].split(".")[0] for n in experts}) == 8
        for name, ref in ref_grads.items():
            assert torch.allclose(merged[name], ref, rtol=1e-4, atol=1e-7), (strategy, name)
        # The deliberately desynchronised rank is caught on every rank and named.
        for result in ranks:
            message = result[strategy]["desync"]
            assert message is not None
            if strategy == "layerwise":
                assert "MoE layer 2" in message and "rank 1 used k=" in message
            else:
                assert "k-schedule fingerprint differs" in message and "rank 1" in message
