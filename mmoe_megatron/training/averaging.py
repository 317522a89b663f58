"""The uniform average of a run's weights over several checkpoints (checkpoint averaging).

Weights averaged over the end of training sit between the iterates the last steps move among,
and the loss of such a point is often lower and moves less from run to run than that of the last
iterate (fairseq's average_checkpoints, LAWA). The average is written as a folder of global-named
safetensors, which evaluation and export read wherever they take a checkpoint
(`python -m mmoe_megatron.evaluation.run --checkpoint DIR`, `python -m tools.export_hf --checkpoint DIR`).
Only weights are averaged; there is nothing to resume from it.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from mmoe_megatron.training.checkpoint import CheckpointError, load_global_state_dict
from mmoe_megatron.training.checkpoint_names import complete_checkpoints, step_of

AVERAGED = "averaged.json"
"""What an averaged folder was made of: the checkpoints, in order."""


def tail_checkpoints(ckpt_dir: str, last: Optional[int] = None, since_step: Optional[int] = None) -> list[str]:
    """Complete checkpoints of `ckpt_dir`, oldest first: the newest `last` of them, or those at
    `since_step` or later (both: both conditions)."""
    tags = complete_checkpoints(ckpt_dir)
    if since_step is not None:
        tags = [t for t in tags if (step_of(t) or 0) >= since_step]
    if last is not None:
        tags = tags[-last:] if last > 0 else []
    return [os.path.join(ckpt_dir, t) for t in tags]


def average_weights(checkpoints: Sequence[str]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the global weights of `checkpoints` (summed in float64, returned
    in each weight's own dtype). Every checkpoint must hold the same names, shapes and dtypes."""
    if not checkpoints:
        raise CheckpointError("no checkpoint to average; give at least one")
    sums: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    for i, path in enumerate(checkpoints):
        weights = load_global_state_dict(path)
        if i == 0:
            first = weights
            sums = {name: w.double() for name, w in weights.items() if w.is_floating_point()}
            continue
        if set(weights) != set(first):
            extra = sorted(set(weights) - set(first))[:3]
            missing = sorted(set(first) - set(weights))[:3]
            raise CheckpointError(f"{path} holds other weights than {checkpoints[0]} (extra {extra}, missing "
                                  f"{missing}): average checkpoints of one run only")
        for name, w in weights.items():
            ref = first[name]
            if w.shape != ref.shape or w.dtype != ref.dtype:
                raise CheckpointError(f"{name} is {tuple(w.shape)} {w.dtype} in {path} but {tuple(ref.shape)} "
                                      f"{ref.dtype} in {checkpoints[0]}: average checkpoints of one run only")
            if name in sums:
                sums[name] += w.double()
            elif not torch.equal(w, ref):
                raise CheckpointError(f"{name} ({w.dtype}) differs between {checkpoints[0]} and {path}; "
                                      "integer weights cannot be averaged")
    n = len(checkpoints)
    return {name: (sums[name] / n).to(ref.dtype) if name in sums else ref for name, ref in first.items()}


def write_average(checkpoints: Sequence[str], out: str) -> str:
    """Average `checkpoints` (`average_weights`) into `out/model/model.safetensors`, with the list
    of checkpoints in `out/averaged.json`; returns `out`."""
    weights = average_weights(checkpoints)
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    save_file({name: w.contiguous() for name, w in weights.items()}, os.path.join(out, "model", "model.safetensors"))
    with open(os.path.join(out, AVERAGED), "w") as f:
        json.dump({"checkpoints": [os.path.abspath(c) for c in checkpoints]}, f, indent=2)
    return out
