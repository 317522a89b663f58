"""Slimmable experts: every expert can run at a width fraction w of its FFN (MoSE, arXiv 2602.06154).

At width w an expert of hidden width I uses the first c = w x I columns of its SwiGLU: rows [0, c)
of the gate half and rows [I, I + c) of the up half of linear_fc1's weight [2I, H], and columns
[0, c) of linear_fc2's weight [H, I]. The narrower experts are prefixes of the wider ones, so one
set of weights serves every width, and the parameters of an expert at width w are exactly those
of a dense SwiGLU FFN of width c built from these slices.

The modules enter the model through megatron-core's layer spec (`MoESubmodules.experts`, see
`model.py`) and keep megatron-core's parameter names, so checkpoints, expert parallelism and export
treat them like the stock experts:

  SlimmableSequentialMLP   megatron's SequentialMLP (the local path, tested on CPU)
  SlimmableTEGroupedMLP    megatron's TEGroupedMLP (grouped GEMM with Transformer Engine, GPU);
                           narrower widths run the full grouped GEMMs with the columns beyond each
                           token's width zeroed, which gives the same values and the same (zero)
                           gradients outside the slice; the GPU check (bench/gpu_check_runs.py)
                           compares it with the local path at a mixed (k, width) draw.

The width is router-like state set from outside, per forward: one width for all tokens
(`set_width`), or a width level per token (`set_token_levels`, levels index `widths`, 1-based).
At full width the stock forward runs unchanged, so a model whose experts are all at width 1 is
bit for bit the model without this axis. Per-token levels travel with their tokens through the
dispatcher as one extra hidden column that `MatryoshkaMoELayer` appends before dispatch and removes
after combine (`router.py`); the experts read it, compute, and return a zero column in its place.

With `added_expert_grad` (the router's option of that name, `router.py`), rows whose weight the
router negated keep their value but give their expert no gradient: the experts run on the weights'
magnitudes and `stop_marked_rows` cuts the rest of the gradient from those rows' outputs.

Shape suffixes: N dispatched (token, expert) rows, H hidden size, I expert FFN width,
C active columns, S sequence, B batch, E local experts.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP


def width_columns(width: float, ffn_hidden_size: int) -> int:
    """The columns an expert of `ffn_hidden_size` uses at `width`; a ValueError unless whole."""
    columns = width * ffn_hidden_size
    if not 0 < width <= 1 or abs(columns - round(columns)) > 1e-6:
        raise ValueError(
            f"width {width!r} of an expert with {ffn_hidden_size} columns is {columns:g} columns; "
            f"use a fraction in (0, 1] that is a multiple of 1/{ffn_hidden_size}"
        )
    return int(round(columns))


class _WidthState:
    """The width of the next forwards and the marked rows (`forward`): shared by the local and the
    grouped experts."""

    def _init_width_state(self, widths: Sequence[float], ffn_hidden_size: int,
                          added_expert_grad: bool) -> None:
        self.added_expert_grad = added_expert_grad
        self.widths = tuple(float(w) for w in widths)
        self.ffn_hidden_size = ffn_hidden_size
        # Columns of each level (1-based levels; index 0 unused so levels index directly).
        self.level_columns = (0,) + tuple(width_columns(w, ffn_hidden_size) for w in self.widths)
        self.columns = ffn_hidden_size
        self.token_levels_SB: Optional[torch.Tensor] = None
        # What the last forward used: a width (float) or the per-token levels (sync check).
        self.last_width = None

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs, **buffers):
        if not self.added_expert_grad:
            return self._forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs, **buffers)
        if buffers:
            raise ValueError(f"added_expert_grad does not write into the dispatcher's zero-copy buffers "
                             f"({sorted(buffers)}); use the alltoall or allgather dispatcher")
        marked_N = torch.signbit(permuted_probs)
        probs_N = permuted_probs.abs()
        output_NH, bias = self._forward(permuted_local_hidden_states, tokens_per_expert, probs_N)
        return stop_marked_rows(output_NH, probs_N, marked_N), bias

    def set_width(self, width: float) -> None:
        """Run every token at `width` (any whole-column fraction, not only the trained ones)."""
        self.columns = width_columns(float(width), self.ffn_hidden_size)
        if self.columns < self.ffn_hidden_size:
            _check_plain_swiglu(self.config)
        self.token_levels_SB = None

    def set_token_levels(self, levels_SB: torch.Tensor) -> None:
        """Per-token width levels for the next micro-batch: int tensor [seq, batch], 1..len(widths)."""
        if levels_SB.dim() != 2:
            raise ValueError(f"per-token width levels must be [seq, batch], got {tuple(levels_SB.shape)}")
        _check_plain_swiglu(self.config)
        self.token_levels_SB = levels_SB

    @property
    def width(self) -> Optional[float]:
        """The width in force for every token, or None while per-token levels are set."""
        return None if self.token_levels_SB is not None else self.columns / self.ffn_hidden_size

    @property
    def carries_levels(self) -> bool:
        """Whether the dispatched hidden states carry a level column for these experts."""
        return self.token_levels_SB is not None

    def levels_for(self, seq_len: int, batch: int, sequence_parallel_rank: Optional[int]) -> torch.Tensor:
        """The levels of this rank's [seq_len, batch] tokens (a chunk of the sequence under SP)."""
        levels_SB = self.token_levels_SB
        if sequence_parallel_rank is not None:
            levels_SB = levels_SB[sequence_parallel_rank * seq_len:(sequence_parallel_rank + 1) * seq_len]
        if tuple(levels_SB.shape) != (seq_len, batch):
            raise ValueError(f"per-token width levels have shape {tuple(levels_SB.shape)} but the layer "
                             f"sees [{seq_len}, {batch}] tokens; set them for each micro-batch")
        return levels_SB

    def _split_channel(self, hidden_NH1: torch.Tensor):
        """(hidden [N, H], levels [N]) from dispatched rows carrying the level column."""
        levels_N = hidden_NH1[:, -1].detach().round().long()
        self.last_width = self.token_levels_SB
        return hidden_NH1[:, :-1], levels_N

    @staticmethod
    def _with_channel(output_NH: torch.Tensor) -> torch.Tensor:
        # The combine expects as many columns as were dispatched; the layer drops this one.
        return torch.cat([output_NH, output_NH.new_zeros(output_NH.shape[0], 1)], dim=-1)


def stop_marked_rows(output_NH, probs_N, marked_N):
    """The experts' outputs p x f(x) with the marked rows' gradient to f(x) (the expert's weights
    and input) cut and their gradient to p kept: sg(p f(x)) x p / sg(p), the same value (p / sg(p)
    is exactly 1)."""
    p_N = probs_N.detach()
    ratio_N = probs_N / torch.where(p_N == 0, torch.ones_like(p_N), p_N)
    stopped_NH = output_NH.detach() * ratio_N.unsqueeze(-1).to(output_NH.dtype)
    return torch.where(marked_N.unsqueeze(-1), stopped_NH, output_NH)


def sliced_swiglu(x_NH, fc1_weight_FH, fc2_weight_HI, probs_N, columns: int, activation_func):
    """A SwiGLU expert on its first `columns` columns, weighted by the router probabilities: the
    same operations, in the same order, as megatron-core's MLP forward (mlp.py:215-241)."""
    ffn = fc2_weight_HI.shape[1]
    gate_NC = F.linear(x_NH, fc1_weight_FH[:columns])
    up_NC = F.linear(x_NH, fc1_weight_FH[ffn:ffn + columns])
    inter_NC = activation_func(gate_NC) * up_NC
    inter_NC = (inter_NC * probs_N.unsqueeze(-1)).to(inter_NC.dtype)
    return F.linear(inter_NC, fc2_weight_HI[:, :columns])


def _check_plain_swiglu(config) -> None:
    """Narrower widths re-implement megatron's plain SwiGLU path; refuse what it would not do."""
    if not config.gated_linear_unit or config.add_bias_linear or config.bias_activation_fusion \
            or config.activation_func_clamp_value is not None or config.glu_linear_offset != 0 \
            or config.fp8 or config.fp4 or config.moe_apply_probs_on_input:
        raise ValueError(
            "slimmable experts need bias-free SwiGLU experts without fused bias-activation, clamping, "
            "FP8/FP4 or probabilities on the input (the settings this project derives)"
        )


class SlimmableSequentialMLP(_WidthState, SequentialMLP):
    """megatron-core's SequentialMLP whose experts run at a chosen width (module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None,
                 widths: Sequence[float] = (1.0,), added_expert_grad: bool = False, **experts_kwargs):
        # experts_kwargs: what megatron-core hands its experts beyond these (0.19.2: name,
        # moe_layer.py:326); passed on unchanged.
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         **experts_kwargs)
        self._init_width_state(widths, self.config.moe_ffn_hidden_size, added_expert_grad)

    def _expert(self, index: int, x_NH, probs_N, columns: int):
        expert = self.local_experts[index]
        if columns == self.ffn_hidden_size:
            return expert(x_NH, probs_N)[0]  # the stock expert, bit for bit
        return sliced_swiglu(x_NH, expert.linear_fc1.weight, expert.linear_fc2.weight, probs_N, columns,
                             self.config.activation_func)

    def _forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if self.carries_levels:
            x_NH, levels_N = self._split_channel(permuted_local_hidden_states)
            return self._with_channel(self._per_token(x_NH, tokens_per_expert, permuted_probs, levels_N)), None
        self.last_width = self.width
        if self.columns == self.ffn_hidden_size:
            return SequentialMLP.forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        counts = tokens_per_expert.tolist()
        outputs = [self._expert(e, x_NH, probs_N, self.columns) for e, (x_NH, probs_N) in enumerate(zip(
            torch.split(permuted_local_hidden_states, counts), torch.split(permuted_probs, counts)))]
        return torch.cat(outputs, dim=0), None

    def _per_token(self, x_NH, tokens_per_expert, probs_N, levels_N):
        """Group the rows by (expert, level), run each group at its width, restore the order."""
        num_levels = len(self.widths)
        expert_N = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=x_NH.device), tokens_per_expert.to(x_NH.device))
        group_N = expert_N * num_levels + (levels_N - 1)
        order_N = torch.argsort(group_N, stable=True)
        sizes = torch.bincount(group_N, minlength=self.num_local_experts * num_levels).tolist()
        xs, ps = torch.split(x_NH[order_N], sizes), torch.split(probs_N[order_N], sizes)
        outputs = []
        for e in range(self.num_local_experts):
            groups = [g for g in range(e * num_levels, (e + 1) * num_levels) if sizes[g]]
            # An expert without tokens still runs (on no rows), as SequentialMLP does: its weights
            # then get a (zero) gradient on every rank, which data-parallel reductions rely on.
            for g in groups or [(e + 1) * num_levels - 1]:
                outputs.append(self._expert(e, xs[g], ps[g], self.level_columns[g % num_levels + 1]))
        sorted_NH = torch.cat(outputs, dim=0)
        return sorted_NH[torch.argsort(order_N)]


class SlimmableTEGroupedMLP(_WidthState, TEGroupedMLP):
    """megatron-core's TEGroupedMLP (GPU, Transformer Engine) with widths (module docstring).

    At full width the stock forward runs. Narrower widths run both grouped GEMMs at full width and
    zero the SwiGLU outputs of the columns beyond each row's width: the outputs equal the sliced
    experts' (the zeros add nothing to linear_fc2's sums), and the weights outside the slice get
    exactly zero gradient. It saves no compute in training; a served model is exported with the
    sliced experts (`export`)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None,
                 widths: Sequence[float] = (1.0,), added_expert_grad: bool = False, **experts_kwargs):
        # experts_kwargs: what megatron-core hands its experts beyond these (0.19.2: name,
        # moe_layer.py:326); passed on unchanged.
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         **experts_kwargs)
        self._init_width_state(widths, self.config.moe_ffn_hidden_size, added_expert_grad)

    def _forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs, **buffers):
        # buffers: 0.19.2's NCCL-EP zero-copy output/grad buffers (moe_layer.py:550-560), passed
        # only by that dispatcher; the masked path writes its own tensors.
        if (self.carries_levels or self.columns < self.ffn_hidden_size) and buffers:
            raise ValueError("slimmable grouped experts below full width do not write into the "
                             f"dispatcher's zero-copy buffers ({sorted(buffers)}); use the alltoall "
                             "or allgather dispatcher")
        if self.carries_levels:
            x_NH, levels_N = self._split_channel(permuted_local_hidden_states)
            columns_N = torch.tensor(self.level_columns, device=x_NH.device)[levels_N]
            return self._with_channel(self._masked(x_NH, tokens_per_expert, permuted_probs, columns_N)), None
        self.last_width = self.width
        if self.columns == self.ffn_hidden_size:
            return TEGroupedMLP.forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs,
                                        **buffers)
        columns_N = torch.full((permuted_local_hidden_states.shape[0],), self.columns,
                               device=permuted_local_hidden_states.device)
        return self._masked(permuted_local_hidden_states, tokens_per_expert, permuted_probs, columns_N), None

    def _masked(self, x_NH, tokens_per_expert, probs_N, columns_N):
        if self.activation_recompute or self.offload_expert_fc1 or self.offload_moe_act \
                or self.config.use_te_activation_func:
            raise ValueError("slimmable grouped experts do not support moe_act recompute, activation "
                             "offloading or Transformer Engine activations; turn them off")
        counts = tokens_per_expert.tolist()
        fc1_NF, _ = self.linear_fc1(x_NH, counts)
        inter_NI = masked_swiglu(fc1_NF, columns_N, probs_N, self.config.activation_func)
        out_NH, _ = self.linear_fc2(inter_NI, counts)
        return out_NH


def masked_swiglu(fc1_NF, columns_N, probs_N, activation_func):
    """SwiGLU of full-width linear_fc1 outputs [N, 2I] with the columns at and beyond each row's
    width zeroed, weighted by the router probabilities: [N, I]."""
    gate_NI, up_NI = torch.chunk(fc1_NF, 2, dim=-1)
    keep_NI = torch.arange(gate_NI.shape[1], device=fc1_NF.device)[None, :] < columns_N[:, None]
    inter_NI = (activation_func(gate_NI) * up_NI).masked_fill(~keep_NI, 0.0)
    return (inter_NI * probs_N.unsqueeze(-1)).to(inter_NI.dtype)


def experts_class(grouped: bool) -> type:
    """The slimmable experts for megatron-core's local or grouped-GEMM (TE) experts."""
    return SlimmableTEGroupedMLP if grouped else SlimmableSequentialMLP
