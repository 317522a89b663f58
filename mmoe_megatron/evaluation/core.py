"""Validation loss of one model at many ks: the single code path used by training-time validation,
the evaluation command, the suite and the budget search.

A k spec is an int (every MoE layer at that k) or a list with one k per MoE layer. The same
validation samples are used for every spec, split evenly over data-parallel ranks; losses are
token-weighted means reduced over the data-parallel group, computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from mmoe_megatron.config.derive import flops_per_token, param_counts
from mmoe_megatron.model import set_topk
from mmoe_megatron.training.batches import collate

KSpec = Union[int, list[int]]


def spec_label(k: KSpec) -> str:
    return str(k) if isinstance(k, int) else "[" + ",".join(map(str, k)) + "]"


def parse_spec(text: str) -> KSpec:
    """'4' -> 4; '1,2,3,4' or '[1,2,3,4]' -> [1, 2, 3, 4]."""
    text = text.strip().strip("[]")
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("an empty k spec; write e.g. 2 or 1,2,3,4")
    values = [int(p) for p in parts]
    return values[0] if len(values) == 1 and "," not in text else values


def mean_k(k: KSpec) -> float:
    return float(k) if isinstance(k, int) else sum(k) / len(k)


@dataclass(frozen=True)
class EvalPoint:
    k: KSpec
    loss: float
    tokens: int
    active_params: int
    flops_per_token: float

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def label(self) -> str:
        return spec_label(self.k)

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label, "ppl": self.ppl, "mean_k": mean_k(self.k)}


def eval_indices(num_samples: int, dp_rank: int, dp_size: int) -> list[int]:
    per_rank = num_samples // dp_size
    return list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))


@torch.no_grad()
def losses_at(
    model: torch.nn.Module,
    dataset,
    ks: Sequence[KSpec],
    indices: Sequence[int],
    micro_batch_size: int,
    mask: Optional[torch.Tensor],
    device,
    group=None,
    probe=None,
) -> list[tuple[float, int]]:
    """(mean token loss, tokens) at each k spec, over `indices` of `dataset` on this rank and
    reduced over `group`. Leaves the model routing at the last spec; restores train mode.
    A `probe` (analysis.RoutingProbe, entered) is told which spec each forward belongs to."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for k in ks:
            set_topk(model, k)
            if probe is not None:
                probe.begin(spec_label(k))
            total = torch.zeros(2, dtype=torch.float64, device=device)
            for start in range(0, len(indices), micro_batch_size):
                batch = {n: t.to(device) for n, t in collate(dataset, indices[start:start + micro_batch_size]).items()}
                per_token = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
                total[0] += (per_token.double() * batch["loss_mask"]).sum()
                total[1] += batch["loss_mask"].sum()
            if dist.is_initialized():
                dist.all_reduce(total, group=group)
            out.append((float(total[0] / total[1].clamp(min=1)), int(total[1])))
    finally:
        model.train(was_training)
    return out


def evaluate(
    model, cfg, vocab_size: int, dataset, ks: Sequence[KSpec], num_samples: int,
    dp_rank: int = 0, dp_size: int = 1, device="cpu", mask=None, group=None, probe=None,
) -> list[EvalPoint]:
    """EvalPoints (loss, active parameters, FLOPs per token) at each k spec."""
    num_samples = min(num_samples, len(dataset))
    if num_samples < dp_size:
        raise ValueError(f"the validation set has {len(dataset)} samples, fewer than {dp_size} ranks")
    indices = eval_indices(num_samples, dp_rank, dp_size)
    results = losses_at(model, dataset, ks, indices, cfg.train.micro_batch_size, mask, device, group, probe)
    return [
        EvalPoint(k=k, loss=loss, tokens=tokens,
                  active_params=param_counts(cfg, vocab_size, k).active,
                  flops_per_token=flops_per_token(cfg, vocab_size, k))
        for k, (loss, tokens) in zip(ks, results)
    ]
