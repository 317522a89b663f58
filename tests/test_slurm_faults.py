"""Faults of a Slurm training job, on the real daemons (tests/slurm_cluster.py):

- rank 1 SIGKILLed mid-run: the job is requeued by its own script and completes with the losses
  of an uninterrupted run, and the log names the dead rank and its node;
- a crash that recurs before the next checkpoint: retried once, then stopped, the reason logged;
- node2 lost (its slurmd, the step's slurmstepd and rank 1 SIGKILLed): the allocation is released
  within RELEASE_BOUND_S instead of Slurm's SlurmdTimeout, and once node2 is back the job
  completes with the losses of an uninterrupted run;
- rank 1 still shutting down after the last checkpoint, killed by srun's --wait: the run has
  finished, so the job ends as a success without a requeue or a retry.

Runs checkpoint every 4 steps. Rank 1 pauses at a chosen step (MMOE_PAUSE_AT) and the test kills it
there; while the pause's pid file stays in place a retried run passes the point. Timings are
printed (`pytest -s`) for the README's faults table.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import signal
import time

import pytest

from tests.helpers import TINY, logged_steps
from tests.slurm_cluster import STEPS, TRAIN_ARGS, submit_waiting

FAULT_ARGS = ["--gpus-per-node", "0", "--nodes", "2", *TRAIN_ARGS, "--checkpoint.save_interval=4"]
RELEASE_BOUND_S = 60
"""From a node's loss to its job leaving the other node: rank 0 fails at once (gloo) and probes its
peers for 5 s, srun's --wait (10 s) and KillWait + 2 s (12 s on the test cluster, 32 s with
Slurm's default KillWait) pass, then the requeue decision and node1's job epilog: about 30 s on
the test cluster, the rest is margin for a loaded machine."""


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _pause_env(marker, step: int) -> dict:
    return {"MMOE_PAUSE_AT": f"step_{step}", "MMOE_PAUSE_RANK": "1", "MMOE_PAUSE_FILE": str(marker)}


def _paused_pid(marker, proc, timeout=300):
    """The pid of rank 1 once it is paused, or None if the job ended first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker):
        if proc.poll() is not None:
            return None
        assert time.monotonic() < deadline, "rank 1 never reached its pause point"
        time.sleep(0.05)
    with open(marker) as f:
        return int(f.read())


def _until(what: str, condition, timeout: float = 300, every: float = 0.2, message=lambda: "") -> float:
    """Seconds until `condition()` holds."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} did not happen within {timeout} s; {message()}"
        time.sleep(every)
    return time.monotonic() - start


def _resumes(run) -> list[dict]:
    from mmoe_megatron.training.metrics import read_metrics

    return read_metrics(run)["resumes"] if os.path.exists(os.path.join(run, "metrics.jsonl")) else []


def _finish(proc, timeout=600) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


def _names_rank_1_on_node2(log: str) -> bool:
    return ("rank 0 (node node1" in log and "a collective failed during training step" in log
            and "not answering after 5 s (failed, or their node is lost): rank 1 (node node2" in log)


@pytest.mark.slow
def test_a_killed_rank_is_retried_and_the_job_completes_exactly(slurm_cluster, slurm_reference, tmp_path):
    run = str(tmp_path / "run")
    marker = tmp_path / "paused.pid"
    proc, job = submit_waiting(slurm_cluster, "--config", TINY, "--job-name", "crash", *FAULT_ARGS,
                               f"--logging.dir={run}", env=_pause_env(marker, 7))
    try:
        pid = _paused_pid(marker, proc)
        assert pid, "the job ended before rank 1 reached step 7"
        os.kill(pid, signal.SIGKILL)  # rank 1 dies at the start of step 7
        requeued = _until("the requeue", lambda: "requeueing job" in _read(f"{run}/slurm/crash-{job}.out"))
        training = _until("the resume", lambda: len(_resumes(run)) == 1) + requeued
    finally:
        out = _finish(proc)
    log = _read(f"{run}/slurm/crash-{job}.out")
    print(f"\nrank killed: requeued after {requeued:.1f} s, training again after {training:.1f} s "
          "(cred_expire=5 on this cluster)")
    assert proc.returncode == 0, out[-2000:] + log[-5000:]
    assert _names_rank_1_on_node2(log), log[-5000:]
    assert f"requeueing job {job} (retry 1 of 3): step_00000004 was completed during this attempt" in log
    assert "(restart 1)" in log and "attempt 2 of job" in log
    (resume,) = _resumes(run)
    assert (resume["step"], resume["attempt"], resume["hosts"]) == (4, 2, ["node1", "node2"])
    assert (resume["slurm_job_id"], resume["slurm_restart_count"]) == (job, 1)
    # Steps 5-6 ran twice; the last record of each equals the uninterrupted run bit for bit.
    assert logged_steps(run) == slurm_reference


@pytest.mark.slow
def test_a_crash_that_recurs_before_a_new_checkpoint_stops_with_the_reason(slurm_cluster, tmp_path):
    run = str(tmp_path / "run")
    marker = tmp_path / "paused.pid"
    proc, job = submit_waiting(slurm_cluster, "--config", TINY, "--job-name", "recurs", "--max-retries", "2",
                               *FAULT_ARGS, f"--logging.dir={run}", env=_pause_env(marker, 6))
    kills = 0
    try:
        # Rank 1 dies at step 6 in every attempt (a checkpoint exists at 4) until the job ends.
        while (pid := _paused_pid(marker, proc)) is not None:
            os.kill(pid, signal.SIGKILL)
            os.remove(marker)
            kills += 1
    finally:
        out = _finish(proc)
    log = _read(f"{run}/slurm/recurs-{job}.out")
    assert proc.returncode == 1 and f"job {job} ended with exit code" in out, out[-2000:] + log[-4000:]
    assert kills == 2, log[-4000:]
    # The first attempt wrote step 4 and is retried; the second wrote nothing new and is not.
    assert f"requeueing job {job} (retry 1 of 2)" in log
    assert (f"not requeueing job {job}: the training step failed with exit code" in log
            and "before writing a new checkpoint (the newest is still step_00000004), so a retry would "
                "fail the same way" in log), log[-4000:]
    with open(f"{run}/slurm/attempts.jsonl") as f:
        events = [(r["restart"], r["event"]) for r in map(json.loads, f)]
    assert events == [(0, "begin"), (0, "retry"), (1, "begin"), (1, "stop")]
    assert slurm_cluster.run(["squeue", "-h", "-j", job], check=False).stdout.strip() == ""


@pytest.mark.slow
def test_a_lost_node_releases_the_allocation_and_the_job_completes_once_it_is_back(
        slurm_cluster, slurm_reference, tmp_path):
    run = str(tmp_path / "run")
    marker = tmp_path / "paused.pid"
    proc, job = submit_waiting(slurm_cluster, "--config", TINY, "--job-name", "lost", *FAULT_ARGS,
                               f"--logging.dir={run}", env=_pause_env(marker, 7))
    lost = False
    try:
        assert _paused_pid(marker, proc), "the job ended before rank 1 reached step 7"
        killed = slurm_cluster.lose_node("node2", job)
        lost_at = time.time()
        lost = True
        assert len(killed) >= 3, killed  # slurmd, the step's slurmstepd, rank 1

        seen = []  # (seconds, job state, job nodes, node1 state) at each change, for the failure message

        def released():
            state = slurm_cluster.run(["squeue", "-h", "-j", job, "-o", "%T %N"], check=False).stdout.split()
            now = (*(state + ["", ""])[:2], slurm_cluster.node_state("node1"))
            if not seen or seen[-1][1:] != now:
                seen.append((round(time.monotonic() - start, 1), *now))
            # node1 is no longer part of the job (a requeued job stays COMPLETING on node2).
            return now[0] != "RUNNING" and "node1" not in slurm_cluster.hostnames(now[1])

        start = time.monotonic()
        release = _until("the release of node1", released, timeout=RELEASE_BOUND_S + 120,
                         message=lambda: f"states seen: {seen}")
        slurm_cluster.restart_node("node2")
        lost = False
        training = _until("the resume", lambda: len(_resumes(run)) == 1)
    finally:
        if lost:
            slurm_cluster.restart_node("node2")
        out = _finish(proc)
    log = _read(f"{run}/slurm/lost-{job}.out")
    decided = re.search(r"=== (\S+) the training step failed", log)
    decided = calendar.timegm(time.strptime(decided.group(1), "%Y-%m-%dT%H:%M:%SZ")) - lost_at if decided else -1
    print(f"\nnode lost: requeue decided after {decided:.0f} s, node1 released after {release:.1f} s; node2's "
          f"slurmd restarted, training again {training:.1f} s later; states: {seen}")
    assert proc.returncode == 0, out[-2000:] + log[-5000:]
    assert release < RELEASE_BOUND_S, f"{seen}\n{log[-4000:]}"
    assert _names_rank_1_on_node2(log), log[-5000:]
    assert f"requeueing job {job} (retry 1 of 3)" in log
    (resume,) = _resumes(run)
    assert (resume["step"], resume["attempt"], resume["hosts"]) == (4, 2, ["node1", "node2"])
    assert logged_steps(run) == slurm_reference


@pytest.mark.slow
def test_a_rank_killed_after_the_last_checkpoint_leaves_a_finished_job_not_requeued(
        slurm_cluster, slurm_reference, tmp_path):
    run = str(tmp_path / "run")
    marker = tmp_path / "paused.pid"
    env = {"MMOE_PAUSE_AT": "exit", "MMOE_PAUSE_RANK": "1", "MMOE_PAUSE_FILE": str(marker)}
    proc, job = submit_waiting(slurm_cluster, "--config", TINY, "--job-name", "done", *FAULT_ARGS,
                               f"--logging.dir={run}", env=env)
    try:
        # Rank 1 stays in its shutdown until srun's --wait (10 s after rank 0 exited) kills it.
        assert _paused_pid(marker, proc), "the job ended before rank 1 finished training"
    finally:
        out = _finish(proc)
    log = _read(f"{run}/slurm/done-{job}.out")
    last = f"step_{STEPS:08d}"
    assert proc.returncode == 0, out[-2000:] + log[-4000:]
    assert re.search(rf"training finished: {last}, the last step's checkpoint, is complete, so exit code \d+ "
                     rf"came after it .*not requeueing job {job}", log), log[-4000:]
    with open(f"{run}/slurm/attempts.jsonl") as f:
        events = [(r["restart"], r["event"]) for r in map(json.loads, f)]
    assert events == [(0, "begin"), (0, "finished")]
    assert _resumes(run) == []
    assert logged_steps(run) == slurm_reference
    assert slurm_cluster.run(["squeue", "-h", "-j", job], check=False).stdout.strip() == ""
