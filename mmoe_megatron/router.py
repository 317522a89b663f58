"""The Matryoshka router: megatron-core's TopKRouter with a top-k chosen per forward.

It enters the model through the layer spec (`MoESubmodules.router`, see `model.py`) and
overrides only `routing()`. `config.moe_router_topk` stays k_max for the whole run; the k of
the current forward is router state set from outside (`set_k`, `set_token_ks`) by the trainer
from the k schedule, or by the inference API.

Selection is nested by construction: experts are ranked once by score (a sorted top-`width`)
and a token with budget k takes the first k of that ranking, so the experts used at k are a
prefix of those used at k+1. Subclasses change only which ranked slots are active
(`slot_mask`), which is how the top-p and EMoE baselines are built (`baselines.py`).

Shape suffixes: T tokens (seq * batch, megatron's s-major order), E experts,
W ranked slots (the widest k in use), S sequence, B batch.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    get_default_pg_collection,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from mmoe_megatron.serving.layer_ks import floored_log_temperatures, log_k_weights

NORMALISATIONS = ("topk_softmax", "softmax_topk", "nested")


class MatryoshkaRouter(TopKRouter):
    """Top-k routing whose k is a scalar per layer or a tensor of per-token ks.

    Normalisation (from `config.moe_router_pre_softmax`):
      topk_softmax  softmax over the selected logits; weights sum to 1 at every k.
      softmax_topk  softmax over all E experts, then keep the selected; weights sum to < 1
                    and grow with k.
      nested        the weights top-k_max-then-softmax gives the k_max top-ranked experts (k_max
                    the trained maximum), kept for the first k of them, each scaled by its
                    doubling block's learned gate exp(`log_block_gate`[j]) (blocks of ranks
                    1 | 2 | 3-4 | 5-8 | ..., gates 1 at init): a token's weights do not depend on
                    its k, so the output at 2k is the output at k plus the added block's
                    (`nested_weights`), and at k_max with gates 1 it is topk_softmax's.
    Under topk_softmax a token with k = 1 has weight exactly 1, so the LM loss gives its router
    no gradient. With `k1_router_grad="straight_through"` the weight is 1 + (p - stop_grad(p)),
    p the token's full-softmax probability of its expert: the forward is unchanged, and the
    router learns as a Switch Transformer router (weight p) would.

    With `temperature_ks` (the trained ks), the layer learns a log-temperature per trained k,
    `log_temperature` [K], and divides a token's selected logits by its k's temperature before
    the softmax over them (topk_softmax only). The ranking, hence the experts chosen, is
    unchanged; so is the aux loss, which sees the scores at temperature 1. Other ks interpolate
    linearly in log k (`temperature_weights`). With `temperature_floor` > 0 the learned
    log-temperatures are clamped from below at log(floor) (`floored_log_temperatures`), so no k's
    combine sharpens past it; an entry that reaches the floor gets no gradient and stays there.

    With `rank_gates`, the layer learns a log-gate per doubling block of ranks past the first,
    `log_rank_gate` [J - 1] (blocks 2 | 3-4 | 5-8 | ..., `rank_blocks`), added to the selected
    logits of the experts at those ranks (after the temperature) before the softmax over them
    (topk_softmax only): the experts a wider k adds are weighted apart from those it shares with
    a narrower k. The ranking is unchanged, and a k = 1 weight is still 1.

    With `gain_ks` (the trained ks), the layer learns a log-gain per trained k, `log_gain` [K],
    and multiplies a token's combine weights by its k's gain (interpolated as the temperature),
    so at k they sum to the gain: the layer's output can keep its size at a wide k without the
    weights sharpening onto a few experts (topk_softmax only).

    With `gain_channels` the log-gains are one vector per trained k, `log_gain` [K, H], and scale
    the routed experts' combined output channel by channel (`output_gain`, applied by
    `MatryoshkaMoELayer.postprocess`) instead of the combine weights: a part of the layer private
    to each k.

    With `adapter_ks` (the trained ks) and `adapter_rank` r, the layer learns a low-rank linear map
    per trained k, A = `k_adapter_in` [K, r, H] and B = `k_adapter_out` [K, H, r], and adds
    B_k A_k y to the routed experts' combined output y of a token at k (`adapt_output`, applied by
    `MatryoshkaMoELayer.postprocess`; ks between trained ks mix their neighbours' maps with the
    log-k interpolation weights). B starts at zero, so the layer starts as the plain one: a
    private, per-k correction of what the layers after it see.

    With `added_grad_ks`, a training forward marks, for a token routed at one of those ks, its
    experts ranked within the first k // 2 by negating their weights (`mark_prefix_rows`); the experts
    (`slimmable.py`) use the magnitude and give those rows' outputs no gradient, so a token trains
    only the experts that its k added to the prefix served at k // 2: they fit what the prefix
    misses, as the stages of boosting do. The router's gradient and every value are unchanged.
    A sign is exact in any dtype and rides through the dispatchers with the weights.

    Route logging and replay, to compare two copies of a model (another dtype or layer spec) on
    the same experts: with `route_log` a list, every forward appends its ranked expert ids [T, W];
    with `route_replay` a list of such ids (another copy's log), every forward ranks the next
    entry's experts instead of its own, gathering its own scores for them (so its weights, ks and
    widths are still its own), and ranks its own best experts after them where it needs more. In
    bf16 a near-tied ranking flips, which changes the token's output and, through attention, every
    later token's; replay keeps such flips out of an arithmetic comparison. megatron-core's own
    router replay (`moe_enable_routing_replay`) is not supported.
    """

    def __init__(self, config, pg_collection=None, k1_router_grad: str = "straight_through",
                 temperature_ks: Optional[Sequence[int]] = None, added_grad_ks: Sequence[int] = (),
                 nested: bool = False, temperature_floor: float = 0.0,
                 gain_ks: Optional[Sequence[int]] = None, gain_channels: bool = False,
                 adapter_ks: Optional[Sequence[int]] = None, adapter_rank: int = 0,
                 rank_gates: bool = False, **router_kwargs):
        # router_kwargs: what megatron-core hands a router builder beyond config and process
        # groups (0.19.2: is_mtp_layer, moe_layer.py:259); passed on unchanged.
        super().__init__(config=config, pg_collection=pg_collection, **router_kwargs)
        if self.score_function != "softmax" or self.routing_type not in ("aux_loss", "none"):
            raise ValueError(
                "MatryoshkaRouter supports softmax scores with the 'aux_loss' or 'none' "
                f"load balancing; got {self.score_function!r} / {self.routing_type!r}"
            )
        if config.moe_router_num_groups or self.enable_expert_bias or self.router_replay:
            raise ValueError("group-limited routing, expert bias and router replay are not supported")
        if config.moe_pad_expert_input_to_capacity:
            raise ValueError(
                "pad-to-capacity sizes buffers from the build-time top-k; with an elastic k use a "
                "capacity factor without padding"
            )
        if k1_router_grad not in ("straight_through", "none"):
            raise ValueError(f"k1_router_grad must be straight_through or none, not {k1_router_grad!r}")
        self.k1_router_grad = k1_router_grad
        self.temperature_ks = tuple(temperature_ks) if temperature_ks else None
        self.gain_ks = tuple(gain_ks) if gain_ks else None
        per_k = self.temperature_ks or self.gain_ks
        if self.temperature_ks and self.gain_ks and self.temperature_ks != self.gain_ks:
            raise ValueError(f"temperatures and gains are learned at the trained ks: {self.temperature_ks} "
                             f"against {self.gain_ks}")
        if per_k is not None:
            if config.moe_router_pre_softmax:
                raise ValueError("a temperature or gain per k weights the selected logits' softmax: use topk_softmax")
        self.adapter_ks = tuple(adapter_ks) if adapter_rank else None
        if self.adapter_ks is not None and per_k is not None and self.adapter_ks != per_k:
            raise ValueError(f"the adapters are learned at the trained ks: {self.adapter_ks} against {per_k}")
        if per_k is not None or self.adapter_ks is not None:
            weights_KE = temperature_weights(per_k or self.adapter_ks, self.num_experts)
            # Row k (0..E) of the interpolation matrix, [E + 1, K]; row 0 is unused.
            self.register_buffer("log_k_weights_EK", weights_KE.t().contiguous(), persistent=False)
        if self.adapter_ks is not None:
            if not 0 < adapter_rank <= config.hidden_size:
                raise ValueError(f"adapter rank {adapter_rank} must lie in 1 ... hidden_size ({config.hidden_size})")
            K, H = len(self.adapter_ks), config.hidden_size
            # Initialised by name (model.init_weights): in from the normal init, out zeros.
            self.k_adapter_in = torch.nn.Parameter(torch.zeros(K, adapter_rank, H, dtype=config.params_dtype))
            self.k_adapter_out = torch.nn.Parameter(torch.zeros(K, H, adapter_rank, dtype=config.params_dtype))
            for param in (self.k_adapter_in, self.k_adapter_out):
                setattr(param, "sequence_parallel", config.sequence_parallel)
        if self.gain_ks is not None:
            if nested:
                raise ValueError("the nested combine learns its own gates per block of ranks: not with a gain per k")
            shape = (len(self.gain_ks), config.hidden_size) if gain_channels else (len(self.gain_ks),)
            self.log_gain = torch.nn.Parameter(torch.zeros(shape, dtype=config.params_dtype))
            setattr(self.log_gain, "sequence_parallel", config.sequence_parallel)
        if self.temperature_ks is not None:
            self.log_temperature = torch.nn.Parameter(
                torch.zeros(len(self.temperature_ks), dtype=config.params_dtype)
            )
            setattr(self.log_temperature, "sequence_parallel", config.sequence_parallel)
        elif temperature_floor:
            raise ValueError("a temperature floor bounds the learned temperatures: pass temperature_ks")
        self.temperature_floor = temperature_floor
        if gain_channels and self.gain_ks is None:
            raise ValueError("gains per channel are learned at the trained ks: pass gain_ks")
        self.gain_channels = gain_channels
        # The leading ranks whose experts a token routed at k does not train: k // 2 at the
        # added_grad_ks, 0 elsewhere (indexed by k, 0..E).
        added = set(added_grad_ks)
        self.untrained_prefix = tuple(k // 2 if k in added else 0 for k in range(self.num_experts + 1))
        self.register_buffer("untrained_prefix_E", torch.tensor(self.untrained_prefix), persistent=False)
        self.pre_softmax = config.moe_router_pre_softmax
        self.nested = nested
        if nested:
            if self.pre_softmax or self.temperature_ks is not None:
                raise ValueError("the nested combine weights the k_max top logits itself: not with "
                                 "softmax_topk or a temperature per k")
            self.log_block_gate = torch.nn.Parameter(
                torch.zeros(len(rank_blocks(self.num_experts)), dtype=config.params_dtype)
            )
            setattr(self.log_block_gate, "sequence_parallel", config.sequence_parallel)
        self.rank_gates = rank_gates
        if rank_gates:
            if self.pre_softmax or nested:
                raise ValueError("gates per block of ranks weight the selected logits' softmax: use topk_softmax")
            # One per block past the first (rank 1's gate is the reference the softmax leaves free).
            self.log_rank_gate = torch.nn.Parameter(
                torch.zeros(len(rank_blocks(self.num_experts)) - 1, dtype=config.params_dtype)
            )
            setattr(self.log_rank_gate, "sequence_parallel", config.sequence_parallel)
        self.k_max_trained = config.moe_router_topk
        self.route_log: Optional[list] = None
        self.route_replay: Optional[list] = None
        self._k: int = config.moe_router_topk
        self._token_ks_SB: Optional[torch.Tensor] = None
        self._width: int = config.moe_router_topk
        # Experts routed by the last forward, when it is known on the host without a sync.
        self.num_routed_host: Optional[int] = None
        # What the last forward used: an int, or the per-token ks (for the sync check, logging).
        self.last_k: Union[int, torch.Tensor, None] = None
        # Optional observer called with (router probabilities [T, E], routing map [T, E]) on
        # every forward; used by the expert-ranking analysis, None otherwise.
        self.probe = None
        # Tokens routed to each expert by training forwards since the last reset (logging).
        # An integer buffer: DeepSpeed's bf16 cast leaves it exact.
        self.register_buffer(
            "token_counts_E", torch.zeros(self.num_experts, dtype=torch.long), persistent=False
        )

    # --- the k of the next forwards --------------------------------------------------------

    def set_k(self, k: int) -> None:
        """Route every token to its top-`k` experts until told otherwise."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_experts:
            raise ValueError(f"k must be an int in 1..{self.num_experts} (the experts), got {k!r}")
        self._k, self._token_ks_SB, self._width = k, None, k

    def set_token_ks(self, ks_SB: torch.Tensor, width: Optional[int] = None) -> None:
        """Per-token ks for the next micro-batch: int tensor [seq, batch] (full sequence).

        `width` is an upper bound on the ks (the schedule's k_max); passing it avoids reading
        the tensor's maximum back from the device.
        """
        if ks_SB.dim() != 2:
            raise ValueError(f"per-token ks must be [seq, batch], got shape {tuple(ks_SB.shape)}")
        width = int(ks_SB.max()) if width is None else width
        if not 1 <= width <= self.num_experts:
            raise ValueError(f"per-token ks must lie in 1..{self.num_experts}, got width {width}")
        self._k, self._token_ks_SB, self._width = None, ks_SB, width

    @property
    def k(self) -> Optional[int]:
        """The scalar k in force, or None while per-token ks are set."""
        return self._k

    def _token_budget(self, seq_len: int, batch: int, device) -> Union[int, torch.Tensor]:
        if self._token_ks_SB is None:
            return self._k
        ks_SB = self._token_ks_SB
        if self.config.sequence_parallel and self.tp_group.size() > 1:
            # Under sequence parallelism this rank routes one contiguous chunk of the sequence.
            rank = self.tp_group.rank()
            ks_SB = ks_SB[rank * seq_len : (rank + 1) * seq_len]
        if tuple(ks_SB.shape) != (seq_len, batch):
            raise ValueError(
                f"per-token ks have shape {tuple(ks_SB.shape)} but the router sees "
                f"[{seq_len}, {batch}] tokens; set them for each micro-batch"
            )
        return ks_SB.reshape(-1).to(device)

    # --- routing ---------------------------------------------------------------------------

    def ranking_width(self) -> int:
        """How many top-ranked experts to sort per token (the widest budget in use; under the
        nested combine at least k_max, whose logits normalise every k's weights)."""
        return max(self._width, self.k_max_trained) if self.nested else self._width

    def slot_mask(
        self, ranked_TW: torch.Tensor, ids_TW: torch.Tensor, budget: Union[int, torch.Tensor],
        scores_TE: torch.Tensor,
    ) -> torch.Tensor:
        """Which of the W ranked experts each token uses: the first k (Matryoshka nesting)."""
        return leading_slots(ranked_TW, budget)

    def _rank(self, ranked_by_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranking_width() best experts of every token, best first, and their scores: this
        forward's own, or under `route_replay` the next logged ranking's (then the token's own
        best experts outside it, where more are needed)."""
        width = self.ranking_width()
        if self.route_replay is not None:
            if not self.route_replay:
                raise RuntimeError("route_replay ran out: this copy ran more forwards than the one logged")
            ids_TW = self.route_replay.pop(0).to(ranked_by_TE.device)
            if ids_TW.shape[0] != ranked_by_TE.shape[0]:
                raise ValueError(f"route_replay holds {ids_TW.shape[0]} tokens' ranking, this forward has "
                                 f"{ranked_by_TE.shape[0]}")
            if width > ids_TW.shape[1]:
                own_TE = torch.argsort(ranked_by_TE, dim=1, descending=True)
                new_TE = ~(own_TE.unsqueeze(2) == ids_TW.unsqueeze(1)).any(dim=2)
                rest = own_TE.masked_select(new_TE).view(ids_TW.shape[0], -1)
                ids_TW = torch.cat([ids_TW, rest], dim=1)
            ids_TW = ids_TW[:, :width]
            ranked_TW = ranked_by_TE.gather(1, ids_TW)
        else:
            ranked_TW, ids_TW = torch.topk(ranked_by_TE, k=width, dim=1, sorted=True)
        if self.route_log is not None:
            self.route_log.append(ids_TW.detach())
        return ranked_TW, ids_TW

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if padding_mask is not None:
            raise NotImplementedError("padded batches are not used in pretraining; pack sequences")
        seq_len, batch = logits.shape[:2]
        logits_TE = logits.view(-1, self.num_experts)
        logits_TE = self.apply_z_loss(logits_TE)
        budget = self._token_budget(seq_len, batch, logits.device)

        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        ranked_by_TE = scores_TE if self.pre_softmax else logits_TE
        ranked_TW, ids_TW = self._rank(ranked_by_TE)
        active_TW = self.slot_mask(ranked_TW, ids_TW, budget, scores_TE)

        if self.pre_softmax:
            probs_TW = (ranked_TW * active_TW).type_as(logits_TE)
        else:
            if self.temperature_ks is not None:
                ranked_TW = ranked_TW * self._inverse_temperature(budget, ranked_TW.device)
            if self.rank_gates:
                ranked_TW = ranked_TW.float() + rank_log_gates(self.log_rank_gate, ranked_TW.shape[1],
                                                               ranked_TW.device)
            if self.nested:
                probs_TW = nested_weights(ranked_TW, active_TW, self.log_block_gate, self.k_max_trained)
                probs_TW = probs_TW.type_as(logits_TE)
            else:
                masked_TW = ranked_TW.masked_fill(~active_TW, float("-inf"))
                probs_TW = torch.softmax(masked_TW, dim=-1, dtype=torch.float32).type_as(logits_TE)
            # Under the nested combine a k = 1 weight depends on the router already.
            if self.k1_router_grad == "straight_through" and self.training and not self.nested:
                probs_TW = self._straight_through_k1(probs_TW, active_TW, scores_TE, ids_TW)
            if self.gain_ks is not None and not self.gain_channels:
                probs_TW = (probs_TW * self._per_k(self.log_gain, budget, probs_TW.device)).type_as(logits_TE)

        probs_TE = torch.zeros_like(logits_TE).scatter(1, ids_TW, probs_TW)
        routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, ids_TW, active_TW)
        selected_TE = routing_map_TE

        mean_k = budget if isinstance(budget, int) and self.uses_exactly_budget() else None
        if self.config.moe_expert_capacity_factor is not None:
            k_for_capacity = mean_k if mean_k is not None else float(active_TW.sum(dim=1).float().mean())
            probs_TE, routing_map_TE = apply_router_token_dropping(
                probs_TE,
                routing_map_TE,
                router_topk=k_for_capacity,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
            )
            self.num_routed_host = None
        else:
            self.num_routed_host = logits_TE.shape[0] * mean_k if mean_k is not None else None

        if self.training and torch.is_grad_enabled():
            # Under activation recompute the first forward runs without grad: count once.
            self.token_counts_E += routing_map_TE.sum(dim=0).to(self.token_counts_E.device)
            if self.is_aux_loss_enabled():
                probs_TE = self._apply_elastic_aux_loss(probs_TE, scores_TE, selected_TE)

        if any(self.untrained_prefix) and self.training and torch.is_grad_enabled():
            prefix = self.untrained_prefix[budget] if isinstance(budget, int) else self.untrained_prefix_E[budget]
            probs_TE = mark_prefix_rows(probs_TE, ids_TW, prefix)
        if self.probe is not None:
            self.probe(scores_TE, routing_map_TE)
        self.last_k = budget
        return probs_TE, routing_map_TE

    def _inverse_temperature(self, budget: Union[int, torch.Tensor], device) -> torch.Tensor:
        """1 / T(k) for a scalar k ([1]) or per token ([T, 1])."""
        log_t_K = floored_log_temperatures(self.log_temperature.float().to(device), self.temperature_floor)
        return self._per_k(-log_t_K, budget, device)

    def _per_k(self, log_K: torch.Tensor, budget: Union[int, torch.Tensor], device) -> torch.Tensor:
        """exp of a per-trained-k log-quantity ([K], or [K, C] for C values per k) at k,
        interpolated in log k: [C] for a scalar k, [T, C] per token (C = 1 for [K])."""
        # fp32 whatever the model's dtype (a bf16 model's buffers are cast with it).
        weights_EK = self.log_k_weights_EK.to(device=device, dtype=torch.float32)
        log_KC = log_K.float().to(device).reshape(log_K.shape[0], -1)
        return torch.exp(weights_EK[budget] @ log_KC)

    def output_gain(self, budget: Union[int, torch.Tensor], device) -> torch.Tensor:
        """Under `gain_channels`, the gain of every output channel at k: [H] for a scalar k, [T, H]
        per token (the log-gains interpolated in log k, as the temperatures)."""
        return self._per_k(self.log_gain, budget, device)

    def adapt_output(self, output_TH: torch.Tensor, budget: Union[int, torch.Tensor]) -> torch.Tensor:
        """Under adapters: the routed output plus each token's k's low-rank correction, [T, H]
        (`budget` the k of all tokens, or one per token)."""
        weights_K = self.log_k_weights_EK.to(output_TH.device)[budget].to(output_TH.dtype)
        weights = weights_K.unsqueeze(-1)  # [K, 1] for a scalar k, [T, K, 1] per token
        low_TKR = torch.einsum("th,krh->tkr", output_TH, self.k_adapter_in) * weights
        return output_TH + torch.einsum("tkr,khr->th", low_TKR, self.k_adapter_out)

    def gain(self, k: int) -> float:
        """The gain this layer's combine weights sum to at k (1.0 without learned gains); under
        `gain_channels` the geometric mean of the channels' gains."""
        if self.gain_ks is None:
            return 1.0
        log_gain = self.log_gain.mean(dim=1) if self.gain_channels else self.log_gain
        return float(self._per_k(log_gain, k, self.log_gain.device).detach())

    def temperature(self, k: int) -> float:
        """The temperature this layer applies at k (1.0 without learned temperatures)."""
        if self.temperature_ks is None:
            return 1.0
        return float(1.0 / self._inverse_temperature(k, self.log_temperature.device).detach())

    def uses_exactly_budget(self) -> bool:
        """True when every token routes to exactly `budget` experts (known on the host)."""
        return True

    def _straight_through_k1(self, probs_TW, active_TW, scores_TE, ids_TW):
        single_T = active_TW.sum(dim=1) == 1
        p_T = scores_TE.gather(1, ids_TW[:, :1]).squeeze(1)
        # (p - stop_grad(p)) is exactly 0 in value, so the weight stays exactly 1.
        st_T = (1.0 + (p_T - p_T.detach())).type_as(probs_TW)
        first_TW = torch.where(single_T, st_T, probs_TW[:, 0]).unsqueeze(1)
        return torch.cat([first_TW, probs_TW[:, 1:]], dim=1)

    def _apply_elastic_aux_loss(self, probs_TE, scores_TE, selected_TE):
        """Switch load-balancing loss with the realised routing (ks may differ per token).

        megatron normalises the dispatch fraction by T * topk; with per-token ks the same
        normalisation is by the number of assignments, i.e. topk := mean k over the tokens.
        At perfect balance the loss is `coeff` at any k.
        """
        coeff = self.get_aux_loss_coeff("aux_loss")
        tokens_per_expert_E = reduce_from_tensor_model_parallel_region(
            selected_TE.sum(dim=0).float(), self.tp_cp_group
        )
        num_tokens = selected_TE.shape[0]
        total_tokens = num_tokens * self.tp_cp_group.size()
        mean_k = tokens_per_expert_E.sum() / total_tokens
        aux_loss = switch_load_balancing_loss_func(
            probs=scores_TE,
            tokens_per_expert=tokens_per_expert_E,
            total_num_tokens=total_tokens,
            topk=mean_k,
            num_experts=self.num_experts,
            moe_aux_loss_coeff=coeff,
        )
        return self.attach_and_log_load_balancing_loss(
            probs_TE, coeff, aux_loss, "load_balancing_loss", self.tp_cp_group,
            valid_token_count=num_tokens,
        )


def leading_slots(ranked_TW: torch.Tensor, count: Union[int, torch.Tensor]) -> torch.Tensor:
    """[T, W] bool: each token's first `count` ranked slots (one count for all tokens, or one per
    token [T])."""
    slots_W = torch.arange(ranked_TW.shape[1], device=ranked_TW.device)
    if isinstance(count, int):
        return (slots_W < count).expand_as(ranked_TW)
    return slots_W[None, :] < count[:, None]


def rank_blocks(width: int) -> list[tuple[int, int]]:
    """The nested combine's blocks of ranked slots, [start, stop) up to `width`: (0, 1), (1, 2),
    (2, 4), (4, 8), ... (the ranks a doubling k adds), the last one cut at `width`."""
    blocks, start = [], 0
    while start < width:
        stop = min(max(1, 2 * start), width)
        blocks.append((start, stop))
        start = stop
    return blocks


def rank_log_gates(log_gate_J: torch.Tensor, width: int, device) -> torch.Tensor:
    """[width] fp32: 0 at rank 1 and log_gate_J[j - 1] at the ranks of block j >= 1 of
    `rank_blocks` (the rank gates' logits offsets, best rank first)."""
    return per_rank(torch.cat([log_gate_J.new_zeros(1), log_gate_J]).float().to(device), width)


def per_rank(value_J: torch.Tensor, width: int) -> torch.Tensor:
    """[width]: each block j of `rank_blocks(width)` filled with value_J[j]."""
    return torch.cat([value_J[j].expand(b - a) for j, (a, b) in enumerate(rank_blocks(width))])


def nested_weights(ranked_TW: torch.Tensor, active_TW: torch.Tensor, log_gate_J: torch.Tensor,
                   k_max: int) -> torch.Tensor:
    """[T, W] fp32 combine weights of the nested combine (W >= k_max ranked logits, best first):
    exp(logit_r) / sum of exp over the first k_max ranks, times the gate exp(log_gate_J[j]) of
    the rank's block j in `rank_blocks`; 0 in inactive slots."""
    logits_TW = ranked_TW.float()
    log_norm_T1 = torch.logsumexp(logits_TW[:, :k_max], dim=1, keepdim=True)
    gate_J = log_gate_J.float().to(ranked_TW.device)
    log_gate_W = per_rank(gate_J, ranked_TW.shape[1])
    return torch.exp(logits_TW - log_norm_T1 + log_gate_W) * active_TW


def mark_prefix_rows(probs_TE: torch.Tensor, ids_TW: torch.Tensor, prefix: Union[int, torch.Tensor]):
    """The weights with those of each token's `prefix` top-ranked experts negated (`ids_TW`: the
    experts by rank; `prefix`: one count for all tokens or one per token [T])."""
    prefix_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter(1, ids_TW, leading_slots(ids_TW, prefix))
    return torch.where(prefix_TE, -probs_TE, probs_TE)


def temperature_weights(ks: Sequence[int], max_k: int) -> torch.Tensor:
    """[K, max_k + 1]: column k holds the weights of the trained ks' log-temperatures whose sum is
    the log-temperature at k (`log_k_weights`: linear in log k between neighbouring trained ks,
    constant beyond the ends; serving engines apply the same rule). Column 0 is zero (no k)."""
    weights_KE = torch.zeros(len(ks), max_k + 1)
    for k in range(1, max_k + 1):
        for i, w in log_k_weights(ks, k):
            weights_KE[i, k] = w
    return weights_KE


class ElasticAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """The alltoall dispatcher with its output size taken from the realised routing.

    megatron-core sizes the dropless permutation buffer as tokens * config.moe_router_topk
    (token_dispatcher.py:524 in 0.16.1, :550 in 0.19.2); that is k_max here. The count only
    matters for fused permutation (Transformer Engine), but must then be exact.
    """

    num_out_tokens_hint: Optional[int] = None

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        tokens_per_expert = super().preprocess(routing_map)
        dropless_static = not (
            self.drop_and_pad
            or self.config.moe_expert_capacity_factor is not None
            or self.config.moe_router_padding_for_quantization
        )
        if dropless_static:
            if self.num_out_tokens_hint is not None:
                self.num_out_tokens = self.num_out_tokens_hint
            else:  # per-token ks: count on the device, read back before permutation
                self.num_out_tokens = routing_map.sum()
                self._maybe_update_cuda_sync_point("before_permutation_1")
        return tokens_per_expert


class MatryoshkaMoELayer(MoELayer):
    """megatron-core's MoELayer with the elastic alltoall dispatcher (allgather is k-agnostic).

    With slimmable experts holding per-token widths (`slimmable.py`), each token's width level
    rides through the dispatcher as one extra hidden column [S, B, H + 1]: the dispatchers move
    rows of any width, so the level reaches the expert rank with its token, under expert
    parallelism and either dispatcher, at no extra collective. The experts return a zero column in
    its place, which `postprocess` drops after the combine.
    """

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **layer_kwargs):
        # layer_kwargs: what megatron-core's transformer layer hands its MLP builder beyond these
        # (0.19.2: is_mtp_layer and name, transformer_layer.py:433-437); passed on unchanged.
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection,
                         **layer_kwargs)
        if config.moe_token_dispatcher_type == "alltoall":
            self.token_dispatcher = ElasticAlltoAllTokenDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection,
            )
        elif config.moe_token_dispatcher_type != "allgather":
            raise ValueError(
                f"dispatcher {config.moe_token_dispatcher_type!r} fixes k at build time; "
                "use alltoall or allgather with an elastic k"
            )

    def preprocess(self, hidden_states, probs, routing_map):
        if isinstance(self.token_dispatcher, ElasticAlltoAllTokenDispatcher):
            self.token_dispatcher.num_out_tokens_hint = self.router.num_routed_host
        if getattr(self.experts, "carries_levels", False):
            seq_len, batch = hidden_states.shape[:2]
            sp_rank = self.tp_group.rank() if self.config.sequence_parallel and self.tp_group.size() > 1 else None
            levels_SB = self.experts.levels_for(seq_len, batch, sp_rank).to(hidden_states.device)
            # Small integers (the level, 1..len(widths)) are exact in any float dtype.
            hidden_states = torch.cat([hidden_states, levels_SB.unsqueeze(-1).to(hidden_states.dtype)], dim=-1)
        return super().preprocess(hidden_states, probs, routing_map)

    def postprocess(self, output, shared_expert_output):
        levels = getattr(self.experts, "carries_levels", False)
        gained = getattr(self.router, "gain_channels", False)
        adapted = getattr(self.router, "adapter_ks", None) is not None
        if not levels and not gained and not adapted:
            return super().postprocess(output, shared_expert_output)
        output = super().postprocess(output, None)
        if levels:
            output = output[..., :-1].contiguous()
        if gained:
            # The k of every token this layer routed (the router's last forward), in its order.
            gain = self.router.output_gain(self.router.last_k, output.device)
            output = (output.view(-1, output.shape[-1]) * gain).view_as(output).type_as(output)
        if adapted:
            output = self.router.adapt_output(output.view(-1, output.shape[-1]), self.router.last_k).view_as(output)
        return output if shared_expert_output is None else output + shared_expert_output
