"""Self-distillation from the widest routing (training/distill.py) and its place in the trainer."""

import pytest
import torch
import torch.nn.functional as F

from tests.dist import run_distributed
from tests.helpers import VOCAB, causal_mask, tiny_batch, tiny_config
from tests.test_training_distributed import SEQ, global_tokens, make_batch


def _setup(cfg):
    from mmoe_megatron.elastic import ElasticK
    from mmoe_megatron.model import build_model

    model = build_model(cfg, VOCAB)
    tokens, labels = tiny_batch(cfg, 2, seed=5)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    batch = {"tokens": tokens, "labels": labels, "position_ids": positions,
             "loss_mask": torch.ones_like(tokens, dtype=torch.float32)}
    return model, ElasticK.from_config(model, cfg), batch


def _snapshot(model):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from mmoe_megatron.model import elastic_routers

    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "rng": torch.get_rng_state(),
        "tracker_rng": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
        "counts": [r.token_counts_E.clone() for r in elastic_routers(model)],
        "aux": {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()},
        "training": model.training,
    }


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_teacher_forward_leaves_weights_rng_and_statistics_untouched(single_process_mcore):
    from mmoe_megatron.training.distill import teacher_log_probs

    cfg = tiny_config(**{"data.seq_length": 16, "train.micro_batch_size": 2, "matryoshka.ks": [1, 2, 4], "moe.z_loss_coeff": 1e-3})
    model, ek, batch = _setup(cfg)
    model.train()
    ek.set_microbatch(3, 0)
    before = _snapshot(model)
    logp = teacher_log_probs(model, batch, causal_mask(16), k_max=4, temperature=2.0)
    assert _same(before, _snapshot(model))
    assert logp.shape == (2, 16, model.vocab_size) and not logp.requires_grad
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 16), atol=1e-5)


def test_distillation_loss_is_zero_when_student_routes_like_the_teacher(single_process_mcore):
    from mmoe_megatron.model import elastic_routers
    from mmoe_megatron.training.distill import distillation_loss, teacher_log_probs

    cfg = tiny_config(**{"data.seq_length": 16, "train.micro_batch_size": 2, "matryoshka.ks": [1, 2, 4]})
    model, ek, batch = _setup(cfg)
    with torch.no_grad():  # at initialisation the experts' outputs are too small for k to matter
        for name, p in model.named_parameters():
            if "local_experts" in name and "linear_fc2" in name:
                p.mul_(100.0)
    model.train()
    mask = causal_mask(16)
    teacher = teacher_log_probs(model, batch, mask, k_max=4, temperature=1.0)

    def kl_of_student():
        logits = model(batch["tokens"], batch["position_ids"], mask)
        return distillation_loss(logits, batch["labels"], batch["loss_mask"], teacher, 0.5, 1.0)[2]

    # Per-token ks that are all k_max: the student's routing is the teacher's.
    for router in elastic_routers(model):
        router.set_token_ks(torch.full((16, 2), 4, dtype=torch.long), width=4)
    assert abs(kl_of_student().item()) < 1e-6
    # The schedule's mixed per-token ks: a real gap to the teacher.
    ek.set_microbatch(3, 0)
    assert kl_of_student().item() > 1e-3


def test_distillation_loss_matches_an_independent_formula():
    from mmoe_megatron.training.distill import distillation_loss

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen)
    teacher_logits = torch.randn(2, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    mask = torch.tensor([[1.0, 1, 1, 0, 1], [1, 1, 0, 1, 1]])
    T, c = 2.0, 0.3
    teacher = F.log_softmax(teacher_logits / T, dim=-1)
    objective, ce, kl = distillation_loss(student, labels, mask, teacher, c, T)
    kl_tok = F.kl_div(F.log_softmax(student / T, -1), teacher, reduction="none", log_target=True).sum(-1)
    ce_tok = -F.log_softmax(student, -1).gather(-1, labels[..., None]).squeeze(-1)
    n = mask.sum()
    assert kl.item() == pytest.approx(((kl_tok * mask).sum() / n).item(), rel=1e-5)
    assert ce.item() == pytest.approx(((ce_tok * mask).sum() / n).item(), rel=1e-5)
    assert objective.item() == pytest.approx((1 - c) * ce.item() + c * T * T * kl.item(), rel=1e-5)


def _train(rank, world_size, tmp, distill):
    from mmoe_megatron import distributed
    from mmoe_megatron.training.trainer import Trainer

    cfg = tiny_config(**{
        "data.seq_length": SEQ, "train.micro_batch_size": 4, "train.global_batch_size": 8,
        "train.precision": "fp32", "matryoshka.distill_coeff": distill, "logging.dir": tmp,
        "logging.tensorboard": False, "optimizer.warmup_iters": 0,
    })
    distributed.init_distributed(cfg)
    trainer = Trainer(cfg, vocab_size=VOCAB, datasets=())
    tokens = global_tokens(cfg, 3)
    results = []
    for step in range(3):
        mbs = [make_batch(tokens, trainer.layout.sample_indices(step, m, 0)) for m in range(2)]
        results.append(trainer.train_step(step, mbs))
    return results


@pytest.mark.slow
def test_trainer_distills_and_logs_the_cross_entropy(tmp_path):
    """The first step's logged loss (before any update) is the same cross-entropy with and without
    distillation, so the teacher did not disturb the student's forward; the objective then differs,
    and the KL to the teacher is logged."""
    (plain,) = run_distributed(_train, world_size=1, tmp=str(tmp_path / "plain"), distill=0.0)
    (distilled,) = run_distributed(_train, world_size=1, tmp=str(tmp_path / "distill"), distill=0.5)
    assert distilled[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)
    assert distilled[1]["loss"] != plain[1]["loss"]  # the KL changed the first update
    assert all(r["distill_kl"] > 0 for r in distilled)
    assert all("distill_kl" not in r for r in plain)
