"""Validation loss of one model at many ks: the single code path used by training-time validation,
the evaluation command, the suite and the budget search.

A k spec is an int (every MoE layer at that k) or a list with one k per MoE layer. A point of the
(k, width) grid of a model with slimmable experts is a tuple (k spec, width spec), the width spec a
fraction for every MoE layer or a list with one per layer; a spec without width runs every expert
at full width. Labels: "2", "[1,2,3,4]", "2@0.5", "[1,2,3,4]@[1,0.5,0.5,0.25]" (`parse_spec`
reads them back). The same validation samples are used for every spec, split evenly over
data-parallel ranks; losses are token-weighted means reduced over the data-parallel group,
computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from mmoe_megatron.config.derive import flops_per_token, param_counts
from mmoe_megatron.model import set_point
from mmoe_megatron.training.batches import collate

KSpec = Union[int, list[int]]
WidthSpec = Union[float, list[float], None]
Spec = Union[KSpec, tuple]  # a k spec, or (k spec, width spec)


def split_spec(spec: Spec) -> tuple[KSpec, WidthSpec]:
    """(k spec, width spec or None for full width)."""
    if isinstance(spec, tuple):
        k, width = spec
        full = width is None or (width == 1.0 if isinstance(width, (int, float)) else all(w == 1.0 for w in width))
        return k, (None if full else width)
    return spec, None


def grid_spec(k: KSpec, width: WidthSpec = None) -> Spec:
    """The spec of (k, width); a full-width point is its k spec alone (labels stay as without widths)."""
    return k if split_spec((k, width))[1] is None else (k, width)


def _label(value, fmt) -> str:
    return fmt(value) if isinstance(value, (int, float)) else "[" + ",".join(map(fmt, value)) + "]"


def spec_label(spec: Spec) -> str:
    k, width = split_spec(spec)
    return _label(k, str) + ("" if width is None else "@" + _label(width, lambda w: f"{w:g}"))


def _parse_part(text: str, kind):
    text = text.strip()
    listed = text.startswith("[") or "," in text
    parts = [p for p in text.strip("[]").split(",") if p.strip()]
    if not parts:
        raise ValueError(f"an empty spec {text!r}; write e.g. 2, 1,2,3,4, 2@0.5 or [1,2]@[0.5,1]")
    values = [kind(p) for p in parts]
    return values if listed else values[0]


def parse_spec(text: str) -> Spec:
    """'4' -> 4; '1,2,3,4' or '[1,2,3,4]' -> [1, 2, 3, 4]; '4@0.5' -> (4, 0.5);
    '[1,2]@[0.5,1]' -> ([1, 2], [0.5, 1.0])."""
    k_text, at, width_text = text.partition("@")
    k = _parse_part(k_text, int)
    return grid_spec(k, _parse_part(width_text, float)) if at else k


def mean_k(k: Spec) -> float:
    k = split_spec(k)[0]
    return float(k) if isinstance(k, int) else sum(k) / len(k)


def mean_width(spec: Spec) -> float:
    width = split_spec(spec)[1]
    if width is None:
        return 1.0
    return float(width) if isinstance(width, (int, float)) else sum(width) / len(width)


@dataclass(frozen=True)
class EvalPoint:
    k: KSpec
    loss: float
    tokens: int
    active_params: int
    flops_per_token: float
    width: WidthSpec = None
    """Expert width (fraction, or one per MoE layer); None: full width."""

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def label(self) -> str:
        return spec_label(self.spec)

    @property
    def spec(self) -> Spec:
        return grid_spec(self.k, self.width)

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label, "ppl": self.ppl, "mean_k": mean_k(self.k),
                "mean_width": mean_width(self.spec)}


def eval_indices(num_samples: int, dp_rank: int, dp_size: int) -> list[int]:
    per_rank = num_samples // dp_size
    return list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))


def token_losses(model: torch.nn.Module, dataset, indices: Sequence[int], micro_batch_size: int,
                 mask: Optional[torch.Tensor], device):
    """(float64 loss of every token, the batch) for each micro-batch of `indices`, at the routing the
    model is set to; the caller sets eval mode and no_grad and weights the tokens by the loss mask."""
    for start in range(0, len(indices), micro_batch_size):
        batch = {n: t.to(device) for n, t in collate(dataset, indices[start:start + micro_batch_size]).items()}
        yield model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"]).double(), batch


@torch.no_grad()
def losses_at(
    model: torch.nn.Module,
    dataset,
    ks: Sequence[Spec],
    indices: Sequence[int],
    micro_batch_size: int,
    mask: Optional[torch.Tensor],
    device,
    group=None,
    probe=None,
) -> list[tuple[float, int]]:
    """(mean token loss, tokens) at each spec (k, or (k, width)), over `indices` of `dataset` on this rank and
    reduced over `group`. Leaves the model routing at the last spec; restores train mode.
    A `probe` (analysis.RoutingProbe, entered) is told which spec each forward belongs to."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for k in ks:
            set_point(model, *split_spec(k))
            if probe is not None:
                probe.begin(spec_label(k))
            total = torch.zeros(2, dtype=torch.float64, device=device)
            for per_token, batch in token_losses(model, dataset, indices, micro_batch_size, mask, device):
                total[0] += (per_token * batch["loss_mask"]).sum()
                total[1] += batch["loss_mask"].sum()
            if dist.is_initialized():
                dist.all_reduce(total, group=group)
            out.append((float(total[0] / total[1].clamp(min=1)), int(total[1])))
    finally:
        model.train(was_training)
    return out


def evaluate(
    model, cfg, vocab_size: int, dataset, ks: Sequence[Spec], num_samples: int,
    dp_rank: int = 0, dp_size: int = 1, device="cpu", mask=None, group=None, probe=None,
) -> list[EvalPoint]:
    """EvalPoints (loss, active parameters, FLOPs per token) at each k spec."""
    num_samples = min(num_samples, len(dataset))
    if num_samples < dp_size:
        raise ValueError(f"the validation set has {len(dataset)} samples, fewer than {dp_size} ranks")
    indices = eval_indices(num_samples, dp_rank, dp_size)
    results = losses_at(model, dataset, ks, indices, cfg.train.micro_batch_size, mask, device, group, probe)
    points = []
    for spec, (loss, tokens) in zip(ks, results):
        k, width = split_spec(spec)
        points.append(EvalPoint(k=k, loss=loss, tokens=tokens, width=width,
                                active_params=param_counts(cfg, vocab_size, k, width).active,
                                flops_per_token=flops_per_token(cfg, vocab_size, k, width)))
    return points
