"""Training metrics: a console progress line, TensorBoard scalars and a JSONL record per step.

Only global rank 0 writes. `metrics.jsonl` in the run directory holds one JSON object per
logged step (and per evaluation), which is what tests and the demo read back.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import torch


def moe_aux_losses(num_microbatches: int, moe_layer_numbers: list[int],
                   dp_group=None) -> dict[str, float]:
    """Each MoE auxiliary loss of the last step, then reset: the mean over micro-batches, over the
    MoE layers and over data-parallel ranks, so the figure does not depend on the layout.

    Collective over `dp_group` (every rank must call it). megatron-core's tracker holds, per
    layer, the sum over this rank's micro-batches (and a partial value per tensor-parallel rank
    when its entry names a reduce group, which is summed first, as megatron's own logging does).
    """
    import torch.distributed as dist

    from mmoe_megatron import compat

    tracked = compat.moe_metrics_values()
    out = {}
    for name in sorted(tracked):
        values_L, reduce_group = tracked[name]
        values_L = values_L.detach().float().clone()
        if dist.is_initialized():
            if reduce_group is not None and dist.get_world_size(reduce_group) > 1:
                dist.all_reduce(values_L, group=reduce_group)
            if dist.get_world_size(dp_group) > 1:
                dist.all_reduce(values_L, group=dp_group)
                values_L /= dist.get_world_size(dp_group)
        per_layer = values_L[[n - 1 for n in moe_layer_numbers]] / num_microbatches
        out[name] = float(per_layer.mean())
    compat.clear_moe_metrics()
    return out


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self._last_time = time.time()

    def log_step(self, step: int, total_steps: int, scalars: dict, ks: dict[int, float],
                 expert_share: Optional[torch.Tensor]) -> None:
        if not self.enabled:
            return
        record = {"kind": "train", "step": step, **scalars,
                  "ks": {str(layer): k for layer, k in ks.items()}}
        if self.writer:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            for layer, k in ks.items():
                self.writer.add_scalar(f"k/layer_{layer}", k, step)
            if expert_share is not None:
                for layer, row in enumerate(expert_share):
                    for expert, share in enumerate(row.tolist()):
                        self.writer.add_scalar(f"expert_share/layer_{layer}/expert_{expert}", share, step)
        self.file.write(json.dumps(record) + "\n")
        ks_text = " ".join(f"{k:g}" for k in ks.values())
        print(
            f"step {step:>6}/{total_steps} | loss {scalars['loss']:.4f} | lr {scalars['lr']:.2e} | "
            f"grad {scalars['grad_norm']:.3f} | aux {scalars.get('load_balancing_loss', float('nan')):.4f} | "
            f"{scalars['tokens_per_s']:.0f} tok/s | k [{ks_text}]",
            flush=True,
        )

    def log_eval(self, step: int, losses: dict[str, float], split: str = "valid") -> None:
        if not self.enabled:
            return
        record = {"kind": "eval", "split": split, "step": step,
                  "loss": losses, "ppl": {k: math.exp(min(v, 50)) for k, v in losses.items()}}
        self.file.write(json.dumps(record) + "\n")
        if self.writer:
            for k, value in losses.items():
                self.writer.add_scalar(f"{split}/loss_k{k}", value, step)
        text = " | ".join(f"k={k}: {v:.4f}" for k, v in losses.items())
        print(f"eval  {step:>6} | {split} loss {text}", flush=True)

    def log_text(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.file:
            self.file.close()
