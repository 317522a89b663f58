"""Whether a Slurm training job goes back to the queue after its training step ended.

The sbatch scripts in slurm/ call this around the step (`run_step` in slurm/common.sh):

    python -m mmoe_megatron.requeue begin  --config X.yaml [--section.field=value ...]
    python -m mmoe_megatron.requeue decide --exit-code N --config X.yaml [...]
    (or --suite S.yaml --member I instead of --config: run I of a suite's array job, a
    (member, seed) counted as the suite's `runs` are)

`begin` notes the newest complete checkpoint of the run as this attempt starts. `decide` prints
one line saying what happens and why, and exits 0 when the script should requeue the job, 3
(`FINISHED`) when the run had finished whatever the exit code, else 1:

- exit code 75 (the trainer checkpointed on SIGUSR1/SIGTERM, e.g. the pre-limit signal):
  requeue; these requeues are not counted as retries. So is any other exit code when this
  attempt's newest checkpoint says it was written on a stop signal: srun's --kill-on-bad-exit
  ends the ranks still shutting down once the first exits 75, and the step then reports theirs
  (143);
- any other exit code when the run's newest complete checkpoint is its last step
  (`train.train_iters`) and was not written on a stop signal: the run has finished (the final
  evaluation comes before that checkpoint), and the exit code came from a rank ended after it,
  e.g. by srun's --wait while it was still shutting down. Not requeued; `decide` exits
  `FINISHED` and the script ends the step as a success, naming the exit code it ignored;
- any other failure (a crashed or killed rank, a lost node): requeue only while the job has
  been retried fewer than `--max-retries` times (MMOE_MAX_RETRIES, default 3) and a complete
  checkpoint newer than the one noted at `begin` exists, i.e. this attempt made progress. A crash
  that recurs before the next checkpoint would otherwise loop; it stops with the reason instead.

What each attempt started from and each decision are appended to <run dir>/slurm/attempts.jsonl.
No torch import: this runs between attempts, on the batch host, in about a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from mmoe_megatron.config import ConfigError, load_config, parse_overrides
from mmoe_megatron.train import EXIT_PREEMPTED
from mmoe_megatron.training.checkpoint_names import STATE, newest_complete_step, tag_for
from mmoe_megatron.training.metrics import read_jsonl

DEFAULT_MAX_RETRIES = 3
MAX_RETRIES_ENV = "MMOE_MAX_RETRIES"
REQUEUE, STOP, FINISHED = 0, 1, 3  # exit codes of `decide`


@dataclass(frozen=True)
class Decision:
    requeue: bool
    counts_as_retry: bool
    reason: str
    finished: bool = False
    """The run's last checkpoint is complete: the step's failure came after the training ended."""


def decide(exit_code: int, job: str, retries_so_far: int, max_retries: int,
           newest_at_start: Optional[int], newest_now: Optional[int], started: bool = True,
           newest_stopped_on_signal: bool = False, final_step: Optional[int] = None) -> Decision:
    """Whether job `job`, whose step exited with `exit_code`, goes back to the queue (pure).
    `newest_stopped_on_signal`: the checkpoint of `newest_now` was written on a stop signal.
    `final_step`: the run's last step (`train.train_iters`), None if unknown."""
    preempted = f"preempted: checkpoint written; requeueing job {job}"
    if exit_code == EXIT_PREEMPTED:
        return Decision(True, False, preempted)
    progress = newest_now is not None and (newest_at_start is None or newest_now > newest_at_start)
    if started and progress and newest_stopped_on_signal:
        return Decision(True, False, (
            f"{preempted} ({tag_for(newest_now)}, written on the stop signal; exit code {exit_code} came "
            f"from a rank ended while shutting down, as srun does once another rank exited {EXIT_PREEMPTED})"))
    failed = f"the training step failed with exit code {exit_code}"
    if final_step is not None and newest_now is not None and newest_now >= final_step \
            and not newest_stopped_on_signal:
        return Decision(False, False, (
            f"training finished: {tag_for(newest_now)}, the last step's checkpoint, is complete, so exit "
            f"code {exit_code} came after it (a rank ended while shutting down); not requeueing job {job}, "
            "the step counts as a success"), finished=True)
    if not started:
        return Decision(False, False, f"not requeueing job {job}: {failed}, and this attempt's start was "
                                      "not recorded, so it cannot tell whether it made progress")
    if retries_so_far >= max_retries:
        return Decision(False, False, (
            f"not requeueing job {job}: {failed}, and it was already retried {retries_so_far} time(s), "
            f"the limit (--max-retries / {MAX_RETRIES_ENV}={max_retries})"))
    if not progress:
        have = f"the newest is still {tag_for(newest_now)}" if newest_now is not None else "there is none"
        return Decision(False, False, (
            f"not requeueing job {job}: {failed} before writing a new checkpoint ({have}), so a "
            "retry would fail the same way; find the cause above, then resubmit"))
    since = tag_for(newest_at_start) if newest_at_start is not None else "none"
    return Decision(True, True, (
        f"{failed}; requeueing job {job} (retry {retries_so_far + 1} of {max_retries}): "
        f"{tag_for(newest_now)} was completed during this attempt (at its start: {since})"))


# --- the run and its attempt log --------------------------------------------------------------


def run_dirs(args: argparse.Namespace, overrides: list[str]) -> tuple[str, str, int]:
    """(run directory, checkpoint directory, last step) of the training this job step ran."""
    if args.suite is not None:
        from mmoe_megatron.evaluation.suite import load_suite, run_config, run_dir, select

        if overrides:
            raise ValueError(f"unexpected arguments {overrides}; a suite's overrides go in its YAML")
        spec = load_suite(args.suite)
        chosen = select(spec, args.member)
        if len(chosen) != 1:
            labels = ", ".join(r.label for r in chosen)
            raise ValueError(f"--member {args.member} names {len(chosen)} runs ({labels}); "
                             "pass one run's index, as an array task does")
        cfg = run_config(spec, chosen[0])
        return run_dir(spec, chosen[0]), cfg.checkpoint_dir, cfg.train.train_iters
    cfg = load_config(args.config, parse_overrides(overrides))
    return cfg.run_dir, cfg.checkpoint_dir, cfg.train.train_iters


def _log_path(run_dir: str) -> str:
    return os.path.join(run_dir, "slurm", "attempts.jsonl")


def _records(run_dir: str, job: str) -> list[dict]:
    return [r for r in read_jsonl(_log_path(run_dir)) if r.get("job") == job]


def stopped_on_signal(ckpt_dir: str, step: Optional[int]) -> bool:
    """Whether the checkpoint of `step` says it was written on a stop signal (its trainer state)."""
    if step is None:
        return False
    try:
        with open(os.path.join(ckpt_dir, tag_for(step), STATE)) as f:
            return json.load(f).get("stopped_on_signal") is True
    except (OSError, ValueError):
        return False


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _append(run_dir: str, record: dict) -> None:
    os.makedirs(os.path.dirname(_log_path(run_dir)), exist_ok=True)
    with open(_log_path(run_dir), "a") as f:
        f.write(json.dumps({**record, "time": _now()}) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmoe_megatron.requeue",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("command", choices=["begin", "decide"])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="the experiment YAML the step trained (overrides follow)")
    which.add_argument("--suite", help="the suite YAML whose --member the step trained")
    parser.add_argument("--member", default=None,
                        help="with --suite: the run's index (or the name of a member with one run)")
    parser.add_argument("--exit-code", type=int, default=None, help="decide: the training step's exit code")
    parser.add_argument("--max-retries", type=int, default=None,
                        help=f"retries after failures (default: ${MAX_RETRIES_ENV}, else {DEFAULT_MAX_RETRIES})")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    job = os.environ.get("SLURM_JOB_ID", "")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    try:
        if args.suite is not None and args.member is None:
            raise ValueError("--suite needs --member")
        max_retries = args.max_retries if args.max_retries is not None else \
            int(os.environ.get(MAX_RETRIES_ENV, DEFAULT_MAX_RETRIES))
        if max_retries < 0:
            raise ValueError(f"the retry limit must be >= 0, got {max_retries}")
        run_dir, ckpt_dir, final_step = run_dirs(args, overrides)
    except (ConfigError, ValueError) as e:
        print(f"=== error: {e}; not requeueing", flush=True)
        return 2
    newest = newest_complete_step(ckpt_dir)
    if args.command == "begin":
        _append(run_dir, {"job": job, "restart": restart, "event": "begin", "newest_checkpoint": newest})
        print(f"=== {_now()} attempt {restart + 1} of job {job}: newest complete checkpoint "
              f"{tag_for(newest) if newest is not None else 'none'}", flush=True)
        return 0
    if args.exit_code is None:
        parser.error("decide needs --exit-code")
    records = _records(run_dir, job)
    begins = [r for r in records if r["event"] == "begin" and r["restart"] == restart]
    retries = sum(1 for r in records if r["event"] == "retry")
    decision = decide(args.exit_code, job, retries, max_retries,
                      begins[-1]["newest_checkpoint"] if begins else None, newest, started=bool(begins),
                      newest_stopped_on_signal=stopped_on_signal(ckpt_dir, newest), final_step=final_step)
    event = "retry" if decision.counts_as_retry else ("requeue" if decision.requeue else
                                                      "finished" if decision.finished else "stop")
    _append(run_dir, {"job": job, "restart": restart, "event": event, "exit_code": args.exit_code,
                      "newest_checkpoint": newest, "reason": decision.reason})
    print(f"=== {_now()} {decision.reason}", flush=True)
    return REQUEUE if decision.requeue else FINISHED if decision.finished else STOP


if __name__ == "__main__":
    sys.exit(main())
