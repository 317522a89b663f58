"""Process start-up: torch.distributed from torchrun / srun / deepspeed environment variables,
then megatron-core's parallel_state (DP x EP, x TP on GPU) and its RNG trackers.

Failure behaviour. Every process group (torch's default group and megatron's, which DeepSpeed
reuses) waits at most `parallel.distributed_timeout_minutes` in a collective. A rank that dies
is noticed sooner: gloo fails the peers' next collective at once ("Connection closed by peer"),
and torchrun, seeing a worker exit, stops the others (SIGTERM, then SIGKILL after 30 s) and
names the first failed rank in its "Root Cause" report; under srun the trainer's own diagnosis
(`mmoe_megatron.failures`) names it. A relaunch resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmoe_megatron import compat
from mmoe_megatron.config import ConfigError, ExperimentConfig
from mmoe_megatron.failures import start_line, this_rank
from mmoe_megatron.ports import free_port


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def env_from_os(environ=None) -> Env:
    """Ranks and rendezvous from torchrun, the deepspeed launcher, or Slurm's srun.

    torchrun/deepspeed set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Under a bare
    `srun python ...` only SLURM_* exist: ranks come from SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID, and the sbatch script exports MASTER_ADDR / MASTER_PORT. A plain
    `python -m ...` with none of these is a single process.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    elif world == 1:
        # A lone process (evaluation, export, a suite's evaluation step) rendezvous with itself:
        # any free port, so that it never collides with a job on the default port.
        port = free_port()
    else:
        port = 29500
    return Env(rank=rank, world_size=world, local_rank=local, master_addr=addr, master_port=port)


def check_layout(cfg: ExperimentConfig, world_size: int) -> int:
    """The data-parallel size for this world, or a ConfigError naming what does not fit."""
    p = cfg.parallel
    if p.tensor > 1 and not torch.cuda.is_available():
        raise ConfigError(
            "parallel.tensor",
            "tensor parallelism with MoE needs sequence parallelism, which needs Transformer "
            "Engine or Apex norms on GPU; on CPU use data and expert parallelism",
        )
    model_parallel = p.tensor * p.pipeline
    if world_size % model_parallel:
        raise ConfigError(
            "parallel.tensor",
            f"tensor x pipeline = {model_parallel} does not divide the world size {world_size}",
        )
    dp = world_size // model_parallel
    if dp % p.expert:
        raise ConfigError(
            "parallel.expert",
            f"expert parallel size {p.expert} must divide the data-parallel size {dp} "
            f"(world {world_size} / tensor {p.tensor}); experts are sharded across DP ranks",
        )
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            f"{cfg.train.global_batch_size} is not a multiple of micro_batch_size x data-parallel "
            f"size = {cfg.train.micro_batch_size} x {dp}",
        )
    return dp


def init_distributed(cfg: ExperimentConfig, env: Env | None = None) -> Env:
    """Start torch.distributed and megatron-core's parallel state for `cfg`. Idempotent."""
    from megatron.core import parallel_state as ps

    compat.apply_all()
    env = env or env_from_os()
    check_layout(cfg, env.world_size)
    # DeepSpeed reads these itself; a bare `python -m ...` or `srun python ...` does not set them.
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(name, str(value))
    timeout = datetime.timedelta(minutes=cfg.parallel.distributed_timeout_minutes)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
        # One line per rank, so that a job log shows which rank ran on which node and device.
        print(start_line(this_rank(env.rank, env.local_rank), env.world_size), flush=True)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor,
            pipeline_model_parallel_size=cfg.parallel.pipeline,
            expert_model_parallel_size=cfg.parallel.expert,
            distributed_timeout_minutes=cfg.parallel.distributed_timeout_minutes,
            create_gloo_process_groups=False,
        )
    seed_everything(cfg.train.seed)
    return env


def seed_everything(seed: int) -> None:
    """Seed torch and megatron's RNG trackers; dropout streams follow megatron's offsets."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# Fault injection for the reliability tests: places where a test can SIGKILL a process
# deterministically. Unset in normal runs, where `pause_point` costs one environment lookup.
PAUSE_AT = "MMOE_PAUSE_AT"
"""Name of the point to pause at: `step_<n>` (the start of the n-th optimizer step, counted from 1
as in the logs), `save_<tag>` (after a checkpoint's files are written, before its manifest) or
`exit` (training ended, the process group not yet shut down)."""
PAUSE_RANK = "MMOE_PAUSE_RANK"
"""Global rank that pauses (default 0)."""
PAUSE_FILE = "MMOE_PAUSE_FILE"
"""Written with the paused process's id once it is paused. While it exists the point does not
pause again: a test that leaves it in place lets a retried run pass the point."""


def pause_point(name: str) -> None:
    """If MMOE_PAUSE_AT names this point on this rank, write the process id to MMOE_PAUSE_FILE and
    sleep (up to 10 minutes, then carry on) so that a test can kill the process right here."""
    if os.environ.get(PAUSE_AT) != name:
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != int(os.environ.get(PAUSE_RANK, "0")):
        return
    marker = os.environ.get(PAUSE_FILE)
    if marker and os.path.exists(marker):
        return
    if marker:
        with open(f"{marker}.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(f"{marker}.tmp", marker)
    deadline = time.time() + 600
    while time.time() < deadline:
        time.sleep(0.1)
