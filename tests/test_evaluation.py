"""Evaluation at many ks (mmoe_megatron/evaluation): losses, per-layer vectors, expert-ranking
analysis, single process and under expert parallelism, on real text."""

from __future__ import annotations

import pytest
import torch

from tests.data_fixtures import data_config, small_datasets, small_tokenizer  # noqa: F401
from tests.dist import run_distributed

SEQ = 32
# ks, per-layer ks, and points of the (k, width) grid of slimmable experts (one width, or one per layer).
SPECS = [1, 3, 8, [1, 2, 3, 4], [4, 1, 8, 2], (2, 0.5), ([1, 2, 3, 4], [1.0, 0.5, 0.25, 0.75])]


def _cfg(tmp, tokenizer, prefix, **overrides):
    import pathlib

    return data_config(pathlib.Path(tmp), tokenizer, [(prefix, 1.0)], **{
        "data.seq_length": SEQ, "data.split": "80,20,0", "train.micro_batch_size": 2,
        "train.global_batch_size": 8, "logging.tensorboard": False, **overrides,
    })


def _reference_losses(model, dataset, indices, specs):
    """Mean token loss at each spec by a path independent of evaluation.core: each router's k set
    on its own, logits from the model, cross-entropy computed here in float64."""
    from mmoe_megatron.model import elastic_routers, slimmable_experts
    from mmoe_megatron.training.batches import collate

    routers, experts = elastic_routers(model), slimmable_experts(model)
    model.eval()
    out = []
    with torch.no_grad():
        for spec in specs:
            k, width = spec if isinstance(spec, tuple) else (spec, 1.0)
            for i, (router, layer_experts) in enumerate(zip(routers, experts)):
                router.set_k(k if isinstance(k, int) else k[i])
                layer_experts.set_width(width if isinstance(width, float) else width[i])
            total, count = 0.0, 0
            for i in indices:
                b = collate(dataset, [i])
                seq = b["tokens"].shape[1]
                mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
                logits = model(b["tokens"], b["position_ids"], mask).double()
                nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                                        reduction="none")
                total += float((nll * b["loss_mask"].flatten().double()).sum())
                count += int(b["loss_mask"].sum())
            out.append(total / count)
    return out


def _evaluate_in_layout(rank, world_size, tmp, tokenizer, prefix, expert):
    """evaluation.core.evaluate with a probe, in a DP x EP layout; also the reference on rank 0's
    own samples when the world is a single process."""
    from megatron.core import parallel_state as ps

    from mmoe_megatron import distributed
    from mmoe_megatron.data import build_datasets, resolve_vocab_size
    from mmoe_megatron.evaluation.analysis import RoutingProbe
    from mmoe_megatron.evaluation.core import evaluate
    from mmoe_megatron.model import build_model

    cfg = _cfg(tmp, tokenizer, prefix, **{"parallel.expert": expert})
    distributed.init_distributed(cfg)
    vocab = resolve_vocab_size(cfg)
    model = build_model(cfg, vocab)
    dataset = build_datasets(cfg, train_samples=1, valid_samples=16, test_samples=0)[1]
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    with RoutingProbe(model) as probe:
        points = evaluate(model, cfg, vocab, dataset, SPECS, 16, ps.get_data_parallel_rank(),
                          ps.get_data_parallel_world_size(), "cpu", mask,
                          group=ps.get_data_parallel_group(), probe=probe)
        summary = probe.summary("8", ps.get_data_parallel_group())
    out = {"losses": [p.loss for p in points], "tokens": [p.tokens for p in points],
           "summary": summary, "flops": [p.flops_per_token for p in points]}
    if world_size == 1:
        out["reference"] = _reference_losses(model, dataset, list(range(16)), SPECS)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_tokenizer, small_datasets):
    tmp = tmp_path_factory.mktemp("eval1")
    (out,) = run_distributed(_evaluate_in_layout, world_size=1, tmp=str(tmp), tokenizer=small_tokenizer,
                             prefix=small_datasets["sonnets"][0], expert=1)
    return out


def test_loss_at_each_k_equals_a_direct_forward(single):
    # megatron computes the loss in fp32; the reference in float64 from the same fp32 logits.
    assert single["losses"] == pytest.approx(single["reference"], rel=1e-7)
    # The specs are distinguishable: a bug applying the same k everywhere would not pass above.
    assert len({round(x, 6) for x in single["reference"]}) == len(SPECS)
    assert all(t == 16 * SEQ for t in single["tokens"])


def test_per_layer_vectors_route_each_layer_at_its_own_k(single):
    """The probe counts routed slots per MoE layer: exactly tokens x k of that layer."""
    from mmoe_megatron.evaluation.core import spec_label, split_spec

    tokens = 16 * SEQ
    for spec in SPECS:
        label = spec_label(spec)
        share = torch.tensor(single["summary"][label]["share"])
        assert share.shape == (4, 8)
        k = split_spec(spec)[0]
        ks = [k] * 4 if isinstance(k, int) else k
        assert single["summary"][label]["routed_slots"] == [tokens * k for k in ks]
        for layer, k in enumerate(ks):
            # A share is count / (tokens x k); an expert can get each token at most once.
            assert float(share[layer].max()) <= 1.0 / k + 1e-9
            assert int((share[layer] > 0).sum()) >= k


def test_first_layer_ranking_is_the_same_at_every_k(single):
    """The first MoE layer sees the same input at every k, so its ranking cannot change; later
    layers see inputs that depend on the earlier layers' k."""
    for label, s in single["summary"].items():
        assert s["spearman"][0] == pytest.approx(1.0)
        assert s["top1_agreement"][0] == pytest.approx(1.0)
    assert single["summary"]["8"]["spearman"] == pytest.approx([1.0] * 4)
    assert min(single["summary"]["1"]["spearman"][1:]) < 1.0


@pytest.mark.slow
def test_expert_parallel_evaluation_equals_single_process(single, tmp_path, small_tokenizer, small_datasets):
    outs = run_distributed(_evaluate_in_layout, world_size=2, tmp=str(tmp_path), tokenizer=small_tokenizer,
                           prefix=small_datasets["sonnets"][0], expert=2)
    for out in outs:
        assert out["losses"] == pytest.approx(single["losses"], rel=1e-6)
        assert out["tokens"] == single["tokens"]
        for label, s in single["summary"].items():
            assert torch.allclose(torch.tensor(out["summary"][label]["share"]), torch.tensor(s["share"]),
                                  atol=1e-12)
            assert out["summary"][label]["spearman"] == pytest.approx(s["spearman"], abs=1e-6)


def test_active_flops_grow_with_k(single):
    flops = dict(zip(map(str, SPECS), single["flops"]))
    assert flops["1"] < flops["3"] < flops["8"]
    # [1,2,3,4] and [4,1,8,2]: FLOPs depend on the sum of per-layer ks only (10 vs 15).
    assert flops["1"] < flops[str([1, 2, 3, 4])] < flops["3"] < flops[str([4, 1, 8, 2])] < flops["8"]
    # Expert FLOPs go with k x width: 2 experts at half width cost 1 at full width; the per-layer
    # point has k x width summing to 1 + 1 + 0.75 + 3 = 5.75 of 10.
    assert flops[str((2, 0.5))] == flops["1"]
    assert flops["1"] < flops[str(SPECS[-1])] < flops[str([1, 2, 3, 4])]


def test_spearman_rows_matches_its_definition():
    from mmoe_megatron.evaluation.analysis import spearman_rows

    a = torch.tensor([[0.1, 0.5, 0.2, 0.9], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    b = torch.tensor([[0.3, 0.8, 0.1, 0.7], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    got = spearman_rows(a, b)
    # Row 0: ranks (0, 2, 1, 3) vs (1, 3, 0, 2): 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6*4/60.
    assert got.tolist() == pytest.approx([1 - 6 * 4 / 60, 1.0, -1.0])
