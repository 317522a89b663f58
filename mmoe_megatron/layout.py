"""Names of parameters in the global (unsharded) model, whatever the parallel layout.

Under expert parallelism each rank holds `num_local_experts` experts, numbered locally from 0;
global expert = ep_rank * num_local_experts + local index. Two megatron-core layouts exist:
  SequentialMLP:  ...mlp.experts.local_experts.<j>.linear_fc1.weight
  grouped GEMM:   ...mlp.experts.linear_fc1.weight<j>
`global_name` rewrites either to the global expert number; `local_name` does the reverse.
"""

from __future__ import annotations

import re
from typing import Optional

_SEQUENTIAL = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)")
_GROUPED = re.compile(r"(\.mlp\.experts\.linear_fc[12]\.weight)(\d+)$")


def expert_index(name: str) -> Optional[int]:
    """The (local) expert number in a parameter name, or None for non-expert parameters."""
    m = _SEQUENTIAL.search(name) or _GROUPED.search(name)
    return int(m.group(2)) if m else None


def _renumber(name: str, fn) -> str:
    m = _SEQUENTIAL.search(name)
    if m:
        return name[: m.start(2)] + str(fn(int(m.group(2)))) + name[m.end(2) :]
    m = _GROUPED.search(name)
    if m:
        return name[: m.start(2)] + str(fn(int(m.group(2))))
    return name


def global_name(name: str, ep_rank: int, num_local_experts: int) -> str:
    return _renumber(name, lambda j: ep_rank * num_local_experts + j)


def local_name(name: str, ep_rank: int, num_local_experts: int) -> Optional[str]:
    """The local name of a global parameter on rank `ep_rank`, or None if another rank owns it."""
    index = expert_index(name)
    if index is None:
        return name
    if index // num_local_experts != ep_rank:
        return None
    return _renumber(name, lambda g: g - ep_rank * num_local_experts)


def is_expert_param(name: str) -> bool:
    return expert_index(name) is not None


def sequential_name(name: str) -> str:
    """The SequentialMLP form of a grouped-GEMM expert name (others unchanged): both layouts
    hold the same [out, in] matrix per expert, so weights drawn from this name are the same in
    either layout."""
    m = _GROUPED.search(name)
    if not m:
        return name
    fc = m.group(1).rsplit(".", 2)[-2]  # linear_fc1 / linear_fc2
    return name[: m.start(1)] + f".mlp.experts.local_experts.{m.group(2)}.{fc}.weight"
