"""Submit training runs and suites to Slurm: the sbatch scripts in `slurm/` with their #SBATCH
lines rendered from the experiment config and the flags given here.

    python -m mmoe_megatron.slurm submit --config configs/X.yaml [--nodes N] [--gpus-per-node G]
        [--time 2-00:00:00] [--partition P] [--account A] [--dry-run] [--section.field=value ...]
    python -m mmoe_megatron.slurm suite --suite configs/suites/S.yaml [same flags] [--dry-run]

`submit` runs slurm/train.sbatch: N nodes x G tasks, one task (one GPU) per rank. `suite` submits
slurm/suite_member.sbatch as an array job (task i trains the suite's run i, a member and seed) and
slurm/suite_report.sbatch with `--dependency=afterok:<array job id>`, which evaluates every run at
every k and writes the comparison. The rendered scripts are written beside the runs (`<run dir>/slurm/`) and submitted
from the current directory; `--dry-run` prints them and the sbatch commands and submits nothing.

Before queueing, the request is checked against the partition (`scontrol show partition`,
`sinfo`): more nodes than it has, or GPUs its nodes lack, would leave the job pending for ever or
be refused by sbatch with a message that does not name the flag. A failed sbatch leaves no
rendered script behind. `--max-retries` bounds the requeues after failures (mmoe_megatron/requeue.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from mmoe_megatron.config import ConfigError, ExperimentConfig, load_config, parse_overrides
from mmoe_megatron.requeue import MAX_RETRIES_ENV

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
    check_world(cfg, res.world_size, world_from(res, args))
    return res


def world_from(res: Resources, args: argparse.Namespace) -> str:
    """Where the world size comes from, in the flags' terms (for error messages)."""
    if res.gpus_per_node:
        default = " (the default)" if args.gpus_per_node == GPUS_PER_NODE_DEFAULT else ""
        per = f"{res.gpus_per_node} ranks per node from --gpus-per-node {res.gpus_per_node}{default}"
        hint = "; on CPU nodes pass --gpus-per-node 0 --tasks-per-node N"
    else:
        per = f"{res.tasks_per_node} ranks per node from --tasks-per-node"
        hint = ""
    return f"world size {res.world_size} = {res.nodes} node(s) x {per}{hint}"


def check_world(cfg: ExperimentConfig, world_size: int, origin: str = "") -> None:
    """The layout checks the ranks will run at start-up, here before queueing. Tensor and
    pipeline ranks are folded into one model-parallel size: the submitting host usually has no GPU,
    and `check_layout` rejects tensor parallelism without one. `origin` says where the world
    size came from; it is added to the error."""
    from mmoe_megatron.distributed import check_layout

    p = cfg.parallel
    folded = dataclasses.replace(p, tensor=1, pipeline=p.tensor * p.pipeline)
    try:
        check_layout(dataclasses.replace(cfg, parallel=folded), world_size)
    except ConfigError as e:
        if not origin:
            raise
        raise ConfigError(e.path, f"{e.problem} ({origin})") from None


# --- the partition ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    name: str
    total_nodes: int
    max_nodes: Optional[int]
    """The partition's MaxNodes per job; None when UNLIMITED."""
    gpus_per_node: int
    """GPUs (gpu GRES) of its node with the fewest."""


def _gpus(gres: str) -> int:
    """GPUs in a node's GRES string, e.g. `gpu:8`, `gpu:a100:4(S:0-1)`, `(null)`."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def query_partition(name: Optional[str]) -> tuple[Optional[Partition], str]:
    """(the partition `name`, or the default one; None and why if the cluster cannot be asked)."""
    def ask(cmd):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise OSError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
        return proc.stdout

    try:
        listing = ask(["scontrol", "-o", "show", "partition"] + ([name] if name else []))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"`scontrol show partition` failed: {e}"
    fields = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in listing.splitlines()]
    chosen = [f for f in fields if name or f.get("Default") == "YES"]
    if not chosen:
        return None, "the cluster has no default partition"
    part = chosen[0]
    try:
        gres = ask(["sinfo", "-h", "-N", "-p", part["PartitionName"], "-o", "%G"]).split()
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"`sinfo` failed: {e}"
    max_nodes = part.get("MaxNodes", "UNLIMITED")
    return Partition(name=part["PartitionName"], total_nodes=int(part.get("TotalNodes", 0)),
                     max_nodes=None if max_nodes == "UNLIMITED" else int(max_nodes),
                     gpus_per_node=min((_gpus(g) for g in gres), default=0)), ""


def check_partition(res: Resources, part: Partition, gpus_flag_is_default: bool) -> None:
    """ValueError, with the numbers, for a request `part` can never run."""
    where = f"partition {part.name}"
    if res.nodes > part.total_nodes:
        raise ValueError(f"--nodes {res.nodes}: {where} has {part.total_nodes} node(s), so the job would "
                         f"pend for ever (PartitionNodeLimit); ask for at most {part.total_nodes} or "
                         "pick another --partition")
    if part.max_nodes is not None and res.nodes > part.max_nodes:
        raise ValueError(f"--nodes {res.nodes}: {where} allows at most {part.max_nodes} node(s) per job "
                         "(MaxNodes); ask for fewer or pick another --partition")
    if res.gpus_per_node > part.gpus_per_node:
        default = " (the default)" if gpus_flag_is_default else ""
        have = f"{part.gpus_per_node} GPUs" if part.gpus_per_node else "no GPUs (no gpu GRES)"
        raise ValueError(f"--gpus-per-node {res.gpus_per_node}{default}: the nodes of {where} have {have}. "
                         + ("On CPU nodes pass --gpus-per-node 0 --tasks-per-node N (ranks per node)"
                            if not part.gpus_per_node else f"Pass --gpus-per-node {part.gpus_per_node} or less"))


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

    def __init__(self, dry_run: bool, max_retries: Optional[int] = None):
        self.dry_run = dry_run
        # The job runs this interpreter (the environment the submit ran in) and finds common.sh here.
        self.env = {"PYTHON": sys.executable, "MMOE_SLURM_DIR": SLURM_DIR}
        if max_retries is not None:
            self.env[MAX_RETRIES_ENV] = str(max_retries)
        self._made: dict[str, Optional[str]] = {}

    def write(self, path: str, text: str) -> None:
        if self.dry_run:
            print(f"# ---- {path}\n{text}# ----")
            return
        folder = os.path.dirname(os.path.abspath(path))
        # The topmost folder this creates, removed again with the script if sbatch refuses it.
        top = folder
        while not os.path.exists(os.path.dirname(top)):
            top = os.path.dirname(top)
        self._made[path] = None if os.path.exists(folder) else top
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def _remove(self, path: str) -> None:
        if os.path.exists(path):
            os.remove(path)
        top = self._made.get(path)
        if top:
            folder = os.path.dirname(os.path.abspath(path))
            while folder != os.path.dirname(top) and os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
                folder = os.path.dirname(folder)

    def sbatch(self, args: list[str], placeholder: str, script: str, wait: bool = False) -> str:
        """Submit `script` (the rendered file, removed again if sbatch refuses it) with `args`;
        returns the job id (or `placeholder` in a dry run). With `wait`, the id is printed as soon
        as the job is queued and this returns when it has ended; RuntimeError if it failed."""
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items()) + " " + shlex.join(cmd)
        print(("would run: " if self.dry_run else "+ ") + shown, flush=True)
        if self.dry_run:
            return placeholder
        proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=subprocess.PIPE, text=True)
        # --parsable prints `id` or `id;cluster` once the job is queued; with --wait, sbatch then
        # stays until the job has ended.
        first = proc.stdout.readline().strip()
        job = first.split(";")[0] if first else ""
        if job and wait:
            print(f"job {job} queued; waiting for it to end (`scancel --signal=USR1 {job}` makes it "
                  "checkpoint and requeue)", flush=True)
        proc.stdout.read()
        code = proc.wait()
        if not job:
            self._remove(script)
            raise RuntimeError(f"sbatch exited with {code} (its message is above); nothing was queued "
                               f"and {script} was removed")
        if code != 0:
            raise RuntimeError(f"job {job} ended with exit code {code}")
        return job


def check_cluster(res: Resources, args: argparse.Namespace) -> None:
    """Refuse (ValueError) what the partition cannot run; say so when the cluster cannot be asked."""
    part, why = query_partition(args.partition)
    if part is None:
        print(f"note: the partition was not checked ({why})", file=sys.stderr)
        return
    check_partition(res, part, args.gpus_per_node == GPUS_PER_NODE_DEFAULT)


def submit_train(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = load_config(args.config, parse_overrides(overrides))
    res = resources_for(cfg, args)
    check_cluster(res, args)
    out_dir = os.path.join(cfg.run_dir, "slurm")
    script = os.path.join(out_dir, "train.sbatch")
    directives = [f"--job-name={args.job_name or cfg.name}", *res.directives(),
                  f"--output={out_dir}/%x-%j.out"]
    sub = Submitter(args.dry_run, args.max_retries)
    sub.write(script, render("train.sbatch", directives))
    what = f"{res.nodes} node(s) x {res.tasks_per_node} rank(s), log {out_dir}/"
    if not args.wait:
        job = sub.sbatch([script, args.config, *overrides], "<job id>", script)
        print(f"training job {job}: {what}")
        return 0
    job = sub.sbatch([script, args.config, *overrides], "<job id>", script, wait=True)
    print(f"training job {job} ended: {what}")
    return 0


def submit_suite(args: argparse.Namespace) -> int:
    from mmoe_megatron.evaluation.suite import load_suite, run_config, runs

    spec = load_suite(args.suite)
    suite_runs = runs(spec)
    configs = [run_config(spec, r) for r in suite_runs]
    res = resources_for(configs[0], args)
    for cfg in configs[1:]:
        check_world(cfg, res.world_size, world_from(res, args))
    check_cluster(res, args)
    out_dir = os.path.join(spec.runs_dir, spec.name, "slurm")
    name = args.job_name or spec.name
    sub = Submitter(args.dry_run, args.max_retries)

    member_script = os.path.join(out_dir, "suite_member.sbatch")
    sub.write(member_script, render("suite_member.sbatch", [
        f"--job-name={name}", *res.directives(), f"--array=0-{len(suite_runs) - 1}",
        f"--output={out_dir}/%x-%A_%a.out"]))
    array = sub.sbatch([member_script, args.suite], "<array job id>", member_script)

    report_script = os.path.join(out_dir, "suite_report.sbatch")
    # No pre-limit signal: evaluation has no checkpoint to write and SIGUSR1 would kill it.
    # kill-on-invalid-dep: if a member fails, the report job is cancelled instead of pending forever.
    sub.write(report_script, render("suite_report.sbatch", [
        f"--job-name={name}-report", *res.directives(signal=False), f"--dependency=afterok:{array}",
        "--kill-on-invalid-dep=yes", f"--output={out_dir}/%x-%j.out"]))
    try:
        report = sub.sbatch([report_script, args.suite], "<report job id>", report_script, wait=args.wait)
    except RuntimeError as e:
        raise RuntimeError(f"{e}; the array job {array} is queued (scancel {array} to stop it)") from None
    members = ", ".join(f"{i}={r.label}" for i, r in enumerate(suite_runs))
    print(f"array job {array} trains {members}; job {report} evaluates and compares them into "
          f"{os.path.join(spec.runs_dir, spec.name, 'report')}/; logs in {out_dir}/")
    return 0


GPUS_PER_NODE_DEFAULT = 8


def parse_args(argv):
    prog = "python -m mmoe_megatron.slurm"
    parser = argparse.ArgumentParser(prog=prog, description="Submit training or a suite to Slurm.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, what in (("submit", "--config"), ("suite", "--suite")):
        p = sub.add_parser(command, prog=f"{prog} {command}",
                           epilog="Config overrides (submit only): --train.lr=3e-4 ...")
        p.add_argument(what, required=True, help="experiment YAML" if command == "submit" else "suite YAML")
        p.add_argument("--nodes", type=int, default=None,
                       help="default: the fewest that hold tensor x pipeline x expert ranks")
        p.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE_DEFAULT,
                       help=f"one rank per GPU (default {GPUS_PER_NODE_DEFAULT}); 0 for CPU nodes")
        p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node on CPU nodes")
        p.add_argument("--cpus-per-task", type=int, default=None)
        p.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00")
        p.add_argument("--partition", default=None)
        p.add_argument("--account", default=None)
        p.add_argument("--signal-seconds", type=int, default=300,
                       help="SIGUSR1 this many seconds before the limit (checkpoint, exit, requeue)")
        p.add_argument("--job-name", default=None)
        p.add_argument("--max-retries", type=int, default=None,
                       help="requeue after a failed training step at most this often, and only when the "
                            "attempt wrote a new checkpoint (default 3; preemptions do not count)")
        p.add_argument("--wait", action="store_true",
                       help="wait for the (last) job to finish; exit non-zero if it failed")
        p.add_argument("--dry-run", action="store_true", help="print the scripts and commands; submit nothing")
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.max_retries is not None and args.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {args.max_retries}")
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
