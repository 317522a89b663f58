"""Learning-rate schedules: pure functions of the step, so a resumed run needs no scheduler state.

    warmup: linear from lr/warmup_iters to lr over the first `warmup_iters` steps
    cosine: half a cosine from lr to min_lr over the remaining steps
    linear: straight line from lr to min_lr
    constant: lr after warmup
    wsd: warmup-stable-decay; constant lr, then a linear decay to min_lr over the last
         `wsd_decay_fraction` of training (so a run can be extended by moving the decay)
"""

from __future__ import annotations

import math

from mmoe_megatron.config import OptimizerConfig


def lr_at(step: int, opt: OptimizerConfig, train_iters: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if opt.warmup_iters and step < opt.warmup_iters:
        return opt.lr * (step + 1) / opt.warmup_iters
    if opt.decay_style == "constant":
        return opt.lr
    if opt.decay_style == "wsd":
        decay_iters = max(1, round(opt.wsd_decay_fraction * train_iters))
        decay_start = train_iters - decay_iters
        if step < decay_start:
            return opt.lr
        progress = min(1.0, (step - decay_start + 1) / decay_iters)
        return opt.lr - (opt.lr - opt.min_lr) * progress
    span = max(1, train_iters - opt.warmup_iters)
    progress = min(1.0, (step - opt.warmup_iters) / span)
    if opt.decay_style == "linear":
        return opt.lr - (opt.lr - opt.min_lr) * progress
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * progress))
