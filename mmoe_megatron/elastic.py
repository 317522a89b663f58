"""Drive the model's elastic routers (and slimmable experts) from the schedule, and check the ks
(and widths) across ranks.

The trainer calls `set_microbatch(step, microbatch, sample_offset)` before each micro-batch's
forward. For every strategy except `microbatch` and `token` the ks only change with the step,
so all micro-batches of a step, and any activation recompute in their backward, see the same
ks. Per-token ks are indexed by each token's place in the global batch:

    sample_in_global_batch = microbatch * (dp_size * micro_batch_size) + dp_rank * micro_batch_size + b

which is the order megatron's pretraining sampler hands out samples, so the per-token ks do not
depend on how the global batch is split over ranks and micro-batches. The schedule's sample plan
(sandwich and coupled samples) is indexed the same way. The width axis (`WidthSchedule`, when
`matryoshka.widths` holds more than one width) is drawn from the same indices and set on the
slimmable experts of each MoE layer: one width per layer or a width level per token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from mmoe_megatron.model import elastic_routers, moe_layer_numbers, slimmable_experts
from mmoe_megatron.schedule import KSchedule, WidthSchedule, global_token_ids, grid_fingerprint


class KDesyncError(RuntimeError):
    """Ranks that must route with the same ks did not."""


class ElasticK:
    def __init__(
        self,
        model: torch.nn.Module,
        schedule: KSchedule,
        moe_layer_numbers: list[int],
        seq_length: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        width_schedule: Optional[WidthSchedule] = None,
    ):
        self.schedule = schedule
        self.width_schedule = width_schedule
        self.routers = elastic_routers(model)
        index = {number: i for i, number in enumerate(moe_layer_numbers)}
        missing = [r.layer_number for r in self.routers if r.layer_number not in index]
        if missing:
            raise ValueError(f"routers at layers {missing} are not MoE layers of the config")
        self.layer_of = [index[r.layer_number] for r in self.routers]
        self.experts = slimmable_experts(model) if width_schedule is not None else []
        if width_schedule is not None and len(self.experts) != len(self.routers):
            raise ValueError("matryoshka.widths needs slimmable experts in every MoE layer")
        self.expert_layer_of = [index[e.layer_number] for e in self.experts]
        self.num_moe_layers = len(moe_layer_numbers)
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.step: Optional[int] = None
        self.microbatch: Optional[int] = None
        self.layer_ks: list[int] = []  # scalar ks set for the current micro-batch (per router)
        self.layer_levels: list[int] = []  # scalar width levels of the current micro-batch
        self._token_ids: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, model, cfg, dp_rank: int = 0, dp_size: int = 1) -> "ElasticK":
        return cls(
            model,
            KSchedule.from_config(cfg.matryoshka, cfg.k_seed, cfg.train.global_batch_size, cfg.train.train_iters),
            moe_layer_numbers(cfg),
            cfg.data.seq_length,
            cfg.train.micro_batch_size,
            dp_rank,
            dp_size,
            WidthSchedule.from_config(cfg.matryoshka, cfg.k_seed, cfg.train.global_batch_size),
        )

    def fingerprint(self) -> int:
        """Digest of everything that determines the draws of both axes (checkpoints, sync check)."""
        return grid_fingerprint(self.schedule, self.width_schedule)

    @property
    def per_token(self) -> bool:
        """Whether either axis differs between the tokens of a micro-batch."""
        return self.schedule.per_token or (self.width_schedule is not None and self.width_schedule.levels.per_token)

    def sample_offset(self, microbatch: int) -> int:
        return (microbatch * self.dp_size + self.dp_rank) * self.micro_batch_size

    def set_microbatch(self, step: int, microbatch: int = 0) -> None:
        """Set the ks of (step, microbatch) on every router of this rank."""
        self.step, self.microbatch = step, microbatch
        if self.per_token:
            device = self.routers[0].weight.device if self.routers else None
            self._token_ids = global_token_ids(
                self.sample_offset(microbatch), self.micro_batch_size, self.seq_length, device
            )
        if self.schedule.per_token:
            for router, layer in zip(self.routers, self.layer_of):
                ks_SB = self.schedule.layer_token_ks(step, microbatch, layer, self._token_ids, self.seq_length)
                router.set_token_ks(ks_SB, width=self.schedule.k_max)
            self.layer_ks = []
        else:
            self.layer_ks = [self.schedule.k(step, microbatch, layer) for layer in self.layer_of]
            for router, k in zip(self.routers, self.layer_ks):
                router.set_k(k)
        if self.width_schedule is not None:
            self._set_widths(step, microbatch)

    def _set_widths(self, step: int, microbatch: int) -> None:
        levels = self.width_schedule.levels
        if levels.per_token:
            for experts, layer in zip(self.experts, self.expert_layer_of):
                experts.set_token_levels(levels.layer_token_ks(step, microbatch, layer, self._token_ids,
                                                               self.seq_length))
            self.layer_levels = []
            return
        self.layer_levels = [levels.k(step, microbatch, layer) for layer in self.expert_layer_of]
        for experts, level in zip(self.experts, self.layer_levels):
            experts.set_width(self.width_schedule.width(level))

    def ks_by_layer(self) -> dict[int, float]:
        """MoE layer index -> k set for the current micro-batch (the mean k for per-token ks)."""
        if self.schedule.per_token:
            return {
                layer: float(r._token_ks_SB.float().mean())
                for r, layer in zip(self.routers, self.layer_of)
            }
        return {layer: float(k) for layer, k in zip(self.layer_of, self.layer_ks)}

    # --- synchronisation check --------------------------------------------------------------

    def _local_record(self) -> torch.Tensor:
        """[3 + num_moe_layers (x 2 with a width axis)] int64: step, micro-batch, schedule
        fingerprint (both axes), then per layer the k the router last used (-1 if this rank has no
        such layer), then per layer the width level its experts last used. For per-token draws, a
        layer's entry is the number of tokens whose used value differs from the schedule's (0 when
        in sync)."""
        layers = self.num_moe_layers
        record = torch.full((3 + layers * (2 if self.width_schedule else 1),), -1, dtype=torch.int64)
        record[0] = -1 if self.step is None else self.step
        record[1] = -1 if self.microbatch is None else self.microbatch
        record[2] = self.fingerprint()
        for router, layer in zip(self.routers, self.layer_of):
            record[3 + layer] = self._entry(router.last_k, self.schedule, layer, lambda k: k)
        if self.width_schedule is not None:
            widths = self.width_schedule.widths
            for experts, layer in zip(self.experts, self.expert_layer_of):
                record[3 + layers + layer] = self._entry(
                    experts.last_width, self.width_schedule.levels, layer,
                    lambda w: widths.index(w) + 1 if w in widths else -3)
        return record

    def _entry(self, used, schedule: KSchedule, layer: int, scalar) -> int:
        if used is None:
            return -1
        if not isinstance(used, torch.Tensor):
            return scalar(used) if not schedule.per_token else -2
        expected = schedule.layer_token_ks(self.step, self.microbatch, layer, self._token_ids, self.seq_length)
        return int((used.reshape(-1).cpu() != expected.reshape(-1).cpu()).sum())

    def check_sync(self, group=None) -> None:
        """Collective: gather every rank's record and raise KDesyncError naming the ranks and
        layers that disagree. Cheap (one all-gather of a few ints); run every N steps."""
        local = self._local_record()
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if world > 1:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            gathered = torch.empty(world * local.numel(), dtype=torch.int64, device=device)
            dist.all_gather_into_tensor(gathered, local.to(device), group=group)
            table = gathered.view(world, -1).cpu()
        else:
            table = local.view(1, -1)
        width_per_token = None if self.width_schedule is None else self.width_schedule.levels.per_token
        problems = describe_desync(table, per_token=self.schedule.per_token, width_per_token=width_per_token)
        if problems:
            raise KDesyncError(
                "ks or widths are out of sync across ranks; training would silently diverge:\n  "
                + "\n  ".join(problems)
                + "\nCheck that every rank runs the same config (matryoshka.*, train.seed) and "
                "resumed from the same checkpoint step."
            )


def describe_desync(table: torch.Tensor, per_token: bool, width_per_token: Optional[bool] = None) -> list[str]:
    """Human-readable disagreements in a [ranks, 3 + layers (+ layers)] table of `_local_record`s;
    `width_per_token` is None when the records have no width columns."""
    problems = []
    for column, what in ((0, "step"), (1, "micro-batch"), (2, "k-schedule fingerprint")):
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            problems.append(f"{what} differs: " + ", ".join(f"rank {r}={v}" for r, v in enumerate(values)))
    layers = (table.shape[1] - 3) // (1 if width_per_token is None else 2)
    axes = [("k", "ks", per_token, 3)]
    if width_per_token is not None:
        axes.append(("width level", "widths", width_per_token, 3 + layers))
    for name, plural, axis_per_token, first in axes:
        for layer in range(layers):
            column = table[:, first + layer].tolist()
            present = {r: v for r, v in enumerate(column) if v != -1}
            if axis_per_token:
                bad = {r: v for r, v in present.items() if v != 0}
                if bad:
                    problems.append(
                        f"MoE layer {layer}: per-token {plural} differ from the schedule on "
                        + ", ".join(f"rank {r} ({v} tokens)" if v >= 0 else f"rank {r} (one {name} for all tokens)"
                                    for r, v in bad.items())
                    )
            elif len(set(present.values())) > 1:
                problems.append(
                    f"MoE layer {layer}: " + ", ".join(f"rank {r} used {name}={v}" for r, v in present.items())
                )
    return problems
