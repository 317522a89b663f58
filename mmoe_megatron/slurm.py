"""Submit training runs and suites to Slurm: the sbatch scripts in `slurm/` with their #SBATCH
lines rendered from the experiment config and the flags given here.

    python -m mmoe_megatron.slurm submit --config configs/X.yaml [--nodes N] [--gpus-per-node G]
        [--time 2-00:00:00] [--partition P] [--account A] [--dry-run] [--section.field=value ...]
    python -m mmoe_megatron.slurm suite --suite configs/suites/S.yaml [same flags] [--dry-run]

`submit` runs slurm/train.sbatch: N nodes x G tasks, one task (one GPU) per rank. `suite` submits
slurm/suite_member.sbatch as an array job (task i trains member i) and slurm/suite_report.sbatch
with `--dependency=afterok:<array job id>`, which evaluates every member at every k and writes the
comparison. The rendered scripts are written beside the runs (`<run dir>/slurm/`) and submitted
from the current directory; `--dry-run` prints them and the sbatch commands and submits nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from mmoe_megatron.config import ConfigError, ExperimentConfig, load_config, parse_overrides

SLURM_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slurm")


@dataclass
class Resources:
    """What one job asks Slurm for. On GPU nodes there is one task per GPU (each task is one rank);
    `gpus_per_node: 0` runs `tasks_per_node` CPU ranks per node."""
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: Optional[int] = None
    time: Optional[str] = None
    """Slurm time limit, e.g. 2-00:00:00; the partition's default when None."""
    partition: Optional[str] = None
    account: Optional[str] = None
    signal_seconds: int = 300
    """SIGUSR1 this long before the time limit: long enough to finish a step and write a checkpoint."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def directives(self, signal: bool = True) -> list[str]:
        out = [f"--nodes={self.nodes}", f"--ntasks-per-node={self.tasks_per_node}"]
        if self.gpus_per_node:
            out.append("--gpus-per-task=1")
        for name, value in (("cpus-per-task", self.cpus_per_task), ("time", self.time),
                            ("partition", self.partition), ("account", self.account)):
            if value is not None:
                out.append(f"--{name}={value}")
        if signal:
            # No `B:`: the signal goes to the job steps (the training ranks), not to the batch shell.
            out.append(f"--signal=USR1@{self.signal_seconds}")
        return out


def resources_for(cfg: ExperimentConfig, args: argparse.Namespace) -> Resources:
    """Resources from the flags, with the number of nodes defaulting to the fewest that hold one
    model replica with its expert-parallel group (tensor x pipeline x expert ranks)."""
    if args.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise ValueError(f"--tasks-per-node {args.tasks_per_node} differs from --gpus-per-node "
                         f"{args.gpus_per_node}: every rank drives one GPU; leave --tasks-per-node out")
    per_node = args.gpus_per_node or args.tasks_per_node or 1
    p = cfg.parallel
    smallest_world = p.tensor * p.pipeline * p.expert
    if (args.nodes is not None and args.nodes < 1) or args.signal_seconds < 1 or per_node < 1:
        raise ValueError("--nodes, --tasks-per-node and --signal-seconds must be positive")
    nodes = args.nodes or -(-smallest_world // per_node)
    res = Resources(nodes=nodes, tasks_per_node=per_node, gpus_per_node=args.gpus_per_node,
                    cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                    account=args.account, signal_seconds=args.signal_seconds)
    check_world(cfg, res.world_size)
    return res


def check_world(cfg: ExperimentConfig, world_size: int) -> None:
    """The layout checks the ranks will run at start-up, here before queueing. Tensor and
    pipeline ranks are folded into one model-parallel size: the submitting host usually has no GPU,
    and `check_layout` rejects tensor parallelism without one."""
    from mmoe_megatron.distributed import check_layout

    p = cfg.parallel
    folded = dataclasses.replace(p, tensor=1, pipeline=p.tensor * p.pipeline)
    check_layout(dataclasses.replace(cfg, parallel=folded), world_size)


def render(template: str, directives: list[str]) -> str:
    """The sbatch script `template` (a file in slurm/) with `directives` replacing its #SBATCH lines
    of the same option; its other #SBATCH lines are kept, in place."""
    with open(os.path.join(SLURM_DIR, template)) as f:
        lines = f.read().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    ours = {d.split("=", 1)[0] for d in directives}
    kept = [line for line in lines if not line.startswith("#SBATCH") or line.split()[1].split("=", 1)[0] not in ours]
    header = [f"#SBATCH {d}" for d in directives]
    return "\n".join(kept[:first] + ["# Rendered by `python -m mmoe_megatron.slurm`."] + header + kept[first:]) + "\n"


class Submitter:
    """Writes rendered scripts and runs sbatch, or with dry_run prints both and does neither."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        # The job runs this interpreter (the environment the submit ran in) and finds common.sh here.
        self.env = {"PYTHON": sys.executable, "MMOE_SLURM_DIR": SLURM_DIR}

    def write(self, path: str, text: str) -> None:
        if self.dry_run:
            print(f"# ---- {path}\n{text}# ----")
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def sbatch(self, args: list[str], placeholder: str) -> str:
        """The job id sbatch gives (or `placeholder` in a dry run)."""
        cmd = ["sbatch", "--parsable", *args]
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items()) + " " + shlex.join(cmd)
        print(("would run: " if self.dry_run else "+ ") + shown, flush=True)
        if self.dry_run:
            return placeholder
        proc = subprocess.run(cmd, env={**os.environ, **self.env}, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch exited with {proc.returncode} (its message is above)")
        # --parsable prints `id` or `id;cluster`; with --wait, the line comes first.
        return proc.stdout.strip().splitlines()[0].split(";")[0]


def submit_train(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = load_config(args.config, parse_overrides(overrides))
    res = resources_for(cfg, args)
    out_dir = os.path.join(cfg.run_dir, "slurm")
    script = os.path.join(out_dir, "train.sbatch")
    directives = [f"--job-name={args.job_name or cfg.name}", *res.directives(),
                  f"--output={out_dir}/%x-%j.out"]
    sub = Submitter(args.dry_run)
    sub.write(script, render("train.sbatch", directives))
    job = sub.sbatch((["--wait"] if args.wait else []) + [script, args.config, *overrides], "<job id>")
    print(f"training job {job}: {res.nodes} node(s) x {res.tasks_per_node} rank(s), log {out_dir}/")
    return 0


def submit_suite(args: argparse.Namespace) -> int:
    from mmoe_megatron.evaluation.suite import load_suite, run_config, runs

    spec = load_suite(args.suite)
    suite_runs = runs(spec)
    configs = [run_config(spec, r) for r in suite_runs]
    res = resources_for(configs[0], args)
    for cfg in configs[1:]:
        check_world(cfg, res.world_size)
    out_dir = os.path.join(spec.runs_dir, spec.name, "slurm")
    name = args.job_name or spec.name
    sub = Submitter(args.dry_run)

    member_script = os.path.join(out_dir, "suite_member.sbatch")
    sub.write(member_script, render("suite_member.sbatch", [
        f"--job-name={name}", *res.directives(), f"--array=0-{len(suite_runs) - 1}",
        f"--output={out_dir}/%x-%A_%a.out"]))
    array = sub.sbatch([member_script, args.suite], "<array job id>")

    report_script = os.path.join(out_dir, "suite_report.sbatch")
    # No pre-limit signal: evaluation has no checkpoint to write and SIGUSR1 would kill it.
    # kill-on-invalid-dep: if a member fails, the report job is cancelled instead of pending forever.
    sub.write(report_script, render("suite_report.sbatch", [
        f"--job-name={name}-report", *res.directives(signal=False), f"--dependency=afterok:{array}",
        "--kill-on-invalid-dep=yes", f"--output={out_dir}/%x-%j.out"]))
    report = sub.sbatch((["--wait"] if args.wait else []) + [report_script, args.suite], "<report job id>")
    members = ", ".join(f"{i}={r.label}" for i, r in enumerate(suite_runs))
    print(f"array job {array} trains {members}; job {report} evaluates and compares them into "
          f"{os.path.join(spec.runs_dir, spec.name, 'report')}/; logs in {out_dir}/")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Submit training or a suite to Slurm.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, what in (("submit", "--config"), ("suite", "--suite")):
        p = sub.add_parser(command, epilog="Config overrides (submit only): --train.lr=3e-4 ...")
        p.add_argument(what, required=True, help="experiment YAML" if command == "submit" else "suite YAML")
        p.add_argument("--nodes", type=int, default=None,
                       help="default: the fewest that hold tensor x pipeline x expert ranks")
        p.add_argument("--gpus-per-node", type=int, default=8, help="one rank per GPU; 0 for CPU nodes")
        p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node on CPU nodes")
        p.add_argument("--cpus-per-task", type=int, default=None)
        p.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00")
        p.add_argument("--partition", default=None)
        p.add_argument("--account", default=None)
        p.add_argument("--signal-seconds", type=int, default=300,
                       help="SIGUSR1 this many seconds before the limit (checkpoint, exit, requeue)")
        p.add_argument("--job-name", default=None)
        p.add_argument("--wait", action="store_true",
                       help="wait for the (last) job to finish; exit non-zero if it failed")
        p.add_argument("--dry-run", action="store_true", help="print the scripts and commands; submit nothing")
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "submit":
            return submit_train(args, rest)
        if rest:
            raise ValueError(f"unexpected arguments {rest}; a suite's overrides go in its YAML")
        return submit_suite(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
