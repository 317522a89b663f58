"""A suite: one elastic model, fixed-k specialists and a standard top-k model (and optionally
baselines), trained by the same code on the same data and token budget, then all evaluated at
every k and compared.

Suite file (YAML):
    name: demo-suite
    base: configs/tiny.yaml            # shared model, data, training budget
    overrides: {train.train_iters: 300} # applied to every member
    eval: {ks: [1, 2, 3, 4, 6, 8], layer_ks: [[1, 2, 3, 4]], num_samples: 256}
    members:
      - {name: elastic, role: elastic}                       # the base config as is
      - {name: k1, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [1],
                                                 matryoshka.normalization: softmax_topk}}
      - {name: top2, role: standard, overrides: {...}}

Commands (each runs the same entry points a user would):
    python -m mmoe_megatron.evaluation.suite train  --suite S.yaml [--member NAME|INDEX]
    python -m mmoe_megatron.evaluation.suite evaluate --suite S.yaml
    python -m mmoe_megatron.evaluation.suite report --suite S.yaml
    python -m mmoe_megatron.evaluation.suite run --suite S.yaml      # all three, in turn
Runs go to runs/<suite name>/<member>; the report to runs/<suite name>/report.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from mmoe_megatron.config import ConfigError, ExperimentConfig, load_config
from mmoe_megatron.config.base import from_dict
from mmoe_megatron.train import EXIT_PREEMPTED

ROLES = ("elastic", "specialist", "standard", "baseline")


@dataclass
class MemberSpec:
    name: str
    role: str = "elastic"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSpec:
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    layer_ks: list[list[int]] = field(default_factory=list)
    num_samples: Optional[int] = None


@dataclass
class SuiteSpec:
    name: str
    base: str
    members: list[MemberSpec]
    overrides: dict[str, Any] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    runs_dir: str = "runs"


def load_suite(path: str) -> SuiteSpec:
    with open(path) as f:
        data = yaml.safe_load(f)
    spec = from_dict(SuiteSpec, data)
    base = spec.base if os.path.isabs(spec.base) else os.path.join(_repo_root(path), spec.base)
    spec.base = base
    names = [m.name for m in spec.members]
    if len(set(names)) != len(names):
        raise ConfigError("members", f"member names must be unique, got {names}")
    for i, m in enumerate(spec.members):
        if m.role not in ROLES:
            raise ConfigError(f"members[{i}].role", f"got {m.role!r}; allowed: {', '.join(ROLES)}")
        member_config(spec, m)  # fail now, not after hours of training the previous members
    if not any(m.role == "elastic" for m in spec.members):
        raise ConfigError("members", "a suite needs one member with role: elastic")
    return spec


def _repo_root(suite_path: str) -> str:
    """Relative `base` paths are relative to the working directory if they exist there, else to
    the directory holding the suite's configs/ folder."""
    here = os.path.dirname(os.path.abspath(suite_path))
    while here != os.path.dirname(here):
        if os.path.isdir(os.path.join(here, "configs")):
            return here
        here = os.path.dirname(here)
    return os.getcwd()


def member_dir(spec: SuiteSpec, member: MemberSpec) -> str:
    return os.path.join(spec.runs_dir, spec.name, member.name)


def member_overrides(spec: SuiteSpec, member: MemberSpec) -> list[tuple[str, object]]:
    return ([(k, v) for k, v in spec.overrides.items()] + [(k, v) for k, v in member.overrides.items()]
            + [("name", f"{spec.name}-{member.name}"), ("logging.dir", member_dir(spec, member))])


def member_config(spec: SuiteSpec, member: MemberSpec) -> ExperimentConfig:
    return load_config(spec.base, member_overrides(spec, member))


def select(spec: SuiteSpec, which: Optional[str]) -> list[MemberSpec]:
    if which is None:
        return list(spec.members)
    if which.isdigit():
        index = int(which)
        if index >= len(spec.members):
            raise ConfigError("member", f"index {index} out of range (suite has {len(spec.members)})")
        return [spec.members[index]]
    found = [m for m in spec.members if m.name == which]
    if not found:
        raise ConfigError("member", f"no member {which!r}; members: {[m.name for m in spec.members]}")
    return found


def train_member(spec: SuiteSpec, member: MemberSpec, launcher: str) -> int:
    """Train one member with the user-facing entry point (resumes if it was interrupted)."""
    args = [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in member_overrides(spec, member)]
    cmd = shlex.split(launcher) + ["-m", "mmoe_megatron.train", "--config", spec.base] + args
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.call(cmd)


def training_flops(cfg: ExperimentConfig, vocab_size: int) -> float:
    """Training FLOPs of a member: 3 x forward FLOPs at its expected k, times tokens trained."""
    from mmoe_megatron.config.derive import flops_per_token
    from mmoe_megatron.schedule import KSchedule

    schedule = KSchedule.from_config(cfg.matryoshka, cfg.k_seed)
    per_token = sum(p * flops_per_token(cfg, vocab_size, k) for k, p in zip(schedule.ks, schedule.probs))
    tokens = cfg.train.train_iters * cfg.train.global_batch_size * cfg.data.seq_length
    return 3.0 * per_token * tokens


def evaluate_members(spec: SuiteSpec) -> None:
    """Evaluate every member at every k (collective under a launcher); writes <member>/eval."""
    import torch.distributed as dist

    from mmoe_megatron import distributed
    from mmoe_megatron.data import resolve_vocab_size
    from mmoe_megatron.evaluation.report import write_report
    from mmoe_megatron.evaluation.run import evaluate_checkpoint, latest_checkpoint, run_config

    ks = list(spec.eval.ks) + [list(v) for v in spec.eval.layer_ks]
    first = run_config(member_dir(spec, spec.members[0]))
    distributed.init_distributed(first)
    try:
        for member in spec.members:
            cfg = run_config(member_dir(spec, member))
            checkpoint = latest_checkpoint(cfg)
            points, analysis = evaluate_checkpoint(cfg, checkpoint, ks, spec.eval.num_samples)
            if dist.get_rank() == 0:
                meta = {"checkpoint": checkpoint, "role": member.role,
                        "training_flops": training_flops(cfg, resolve_vocab_size(cfg))}
                write_report(points, os.path.join(member_dir(spec, member), "eval"), member.name, meta,
                             analysis)
                print(f"evaluated {member.name}", flush=True)
    finally:
        distributed.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train, evaluate and compare a suite of models.")
    parser.add_argument("command", choices=["train", "evaluate", "report", "run"])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--member", default=None, help="train only this member (name or index)")
    parser.add_argument("--launcher", default=f"{sys.executable} -m torch.distributed.run --nproc-per-node 1",
                        help="command that starts the training processes")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    spec = load_suite(args.suite)
    if args.command in ("train", "run"):
        for member in select(spec, args.member):
            code = train_member(spec, member, args.launcher)
            if code == EXIT_PREEMPTED:
                print(f"training {member.name} stopped on a signal after a checkpoint (exit code "
                      f"{code}); run the same command again to resume it", file=sys.stderr)
                return code
            if code != 0:
                print(f"training {member.name} failed with exit code {code}", file=sys.stderr)
                return code
    if args.command in ("evaluate", "run"):
        evaluate_members(spec)
    if args.command in ("report", "run"):
        from mmoe_megatron.evaluation.compare import write_comparison

        paths = write_comparison(spec)
        print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
