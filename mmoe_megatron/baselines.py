"""Baseline routers trained in the same harness as the Matryoshka router, evaluated the same way.

Both subclass `MatryoshkaRouter` and change only which ranked experts a token uses while
training (`slot_mask`); in evaluation they route to exactly the forced k, like every model here.

TopPRouter   "Harder Tasks Need More Experts" (Huang et al. 2024): each token takes the fewest
             top-ranked experts whose full-softmax probabilities sum to at least p, capped at
             the configured k (the fixed schedule's k).
EMoERouter   EMoE (arXiv 2509.21892) stochastic co-activation sampling: each token draws a pool
             size k~ uniform in [k, pool_k], and uses k experts chosen uniformly at random among
             its top-k~ (compute stays at k). Its sharpening loss -KL(q || uniform) over the full
             softmax q, weighted by `sharpen_coeff`, is attached like megatron's aux losses.
"""

from __future__ import annotations

import math

import torch

from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from mmoe_megatron import compat
from mmoe_megatron.router import MatryoshkaRouter


class TopPRouter(MatryoshkaRouter):
    def __init__(self, config, pg_collection=None, k1_router_grad="straight_through", top_p=0.5,
                 **router_kwargs):
        super().__init__(config, pg_collection, k1_router_grad=k1_router_grad, **router_kwargs)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        self.top_p = top_p

    def uses_exactly_budget(self) -> bool:
        return not self.training

    def slot_mask(self, ranked_TW, ids_TW, budget, scores_TE):
        capped_TW = super().slot_mask(ranked_TW, ids_TW, budget, scores_TE)
        if not self.training:
            return capped_TW
        p_TW = scores_TE.gather(1, ids_TW)
        mass_before_TW = torch.cumsum(p_TW, dim=1) - p_TW
        # The first expert is always taken; then experts while the mass so far is below p.
        return capped_TW & (mass_before_TW < self.top_p)


class EMoERouter(MatryoshkaRouter):
    def __init__(self, config, pg_collection=None, k1_router_grad="straight_through",
                 pool_k=None, sharpen_coeff=0.0, **router_kwargs):
        super().__init__(config, pg_collection, k1_router_grad=k1_router_grad, **router_kwargs)
        if pool_k is None or not 1 <= pool_k <= self.num_experts:
            raise ValueError(f"pool_k must lie in 1..{self.num_experts}, got {pool_k}")
        self.pool_k = pool_k
        self.sharpen_coeff = sharpen_coeff

    def ranking_width(self) -> int:
        return max(self._width, self.pool_k) if self.training else self._width

    def slot_mask(self, ranked_TW, ids_TW, budget, scores_TE):
        if not self.training or not isinstance(budget, int) or budget >= self.pool_k:
            return super().slot_mask(ranked_TW, ids_TW, budget, scores_TE)
        num_tokens, width = ranked_TW.shape
        device = ranked_TW.device
        pool_T = torch.randint(budget, self.pool_k + 1, (num_tokens,), device=device)
        # Random keys; slots outside the token's pool can never be among the k smallest.
        keys_TW = torch.rand(num_tokens, width, device=device)
        slots_W = torch.arange(width, device=device)
        keys_TW = keys_TW.masked_fill(slots_W[None, :] >= pool_T[:, None], float("inf"))
        chosen_TK = torch.topk(keys_TW, k=budget, dim=1, largest=False).indices
        return torch.zeros_like(ranked_TW, dtype=torch.bool).scatter(1, chosen_TK, True)

    def routing(self, logits, padding_mask=None):
        probs_TE, routing_map_TE = super().routing(logits, padding_mask)
        if self.training and torch.is_grad_enabled() and self.sharpen_coeff > 0:
            q_TE = torch.softmax(logits.view(-1, self.num_experts).float(), dim=-1)
            # KL(q || uniform) = sum q log q + log E; the loss rewards sharper routing.
            kl_T = (q_TE * torch.log(q_TE.clamp(min=1e-20))).sum(dim=-1) + math.log(self.num_experts)
            loss = -self.sharpen_coeff * kl_T.mean()
            compat.record_moe_metric("sharpen_loss", loss / self.sharpen_coeff, self.layer_number,
                                     self.config.num_layers)
            probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, loss)
        return probs_TE, routing_map_TE
