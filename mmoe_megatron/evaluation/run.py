"""Evaluate a checkpoint at a list of ks and per-layer k vectors.

    python -m mmoe_megatron.evaluation.run --run runs/tiny --ks 1,2,4,8 --layer-ks 1,2,3,4
    python -m mmoe_megatron.evaluation.run --run runs/X --ks 1,2,4,8 --widths 0.25,0.5,1 --point "[1,2,4,8]@[1,0.5,0.5,0.25]"
    torchrun --nproc-per-node 2 -m mmoe_megatron.evaluation.run --run runs/tiny --parallel.expert=2

Reads the run's resolved config (`<run>/config.yaml`) and its latest complete checkpoint (or
`--checkpoint`), loads the weights into a model of this launch's layout (any expert-parallel
size), and writes eval.json, eval.md and eval.png to `<run>/eval` (or `--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mmoe_megatron.config import ExperimentConfig, load_config, parse_overrides
from mmoe_megatron.config.derive import expert_columns
from mmoe_megatron.evaluation.core import EvalPoint, KSpec, evaluate, grid_spec, parse_spec, split_spec


def run_config(run: str, overrides=(), world_size: Optional[int] = None) -> ExperimentConfig:
    """The run's resolved config, fitted to this launch: evaluation may use another number of
    ranks than training did (weights are stored layout-free), so unless `parallel.expert` is
    overridden it becomes the largest size that divides both the training value and the world."""
    path = os.path.join(run, "config.yaml") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass a run directory written by training, or its config.yaml")
    overrides = list(overrides)
    # The checkpoint decides the weights; evaluation never resumes optimizer state.
    cfg = load_config(path, overrides + [("checkpoint.load", None)])
    world = world_size if world_size is not None else distributed_world_size()
    layout = []
    if not any(k == "parallel.expert" for k, _ in overrides):
        layout.append(("parallel.expert", math.gcd(cfg.parallel.expert, world)))
    step = cfg.train.micro_batch_size * world
    if cfg.train.global_batch_size % step:
        # Only the default number of evaluation samples depends on it; keep that count close.
        layout.append(("train.global_batch_size", max(step, cfg.train.global_batch_size // step * step)))
    if layout:
        cfg = load_config(path, overrides + [("checkpoint.load", None)] + layout)
    return cfg


def distributed_world_size() -> int:
    from mmoe_megatron.distributed import env_from_os

    return env_from_os().world_size


def latest_checkpoint(cfg: ExperimentConfig) -> str:
    from mmoe_megatron.training.checkpoint import find_resume_checkpoint

    tag = find_resume_checkpoint(cfg.checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {cfg.checkpoint_dir}; train first or pass --checkpoint")
    return os.path.join(cfg.checkpoint_dir, tag)


def load_model(cfg: ExperimentConfig, checkpoint: str, vocab_size: int):
    """This rank's share of the checkpoint's model, in any expert-parallel layout."""
    from mmoe_megatron.model import build_model
    from mmoe_megatron.training.checkpoint import load_global_state_dict, load_weights_into

    model = build_model(cfg, vocab_size)
    load_weights_into(model, cfg, load_global_state_dict(checkpoint))
    if torch.cuda.is_available():
        model = model.cuda()
        if cfg.train.precision == "bf16":
            model = model.bfloat16()
    return model


def evaluate_checkpoint(
    cfg: ExperimentConfig, checkpoint: str, ks: Sequence[KSpec], num_samples: Optional[int] = None,
    split: str = "valid", analysis: bool = True,
) -> tuple[list[EvalPoint], Optional[dict]]:
    """Collective over the launch: loss, active parameters and FLOPs at each k spec, and (if
    `analysis`) the expert-ranking analysis of the same forwards."""
    from megatron.core import parallel_state as ps

    from mmoe_megatron.evaluation.analysis import RoutingProbe, reference_label

    model, vocab, dataset = load_for_eval(cfg, checkpoint, num_samples, split)
    device = next(model.parameters()).device
    reference = reference_label(ks) if analysis else None
    probe = RoutingProbe(model) if reference is not None else None
    if probe is not None and not probe.routers:
        probe = None  # a dense model: nothing to analyse
    n = num_samples or cfg.train.eval_iters * cfg.train.global_batch_size
    group = ps.get_data_parallel_group()
    with probe if probe is not None else _nothing():
        points = evaluate(
            model, cfg, vocab, dataset, ks, n, ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size(), device, causal_mask(cfg.data.seq_length, device),
            group=group, probe=probe,
        )
    summary = {"reference": reference, "by_k": probe.summary(reference, group)} if probe else None
    return points, summary


def load_for_eval(cfg: ExperimentConfig, checkpoint: str, num_samples: Optional[int], split: str = "valid"):
    """(model with the checkpoint's weights, vocab size, the evaluation dataset)."""
    from mmoe_megatron.data import build_datasets, resolve_vocab_size

    vocab = resolve_vocab_size(cfg)
    model = load_model(cfg, checkpoint, vocab)
    n = num_samples or cfg.train.eval_iters * cfg.train.global_batch_size
    datasets = build_datasets(cfg, train_samples=1, valid_samples=n if split == "valid" else 0,
                              test_samples=n if split == "test" else 0)
    dataset = datasets[1 if split == "valid" else 2]
    if dataset is None:
        raise ValueError(f"the config's data.split gives no {split} set; change data.split or data.valid_blend")
    return model, vocab, dataset


@contextlib.contextmanager
def _nothing():
    yield


def causal_mask(seq_length: int, device):
    from mmoe_megatron.training.trainer import causal_mask as mask

    return mask(seq_length, device)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Validation loss of a checkpoint at many ks.")
    p.add_argument("--run", required=True, help="run directory (or its config.yaml)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: latest complete)")
    p.add_argument("--ks", default=None, help="comma-separated ks (default: all ks from 1 to the number of experts)")
    p.add_argument("--layer-ks", action="append", default=[], help="a per-layer k vector, e.g. 1,2,3,4 (repeatable)")
    p.add_argument("--widths", default=None,
                   help="expert widths at which every k of --ks is evaluated too, e.g. 0.25,0.5 (slimmable experts)")
    p.add_argument("--point", action="append", default=[],
                   help='a (k, width) point, e.g. 2@0.5 or "[1,2,4,8]@[1,0.5,0.5,0.25]" (repeatable)')
    p.add_argument("--num-samples", type=int, default=None, help="validation samples (default eval_iters x global batch)")
    p.add_argument("--split", choices=["valid", "test"], default="valid")
    p.add_argument("--out", default=None, help="output directory (default <run>/eval)")
    p.add_argument("--no-analysis", action="store_true", help="skip the expert-ranking analysis")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    from mmoe_megatron import distributed
    from mmoe_megatron.evaluation.report import markdown_table, write_report

    cfg = run_config(args.run, parse_overrides(rest))
    ks: list[KSpec] = ([int(k) for k in args.ks.split(",")] if args.ks
                       else list(range(1, cfg.moe.num_experts + 1)))
    ks += [[int(x) for x in v.strip("[]").split(",")] for v in args.layer_ks]
    widths = [float(w) for w in args.widths.split(",")] if args.widths else []
    uniform = [k for k in ks if isinstance(k, int)]
    ks += [grid_spec(k, w) for w in widths if w != 1.0 for k in uniform] + [parse_spec(t) for t in args.point]
    for spec in ks:  # before any weight is loaded
        try:
            expert_columns(cfg, split_spec(spec)[1])
        except ValueError as e:
            raise SystemExit(f"evaluation: {e}") from None
    distributed.init_distributed(cfg)
    try:
        checkpoint = args.checkpoint or latest_checkpoint(cfg)
        points, analysis = evaluate_checkpoint(cfg, checkpoint, ks, args.num_samples, args.split,
                                               analysis=not args.no_analysis)
        if dist.get_rank() == 0:
            out = args.out or os.path.join(cfg.run_dir, "eval")
            paths = write_report(points, out, cfg.name, {"checkpoint": checkpoint, "split": args.split},
                                 analysis)
            print(markdown_table(points, title=f"{cfg.name} ({os.path.basename(checkpoint)})"))
            print("wrote " + ", ".join(paths.values()))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
