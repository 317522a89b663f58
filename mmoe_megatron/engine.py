"""DeepSpeed ZeRO around a megatron-core model whose experts DeepSpeed did not build.

DeepSpeed treats a parameter as an expert parameter when `param.allreduce is False` and reads
its `group_name` to find the expert-data-parallel group in `deepspeed.utils.groups`. It only
turns its MoE machinery on (`has_moe_layers`) when it finds its own `deepspeed.moe.layer.MoE`
module (engine.py:2100-2107). Without that, expert gradients would be averaged over the full
data-parallel group and, at start-up, every rank's experts would be overwritten by rank 0's
(`_broadcast_model`, engine.py:2050-2061): silent corruption. So this module

1. tags megatron's expert parameters with `allreduce=False` and `group_name="ep_size_<EP>"`,
2. registers megatron's expert-parallel and expert-data-parallel groups under that name in
   DeepSpeed's group tables before the engine copies them (engine.py:2170-2171),
3. splits the optimizer's parameter groups into dense and expert groups, and
4. builds `ExpertAwareEngine`, a DeepSpeedEngine told that the model has MoE layers, and
5. sums ZeRO's gradient norm in float64 across ranks (`exact_grad_norm`, unless
   `optimizer.grad_norm: deepspeed`), so that a run clips by the same factor on any number of
   data-parallel ranks.

The DeepSpeed JSON is generated from the config tree by `deepspeed_config()`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable

import torch
import torch.distributed as dist

from mmoe_megatron.config import ConfigError, ExperimentConfig
from mmoe_megatron.layout import is_expert_param


def deepspeed_config(cfg: ExperimentConfig, dp_size: int) -> dict:
    """The DeepSpeed JSON for this run (written beside the run for reference, never by hand)."""
    t, o = cfg.train, cfg.optimizer
    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)
    bf16 = t.precision == "bf16"
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # DeepSpeed clips at 1.0 unless told otherwise (runtime/constants.py:203): always explicit.
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {
            "stage": o.zero_stage,
            # ZeRO asserts these for MoE (stage_1_and_2.py:_configure_moe_settings).
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": torch.cuda.is_available(),
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # Accumulate gradients in fp32 even when the weights are bf16.
        "data_types": {"grad_accum_dtype": "fp32"},
        # The client AdamW is torch's own; DeepSpeed only warns that it did not test it with ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }


class MegatronMpu:
    """megatron-core's parallel_state seen through the `mpu` interface DeepSpeed expects.

    DeepSpeed's "model parallel" is tensor x pipeline. There is deliberately no
    `initialize_sequence_parallel`: with it DeepSpeed ignores this data-parallel group
    (utils/groups.py:775-776).
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self):
        return torch.distributed.get_process_group_ranks(self.get_data_parallel_group())

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size() * self.ps.get_pipeline_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return torch.distributed.get_rank(self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()


def expert_group_name(ep_size: int) -> str:
    # DeepSpeed parses the size back out of the name (utils/groups.py:664-672).
    return f"ep_size_{ep_size}"


def register_expert_groups(model: torch.nn.Module) -> str | None:
    """Tag expert parameters and give DeepSpeed megatron's expert groups. Returns the group name,
    or None without expert parallelism (experts are then plain data-parallel parameters)."""
    from deepspeed.utils import groups
    from megatron.core import parallel_state as ps

    ep = ps.get_expert_model_parallel_world_size()
    if ep == 1:
        return None
    name = expert_group_name(ep)
    ep_group = ps.get_expert_model_parallel_group()
    edp_group = ps.get_expert_data_parallel_group()
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = torch.distributed.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = torch.distributed.get_process_group_ranks(edp_group)
    for pname, param in model.named_parameters():
        if is_expert_param(pname):
            param.allreduce = False
            param.group_name = name
    return name


def freeze_untrained(model: torch.nn.Module, cfg: ExperimentConfig) -> None:
    """With `optimizer.train_only` set, freeze (requires_grad False) every parameter whose global
    name matches none of its patterns, before the optimizer is built. Collective then: with
    expert parallelism a rank holds only its experts, so a pattern is checked against all ranks."""
    from mmoe_megatron.model import named_global_parameters

    patterns = cfg.optimizer.train_only
    if patterns is None:
        return
    params = list(named_global_parameters(model, cfg))
    hits = [0] * len(patterns)
    for name, param in params:
        matched = [fnmatchcase(name, p) for p in patterns]
        hits = [n + m for n, m in zip(hits, matched)]
        param.requires_grad_(any(matched))
    counts = torch.tensor(hits, device=params[0][1].device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    unmatched = [p for p, n in zip(patterns, counts.tolist()) if n == 0]
    if unmatched:
        examples = ", ".join(name for name, _ in params[:: max(1, len(params) // 6)][:6])
        raise ConfigError("optimizer.train_only", f"{unmatched} match no parameter; global names look like "
                                                  f"{examples}")


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on 1-D parameters (norm weights, biases); experts split
    into their own groups so ZeRO reduces and shards them over the expert-data-parallel group."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # Per-k gains per channel ([K, H]) are scales, as norm weights are: not decayed.
            (no_decay if param.dim() < 2 or name.endswith("log_gain") else decay).append(param)
    param_groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(param_groups, max_group_size=None)


def _engine_class():
    from deepspeed.runtime.engine import DeepSpeedEngine

    class ExpertAwareEngine(DeepSpeedEngine):
        """Tells DeepSpeed the model has MoE layers when its expert parameters are tagged and
        train. Frozen experts (optimizer.train_only) are left out: ZeRO would want an optimizer
        group of them; they are still broadcast over their expert-data-parallel group only."""

        def _set_client_model(self, model):
            super()._set_client_model(model)
            from deepspeed.moe.utils import is_moe_param

            if not self.has_moe_layers and any(is_moe_param(p) and p.requires_grad for p in model.parameters()):
                self.has_moe_layers = True
                self.num_experts = [getattr(model.config, "num_moe_experts", 0)]

    return ExpertAwareEngine


def exact_grad_norm(optimizer) -> None:
    """Make a ZeRO-1/2 optimizer's L2 gradient norm the same to the last bit on any number of
    data-parallel ranks. DeepSpeed (runtime/zero/stage_1_and_2.py, `get_grad_norm_direct`) sums
    each rank's squared norms in float64 but rounds that partial sum to float32 before the
    all-reduce, so the norm of one batch's gradients depends on how the flat buffer was cut into
    partitions; where the norm exceeds `optimizer.clip_grad`, so does the clipping factor, and 1- and
    2-rank runs of one seed part ways at the first such step (bench/run_numerics.py). Here the sum
    stays in float64 until every rank's part is in; its float32 rounding no longer depends on the
    partitioning (unless it falls within about 1e-16 of a rounding boundary). Other norms and the
    CPU-offload path keep DeepSpeed's own."""
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return
    own = optimizer.get_grad_norm_direct

    def grad_norm(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return own(gradients, params, norm_type)
        squares = torch.zeros((), dtype=torch.float64, device=optimizer.device)
        unpadded = (g for g in gradients if not getattr(g, "_zero_padding", False))
        for grad, param in zip(unpadded, params):
            if getattr(param, "ds_pipe_replicated", False):
                continue  # held by several pipeline stages: counted once
            if is_model_parallel_parameter(param) or optimizer.model_parallel_rank == 0:
                squares += grad.detach().to(torch.float64).square().sum()
        ds_comm.all_reduce(squares, op=ds_comm.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=squares, op=ds_comm.ReduceOp.SUM)
        norm = squares.sqrt().float()
        # DeepSpeed's marker of an overflowed norm, which its clipping and our step check read.
        return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, -1.0))

    optimizer.get_grad_norm_direct = grad_norm


def build_engine(model: torch.nn.Module, cfg: ExperimentConfig, dp_size: int):
    """Wrap `model` in a DeepSpeed engine with ZeRO-1/2 and a torch AdamW."""
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.config import DeepSpeedConfig

    o = cfg.optimizer
    register_expert_groups(model)
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, o.weight_decay),
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False,
    )
    config = deepspeed_config(cfg, dp_size)
    mpu = MegatronMpu()
    # What deepspeed.initialize does, with our engine class (deepspeed/__init__.py:498-580).
    ds_comm.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                             dist_init_required=False)
    config_class = DeepSpeedConfig(config, mpu)
    engine = _engine_class()(
        args=None, model=model, optimizer=optimizer, model_parameters=None, training_data=None,
        lr_scheduler=None, mpu=mpu, dist_init_required=False, collate_fn=None, config=config,
        config_class=config_class,
    )
    if o.grad_norm == "exact":
        exact_grad_norm(engine.optimizer)
    return engine, config


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def parameters_of(engine) -> Iterable[tuple[str, torch.nn.Parameter]]:
    return engine.module.named_parameters()
