"""Self-distillation from the widest routing (`matryoshka.distill_coeff`).

Before each training micro-batch, the same weights run a teacher forward with every MoE layer at
k_max, in eval mode and without gradient. The elastic (student) forward that follows is trained on

    (1 - c) * CE(labels, student) + c * T^2 * KL(teacher_T || student_T)       per token

where `_T` means the softmax at temperature T (Hinton et al. 2015). This is in-place distillation
as used for slimmable and once-for-all networks (Yu & Huang 2019; Cai et al. 2020): the widest
configuration of the shared weights teaches the narrower ones, with no second model. The teacher
costs one forward per micro-batch; the suite counts it in the training compute.

Shapes: B batch, S sequence, V vocabulary (the full, padded vocabulary: tensor parallelism is
refused with distillation at config load).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmoe_megatron.model import set_point


@torch.no_grad()
def teacher_log_probs(model: torch.nn.Module, batch: dict, mask, k_max: int,
                      temperature: float) -> torch.Tensor:
    """[B, S, V] float32 log-probabilities of the model at k_max and full width in every MoE layer.

    Eval mode: routers neither count tokens nor attach auxiliary losses, and no dropout draws from
    the RNG, so the teacher leaves weights, RNG streams and training statistics as they were. The
    caller sets the student's ks again afterwards (the routers are left at k_max)."""
    was_training = model.training
    model.eval()
    try:
        set_point(model, k_max)  # and every expert at full width
        logits_BSV = model(batch["tokens"], batch["position_ids"], mask)
    finally:
        model.train(was_training)
    return F.log_softmax(logits_BSV.float() / temperature, dim=-1)


def distillation_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor,
                      teacher_logp_BSV: torch.Tensor, coeff: float, temperature: float):
    """(objective, cross-entropy, KL), each the mean over the unmasked tokens.

    The objective mixes the label loss and the KL to the teacher; the cross-entropy alone is what
    the trainer logs as the loss, so that runs with and without distillation compare directly."""
    logits_BSV = logits_BSV.float()
    ce_BS = F.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten(), reduction="none").view_as(labels_BS)
    student_logp_BSV = F.log_softmax(logits_BSV / temperature, dim=-1)
    kl_BS = (teacher_logp_BSV.exp() * (teacher_logp_BSV - student_logp_BSV)).sum(dim=-1)
    tokens = loss_mask_BS.sum().clamp(min=1)
    ce = (ce_BS * loss_mask_BS).sum() / tokens
    kl = (kl_BS * loss_mask_BS).sum() / tokens
    objective = (1.0 - coeff) * ce + coeff * temperature**2 * kl
    return objective, ce, kl
