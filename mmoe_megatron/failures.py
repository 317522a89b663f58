"""Who runs where, and who failed: one start line per rank, and a diagnosis when a collective fails.

Every rank prints one line when it joins (`start_line`): global and local rank, host, Slurm node
and device, so that a job log shows which rank ran on which node. The trainer gathers the same
facts from every rank once (`gather_ranks`), and when a collective fails on a rank it prints
`describe_collective_failure`: what the rank was doing, the library's error (gloo names the
peer's address), the process groups this rank belongs to with their members' nodes, and which
ranks did not answer a liveness probe.

The probe goes through the rendezvous store (a TCP server in rank 0's process) rather than a
collective, since collectives are what just failed: each failing rank writes a key and waits up to
`PROBE_SECONDS` for the keys of the others. Ranks whose peers died fail within about a second of
each other under gloo (the dead process's sockets close), so the ranks still missing after the
wait are the failed ones. If rank 0 itself is gone, the store is unreachable, which names rank 0.
On NCCL a lost peer may instead stall the collective until `parallel.distributed_timeout_minutes`;
torch's watchdog then reports the group and operation, and the start lines map its ranks to nodes.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

PROBE_SECONDS = 5.0
"""How long a failing rank waits for the others to report in before naming the missing ones."""
_PROBE_PREFIX = "mmoe_failed_rank/"


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    host: str
    node: str
    """The Slurm node name (SLURMD_NODENAME) under Slurm, else the host name."""
    device: str
    pid: int

    def where(self) -> str:
        node = f"node {self.node}" if self.node == self.host else f"node {self.node} on host {self.host}"
        return f"rank {self.rank} ({node}, local rank {self.local_rank}, pid {self.pid})"


def this_rank(rank: int, local_rank: int) -> RankInfo:
    host = socket.gethostname().split(".")[0]
    if torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    else:
        device = "cpu"
    return RankInfo(rank=rank, local_rank=local_rank, host=host,
                    node=os.environ.get("SLURMD_NODENAME", host), device=device, pid=os.getpid())


def start_line(info: RankInfo, world_size: int) -> str:
    return (f"rank {info.rank} of {world_size} started: local rank {info.local_rank}, node {info.node}, "
            f"host {info.host}, device {info.device}, pid {info.pid}")


def gather_ranks(info: RankInfo) -> list[RankInfo]:
    """Collective: every rank's RankInfo, indexed by global rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [info]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, asdict(info))
    return [RankInfo(**d) for d in out]


_COMM_ERROR = re.compile(r"gloo|nccl|connection (closed|reset|refused)|broken pipe|timed? ?out|"
                         r"socket|peer|watchdog", re.IGNORECASE)


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` looks like a failed collective (a lost peer or a timeout) rather than a bug
    of this rank: torch's distributed error types, or gloo's and NCCL's RuntimeErrors."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and bool(_COMM_ERROR.search(str(exc)))


def _groups_of_this_rank() -> list[tuple[str, list[int]]]:
    """(name, member ranks) of the megatron groups this rank's collectives run in."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return []
    out = []
    for name, getter in (("data-parallel", ps.get_data_parallel_group),
                         ("expert-parallel", ps.get_expert_model_parallel_group),
                         ("expert-data-parallel", ps.get_expert_data_parallel_group),
                         ("tensor-parallel", ps.get_tensor_model_parallel_group)):
        try:
            ranks = dist.get_process_group_ranks(getter())
        except (AssertionError, RuntimeError, ValueError):
            continue
        if len(ranks) > 1:
            out.append((name, ranks))
    return out


def probe_peers(rank: int, world_size: int, seconds: float = PROBE_SECONDS) -> tuple[Optional[list[int]], str]:
    """(ranks that did not report within `seconds`, or None if the store is unreachable; a note).
    Never raises."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=seconds))
        store.set(f"{_PROBE_PREFIX}{rank}", str(os.getpid()))
    except Exception as e:  # noqa: BLE001 - any failure here is itself the answer
        return None, f"{type(e).__name__}: {e}"
    missing = [r for r in range(world_size) if r != rank]
    deadline = time.monotonic() + seconds
    while missing and time.monotonic() < deadline:
        try:
            missing = [r for r in missing if not store.check([f"{_PROBE_PREFIX}{r}"])]
        except Exception as e:  # noqa: BLE001
            return None, f"{type(e).__name__}: {e}"
        if missing:
            time.sleep(0.2)
    return missing, ""


def describe_collective_failure(exc: BaseException, doing: str, ranks: list[RankInfo]) -> str:
    """Collective-free. What this rank was doing, the error, its groups, and who did not answer."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = len(ranks)
    me = ranks[rank] if rank < world else None
    lines = [f"{me.where() if me else f'rank {rank}'}: a collective failed during {doing}: "
             f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"]
    for name, members in _groups_of_this_rank():
        who = ", ".join(f"{r} ({ranks[r].node})" if r < world else str(r) for r in members)
        lines.append(f"  its {name} group: ranks {who}")
    missing, note = probe_peers(rank, world)
    if missing is None:
        host = ranks[0].where() if ranks else "rank 0"
        lines.append(f"  the rendezvous store in rank 0's process is unreachable ({note}): "
                     f"{host} has failed or its node is lost")
    elif missing:
        lines.append(f"  not answering after {PROBE_SECONDS:g} s (failed, or their node is lost): "
                     + "; ".join(ranks[r].where() for r in missing))
    else:
        lines.append(f"  every rank answered within {PROBE_SECONDS:g} s (a timeout or a library error, "
                     "not a lost rank)")
    return "\n".join(lines)
