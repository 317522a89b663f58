"""Training metrics: a console progress line, TensorBoard scalars and a JSONL record per step.

Only global rank 0 writes. `metrics.jsonl` in the run directory holds one JSON object per
logged step (`kind: train`), per evaluation (`kind: eval`) and per resume (`kind: resume`: the step
resumed from, the attempt number, the hosts). A resumed run logs again the steps it repeats since
its checkpoint (a crash after step 26 with a checkpoint at 20 logs 21-26 twice); the file keeps
both, and `read_metrics` (which every reader here uses) keeps the last record per step.
TensorBoard is told the same at each resume (`purge_step`), so it hides the repeated steps' old
points.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import torch

METRICS_FILE = "metrics.jsonl"


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
        self.run_dir = run_dir
        path = os.path.join(run_dir, METRICS_FILE)
        self.file = open(path, "a", buffering=1)
        if self.file.tell() and not _ends_with_newline(path):
            self.file.write("\n")  # a record cut short by a crash stays a line of its own
        self.tensorboard = tensorboard
        self._last_time = time.time()

    def _tb(self):
        """The TensorBoard writer, opened at first use so that a resume can set its purge step."""
        if self.writer is None and self.tensorboard:
            self._open_writer(purge_step=None)
        return self.writer

    def _open_writer(self, purge_step: Optional[int]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        self.writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"), purge_step=purge_step)

    def log_resume(self, step: int, path: str, hosts: list[str], **details) -> dict:
        """Mark a resume from the checkpoint of `step` at `path`, run by `hosts` (one per rank).
        The record's `attempt` is this run's launch number (1 = the first, fresh start)."""
        if not self.enabled:
            return {}
        attempt = 2 + sum(1 for r in read_records(self.run_dir) if r.get("kind") == "resume")
        record = {"kind": "resume", "step": step, "attempt": attempt, "checkpoint": path,
                  "hosts": hosts, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}
        self.file.write(json.dumps(record) + "\n")
        if self.tensorboard:
            # Points of steps after `step` written by the earlier attempt are hidden from now on.
            self._open_writer(purge_step=step + 1)
        return record

    def log_step(self, step: int, total_steps: int, scalars: dict, ks: dict[int, float],
                 expert_share: Optional[torch.Tensor]) -> None:
        if not self.enabled:
            return
        record = {"kind": "train", "step": step, **scalars,
                  "ks": {str(layer): k for layer, k in ks.items()}}
        writer = self._tb()
        if writer:
            for name, value in scalars.items():
                writer.add_scalar(f"train/{name}", value, step)
            for layer, k in ks.items():
                writer.add_scalar(f"k/layer_{layer}", k, step)
            if expert_share is not None:
                for layer, row in enumerate(expert_share):
                    for expert, share in enumerate(row.tolist()):
                        writer.add_scalar(f"expert_share/layer_{layer}/expert_{expert}", share, step)
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
        writer = self._tb()
        if writer:
            for k, value in losses.items():
                writer.add_scalar(f"{split}/loss_k{k}", value, step)
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


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_records(run_dir: str) -> list[dict]:
    """Every record of <run_dir>/metrics.jsonl in file order (empty if there is none yet). A last
    line cut short by a crash is skipped."""
    return read_jsonl(os.path.join(run_dir, METRICS_FILE))


def read_jsonl(path: str) -> list[dict]:
    """Every record of a JSON-lines file in order (empty if there is none); a line cut short by a
    crash is skipped."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def read_metrics(run_dir: str) -> dict:
    """metrics.jsonl as the run's history: `train` {step: record} and `eval` {(split, step): record},
    each the last record written for that step (a resumed run's re-run steps replace the earlier
    attempt's), and `resumes`, every resume record in order."""
    train, evals, resumes = {}, {}, []
    for record in read_records(run_dir):
        kind = record.get("kind")
        if kind == "train":
            train[record["step"]] = record
        elif kind == "eval":
            evals[(record.get("split", "valid"), record["step"])] = record
        elif kind == "resume":
            resumes.append(record)
    return {"train": dict(sorted(train.items())), "eval": dict(sorted(evals.items())), "resumes": resumes}
