"""Which samples each rank reads, as a pure function of (step, micro-batch, data-parallel rank).

Step `s` consumes samples [s * G, (s + 1) * G) of the training dataset (G = global batch size).
Within a step, micro-batch m of data-parallel rank d takes

    s * G + (m * dp_size + d) * micro_batch_size + [0, micro_batch_size)

the order megatron's pretraining sampler uses. The data position after a resume is therefore
just the step: nothing about the loader needs saving beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BatchLayout:
    global_batch_size: int
    micro_batch_size: int
    dp_size: int

    def __post_init__(self):
        per_step = self.micro_batch_size * self.dp_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global batch {self.global_batch_size} is not a multiple of micro batch "
                f"{self.micro_batch_size} x data-parallel size {self.dp_size}"
            )

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def sample_indices(self, step: int, microbatch: int, dp_rank: int) -> range:
        start = step * self.global_batch_size + (microbatch * self.dp_size + dp_rank) * self.micro_batch_size
        return range(start, start + self.micro_batch_size)


def collate(dataset, indices) -> dict[str, torch.Tensor]:
    """Stack megatron GPTDataset items (dicts of equal-shape tensors / arrays) into a batch."""
    items = [dataset[i] for i in indices]
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        out[key] = torch.stack([torch.as_tensor(np.asarray(item[key])) for item in items])
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["position_ids"] = out["position_ids"].long()
    out["loss_mask"] = out["loss_mask"].float()
    return out
