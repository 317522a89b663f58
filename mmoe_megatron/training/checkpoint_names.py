"""Names in a checkpoint directory, without torch: also read by the job scripts' retry decision
(`mmoe_megatron.requeue`), which runs between training attempts and must start quickly."""

from __future__ import annotations

import os
import re
from typing import Optional

LATEST = "latest"
MANIFEST = "COMPLETE.json"
STATE = "trainer_state.json"
_TAG = re.compile(r"step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> Optional[int]:
    """The step a checkpoint tag names (`step_00000100` -> 100), or None for another name."""
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def complete_checkpoints(ckpt_dir: str) -> list[str]:
    """Tags with a manifest, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(
        name for name in os.listdir(ckpt_dir)
        if name.startswith("step_") and os.path.isfile(os.path.join(ckpt_dir, name, MANIFEST))
    )


def newest_complete_step(ckpt_dir: str) -> Optional[int]:
    """The step of the newest checkpoint with a manifest in `ckpt_dir`, or None if there is none."""
    steps = [s for s in map(step_of, complete_checkpoints(ckpt_dir)) if s is not None]
    return max(steps) if steps else None
