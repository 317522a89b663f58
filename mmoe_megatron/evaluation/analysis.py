"""Expert-ranking analysis: does each layer rank experts the same way whatever k the model runs at,
and how do tokens spread over the experts at each k?

A layer's router scores depend on k only through the layers before it (the first MoE layer's
ranking is the same at every k by construction). For each layer and k the analysis reports:

- `spearman`: the mean over tokens of the Spearman rank correlation between the token's expert
  scores at that k and at the reference k (the largest uniform k evaluated);
- `top1_agreement`: how often the token's first-ranked expert is the same as at the reference k;
- `share`: the fraction of routed token slots each expert received, and its normalised entropy
  (1 = perfectly even, 0 = every token on one expert) and largest share; `routed_slots` is the
  number of (token, expert) pairs routed, tokens x k for a uniform k.

It observes the evaluation's own forwards through the routers' `probe`, so it costs no extra pass.
Token-level scores are kept for the first `max_tokens` tokens per layer on each rank.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mmoe_megatron.model import elastic_routers


def spearman_rows(a_TE: torch.Tensor, b_TE: torch.Tensor) -> torch.Tensor:
    """Spearman correlation between matching rows of two score matrices (ties broken by index)."""
    def ranks(x):
        return x.argsort(dim=1).argsort(dim=1).double()

    ra, rb = ranks(a_TE), ranks(b_TE)
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp(min=1e-12)


class RoutingProbe:
    """Collects router scores and routed-token counts per MoE layer, per evaluated k."""

    def __init__(self, model: torch.nn.Module, max_tokens: int = 8192):
        self.routers = elastic_routers(model)
        self.max_tokens = max_tokens
        self.label: Optional[str] = None
        self.scores: dict[str, list[list[torch.Tensor]]] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def __enter__(self):
        for i, router in enumerate(self.routers):
            router.probe = self._observer(i)
        return self

    def __exit__(self, *exc):
        for router in self.routers:
            router.probe = None

    def begin(self, label: str) -> None:
        self.label = label
        self.scores[label] = [[] for _ in self.routers]
        self.counts[label] = torch.zeros(len(self.routers), self.routers[0].num_experts, dtype=torch.float64)

    def _observer(self, layer: int):
        def observe(scores_TE: torch.Tensor, routing_map_TE: torch.Tensor) -> None:
            if self.label is None:
                return
            self.counts[self.label][layer] += routing_map_TE.sum(dim=0).double().cpu()
            kept = self.scores[self.label][layer]
            have = sum(t.shape[0] for t in kept)
            if have < self.max_tokens:
                kept.append(scores_TE[: self.max_tokens - have].detach().float().cpu())
        return observe

    def summary(self, reference: str, group=None) -> dict:
        """Per k label: per-layer spearman, top-1 agreement, expert shares, entropy, max share."""
        ref = [torch.cat(s) if s else None for s in self.scores[reference]]
        out = {}
        for label, per_layer in self.scores.items():
            # [layers, 3]: sum of spearman, sum of top-1 agreement, tokens (reduced over ranks).
            sums = torch.zeros(len(self.routers), 3, dtype=torch.float64)
            for i, chunks in enumerate(per_layer):
                if not chunks or ref[i] is None:
                    continue
                scores = torch.cat(chunks)
                n = min(scores.shape[0], ref[i].shape[0])
                sums[i, 0] = spearman_rows(scores[:n], ref[i][:n]).sum()
                sums[i, 1] = (scores[:n].argmax(dim=1) == ref[i][:n].argmax(dim=1)).double().sum()
                sums[i, 2] = n
            counts = self.counts[label].clone()
            if dist.is_initialized():
                dist.all_reduce(sums, group=group)
                dist.all_reduce(counts, group=group)
            share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
            num_experts = share.shape[1]
            entropy = -(share * share.clamp(min=1e-30).log()).sum(dim=1) / math.log(num_experts)
            tokens = sums[:, 2].clamp(min=1)
            out[label] = {
                "spearman": (sums[:, 0] / tokens).tolist(),
                "top1_agreement": (sums[:, 1] / tokens).tolist(),
                "share": share.tolist(),
                "entropy": entropy.tolist(),
                "max_share": share.max(dim=1).values.tolist(),
                "routed_slots": counts.sum(dim=1).tolist(),
            }
        return out


def reference_label(labels: Sequence) -> Optional[str]:
    """The largest uniform k among the evaluated specs (as its label), or None."""
    uniform = [k for k in labels if isinstance(k, int)]
    return str(max(uniform)) if uniform else None


def markdown(summary: dict, reference: str) -> str:
    if not summary:
        return ""
    layers = len(next(iter(summary.values()))["spearman"])
    head = " | ".join(f"L{i + 1}" for i in range(layers))
    lines = [
        f"### Expert ranking across k (reference k = {reference})", "",
        "Spearman rank correlation of each token's expert scores with those at the reference k, "
        "mean over tokens, per MoE layer; then the normalised entropy of the expert token shares "
        "(1 = even).", "",
        f"| k | spearman {head} | top-1 agreement (mean) | share entropy {head} | max share (mean) |",
        "|---|" + "---:|" * (2 * layers + 2),
    ]
    for label, s in summary.items():
        lines.append(
            f"| {label} | " + " | ".join(f"{v:.3f}" for v in s["spearman"]) + " | "
            + f"{sum(s['top1_agreement']) / layers:.3f} | "
            + " | ".join(f"{v:.3f}" for v in s["entropy"]) + " | "
            + f"{sum(s['max_share']) / layers:.3f} |"
        )
    return "\n".join(lines) + "\n"
