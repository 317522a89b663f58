"""The optimizer state under global parameter names, so that a checkpoint resumes on another layout.

A checkpoint's `optim/rank_XXXXX.safetensors` files hold, for every parameter under its global
(layout-free) name:

    exp_avg.<name>, exp_avg_sq.<name>   Adam's two moments, fp32, the parameter's full shape
    master.<name>                       the fp32 master weight, only when the weights are bf16
                                        (with fp32 weights the master is the weight itself)

each written by the rank that writes the parameter's weights (data-parallel rank 0 for dense
parameters, expert-data-parallel rank 0 for experts), as for model/. Adam's step count is
`optimizer_steps` in trainer_state.json. With the same layout a resume still goes through
DeepSpeed's own ZeRO shards (bitwise); with another world size, expert-parallel size or ZeRO
stage it rebuilds ZeRO's partitions from these files.

Why not DeepSpeed's universal checkpoint: its converter (deepspeed/checkpoint/ds_to_universal.py)
is an offline step between jobs, needs the client to record UNIVERSAL_CHECKPOINT_INFO, and knows
experts only as DeepSpeed's own MoE or AutoEP layers. The experts here are megatron-core's,
numbered locally on each expert-parallel rank, so their ZeRO fragments carry the same local
names on every expert-parallel rank and would be merged as one parameter. Global names are what
model/ already uses; the optimizer state follows them.

DeepSpeed's public fragment API (deepspeed.utils.safe_get/set_full_*) does the mapping between a
parameter and its slice of ZeRO's flat fp32 partition: getting a full tensor is an all-reduce over
the parameter's data-parallel (or expert-data-parallel) group, setting one is local.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import safe_open

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "master"
FOLDER = "optim"


def adam_steps(engine) -> int:
    """Adam's step count (the same for every parameter group): applied updates so far."""
    states = list(engine.optimizer.optimizer.state.values())
    return int(states[0]["step"]) if states else 0


def _link_fragments(zero) -> None:
    """Point each parameter's fragment at its slice of Adam's flat state, for every parameter group.
    DeepSpeed links them once, after the first group's first update (stage_1_and_2.py:2987 calling
    :852-857), when the other groups have no Adam state yet: their fragments stay empty."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    for lp_params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(lp_params, flat, zero.optimizer.state)


def _owner(name_is_expert: bool) -> bool:
    from megatron.core import parallel_state as ps

    if name_is_expert:
        return ps.get_expert_data_parallel_rank() == 0
    return ps.get_data_parallel_rank() == 0


def gather_owned(engine, cfg) -> dict[str, torch.Tensor]:
    """Collective (one all-reduce per parameter and kind, over its data-parallel group): this
    rank's share of the global optimizer state, to write as optim/rank_<rank>.safetensors."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from mmoe_megatron.layout import is_expert_param

    zero = engine.optimizer
    kinds = list(MOMENTS) if zero.optimizer.state else []  # no Adam state before the first step
    if kinds:
        _link_fragments(zero)
    if cfg.train.precision != "fp32":
        kinds.append(MASTER)
    out = {}
    for name, param in trained_parameters(engine.module, cfg):
        mine = _owner(is_expert_param(name))
        for kind in kinds:
            full = (safe_get_full_fp32_param(param) if kind == MASTER
                    else safe_get_full_optimizer_state(param, kind))
            if full is not None and mine:
                out[f"{kind}.{name}"] = full.detach().to("cpu", torch.float32).clone().contiguous()
    return out


def trained_parameters(model, cfg) -> list[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of the parameters the optimizer holds: those that require a gradient
    (`optimizer.train_only` freezes the others; they have no optimizer state)."""
    from mmoe_megatron.model import named_global_parameters

    return [(name, param) for name, param in named_global_parameters(model, cfg) if param.requires_grad]


def _read(path: str, keys: set[str]) -> dict[str, torch.Tensor]:
    """The tensors named `keys` from the checkpoint's optim/ files (any that exist)."""
    folder = os.path.join(path, FOLDER)
    if not os.path.isdir(folder):
        return {}
    out = {}
    for file in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
        with safe_open(os.path.join(folder, file), framework="pt") as f:
            for key in keys.intersection(f.keys()):
                out[key] = f.get_tensor(key)
    return out


def resume_in_new_layout(engine, cfg, path: str, state: dict) -> dict:
    """Collective. Resume the verified checkpoint `path` (trainer state `state`) in this run's
    layout from its global weights and optimizer state; returns the trainer state with
    `layout_change` [before, now] added. RNG states are left as seeded at start-up."""
    from mmoe_megatron.training.checkpoint import (
        CheckpointError, check_weights, load_global_state_dict, raise_if_any,
    )

    rank = dist.get_rank() if dist.is_initialized() else 0
    now = current_layout(cfg, dist.get_world_size() if dist.is_initialized() else 1)
    problem = layout_change_problem(state, now, path)
    if problem:
        raise CheckpointError(problem)
    error, saved = None, {}
    try:
        saved = load_global_state_dict(path)
        restore_local(engine, cfg, path, saved, state)
    except Exception as e:  # noqa: BLE001 - every rank must learn of any rank's failure
        error = f"rank {rank}: {type(e).__name__}: {e}"
    raise_if_any(error, f"could not resume {path} in the new layout")
    engine.optimizer.update_lp_params()
    mismatched = check_weights(engine.module, cfg, saved)
    raise_if_any(f"rank {rank}: {', '.join(mismatched[:5])}" if mismatched else None,
                 f"weights restored from {path} in the new layout differ from the saved ones")
    return {**state, "layout_change": [describe(layout_of(state)), describe(now)]}


def restore_local(engine, cfg, path: str, weights: dict[str, torch.Tensor], state: dict) -> None:
    """Give this rank's model, ZeRO fp32 partitions, Adam state and DeepSpeed's step counters the
    values of the global state at `path` (`weights`: its model/ weights; `state`: its trainer
    state), whatever layout wrote them. No collective; `update_lp_params` (an all-gather) follows
    on every rank. Needs an engine that has not taken a step."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from mmoe_megatron.training.checkpoint import CheckpointError, load_weights_into

    zero = engine.optimizer
    if zero.optimizer.state:
        raise RuntimeError("restoring optimizer state needs an engine that has not taken a step")
    steps = int(state.get("optimizer_steps", 0))
    local = trained_parameters(engine.module, cfg)
    saved = _read(path, {f"{kind}.{name}" for name, _ in local for kind in (*MOMENTS, MASTER)})
    missing = [f"{kind}.{name}" for name, _ in local for kind in MOMENTS
               if steps and f"{kind}.{name}" not in saved]
    if missing:
        raise CheckpointError(f"{path}/{FOLDER} lacks {len(missing)} optimizer tensors, e.g. {missing[:3]}")
    # The weights from the fp32 masters where the checkpoint has them (bf16 runs); this also
    # checks that every parameter is there with its shape.
    masters = {name: saved[f"{MASTER}.{name}"] for name, _ in local if f"{MASTER}.{name}" in saved}
    source = {**weights, **masters}
    load_weights_into(engine.module, cfg, source)
    _create_adam_state(zero, steps)
    _link_fragments(zero)
    for name, param in local:
        safe_set_full_fp32_param(param, source[name].to(torch.float32))
        for kind in MOMENTS:
            value = saved.get(f"{kind}.{name}")
            safe_set_full_optimizer_state(param, value if value is not None else torch.zeros(param.shape), kind)
    # What DeepSpeed's own load restores besides the tensors (engine.py:4711-4713).
    engine.global_steps = state["step"]
    engine.global_samples = state["consumed_samples"]
    engine.skipped_steps = state.get("skipped_steps", 0)


def _create_adam_state(zero, steps: int) -> None:
    """torch.optim.AdamW's per-parameter state (its `_init_group` format) for ZeRO's flat fp32
    partitions, with the step count `steps`; the moments are filled in afterwards."""
    for flat in zero.single_partition_of_fp32_groups:
        zero.optimizer.state[flat] = {
            "step": torch.tensor(float(steps)),
            "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
        }


def current_layout(cfg, world_size: int) -> dict:
    """This run's layout in the terms of `layout_of`."""
    return {"world_size": world_size, "tensor_parallel": cfg.parallel.tensor,
            "expert_parallel": cfg.parallel.expert, "zero_stage": cfg.optimizer.zero_stage}


def layout_of(state: dict) -> dict:
    """The parts of a trainer state (or of the current run) that fix how ZeRO shards the state."""
    return {"world_size": state["world_size"], "tensor_parallel": state.get("tensor_parallel", 1),
            "expert_parallel": state["expert_parallel"], "zero_stage": state.get("zero_stage")}


def describe(layout: dict) -> str:
    dp = layout["world_size"] // layout["tensor_parallel"]
    parts = [_ranks(layout["world_size"]), f"expert parallel {layout['expert_parallel']}",
             f"data parallel {dp}"]
    if layout["tensor_parallel"] > 1:
        parts.append(f"tensor parallel {layout['tensor_parallel']}")
    if layout.get("zero_stage") is not None:
        parts.append(f"ZeRO-{layout['zero_stage']}")
    return ", ".join(parts)


def _ranks(n: int) -> str:
    return f"{n} rank" + ("s" if n != 1 else "")


def layout_change_problem(saved: dict, current: dict, path: str) -> Optional[str]:
    """None if a checkpoint written with trainer state `saved` can be resumed in the `current`
    layout (see `layout_of`) through the layout-free state, else what to do instead."""
    before = layout_of(saved)
    fresh = (f"or continue from its weights with a fresh optimizer (step count, learning-rate "
             f"schedule and data order then start again at 0): --checkpoint.load=null "
             f"--checkpoint.init_weights={path}")
    if before["tensor_parallel"] != 1 or current["tensor_parallel"] != 1:
        return (f"{path} was written with {describe(before)}; this run has {describe(current)}. The "
                "layout can change with parallel.tensor=1 only (tensor-parallel shards are not stored "
                f"under global names). Resume with the original layout, {fresh}")
    if not saved.get("layout_free_optimizer"):
        return (f"{path} was written with {describe(before)}; this run has {describe(current)}, and "
                "the checkpoint has no layout-free optimizer state (checkpoint.layout_free_optimizer "
                "was false, or it predates that setting), so its ZeRO shards fit only the original "
                f"layout. Resume with {_ranks(before['world_size'])} and "
                f"parallel.expert={before['expert_parallel']}, {fresh}")
    return None


def same_layout(saved: dict, current: dict) -> bool:
    """Whether `current` is the layout of trainer state `saved` (fields it lacks are not compared)."""
    return all(v is None or current[k] == v for k, v in layout_of(saved).items())
