"""The requeue decision of the Slurm scripts (mmoe_megatron/requeue.py): the pure rule, and the
command as the scripts call it, with the attempt log kept in the run directory. The same
decisions on the real daemons are in test_slurm_faults.py."""

from __future__ import annotations

import json
import os

import pytest

from mmoe_megatron.requeue import decide, main
from tests.helpers import TINY


@pytest.mark.parametrize("code, retries, at_start, now, requeue, words", [
    (75, 9, 4, 4, True, "preempted: checkpoint written; requeueing job 7"),  # never counted
    (137, 0, 4, 8, True, "requeueing job 7 (retry 1 of 2): step_00000008 was completed during this attempt"),
    (137, 0, None, 4, True, "(retry 1 of 2): step_00000004 was completed during this attempt (at its start: none)"),
    (137, 2, 4, 8, False, "already retried 2 time(s), the limit (--max-retries / MMOE_MAX_RETRIES=2)"),
    (1, 0, 4, 4, False, "exit code 1 before writing a new checkpoint (the newest is still step_00000004)"),
    (1, 0, None, None, False, "before writing a new checkpoint (there is none)"),
])
def test_requeue_only_what_made_progress_within_the_limit(code, retries, at_start, now, requeue, words):
    decision = decide(code, "7", retries, 2, at_start, now)
    assert decision.requeue is requeue
    assert decision.counts_as_retry is (requeue and code != 75)
    assert words in decision.reason


def test_a_stop_checkpoint_of_this_attempt_makes_any_exit_code_a_preemption():
    # srun's --kill-on-bad-exit ends a rank still shutting down once another exits 75: the step
    # then exits 143, but the attempt did checkpoint on the signal.
    decision = decide(143, "7", 3, 3, 4, 8, newest_stopped_on_signal=True)
    assert (decision.requeue, decision.counts_as_retry) == (True, False)
    assert decision.reason.startswith("preempted: checkpoint written; requeueing job 7 (step_00000008, written on")
    # A stop checkpoint from before this attempt says nothing about this failure.
    assert not decide(143, "7", 3, 3, 8, 8, newest_stopped_on_signal=True).requeue


def test_a_run_whose_last_checkpoint_is_complete_has_finished_whatever_the_exit_code():
    # srun --wait kills a rank still shutting down after the last step's checkpoint: the step
    # exits 137, but there is nothing left to train, so neither a retry nor a requeue.
    decision = decide(137, "7", 0, 3, 16, 20, final_step=20)
    assert (decision.requeue, decision.counts_as_retry, decision.finished) == (False, False, True)
    assert decision.reason.startswith("training finished: step_00000020, the last step's checkpoint, is complete, "
                                      "so exit code 137 came after it")
    # Also when it was complete before this attempt, and with the retries spent.
    assert decide(1, "7", 3, 3, 20, 20, final_step=20).finished
    # A checkpoint short of the last step is a failure as before; so is the last step's checkpoint
    # written on a stop signal (its final evaluation did not run: requeued to do it).
    assert not decide(137, "7", 0, 3, 16, 19, final_step=20).finished
    assert decide(137, "7", 0, 3, 16, 19, final_step=20).counts_as_retry
    stopped = decide(143, "7", 0, 3, 16, 20, newest_stopped_on_signal=True, final_step=20)
    assert (stopped.requeue, stopped.finished) == (True, False)
    assert decide(75, "7", 0, 3, 16, 20, final_step=20).requeue


def test_the_command_ends_a_finished_run_and_logs_it(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    selector = ["--config", TINY, f"--logging.dir={run}", "--optimizer.warmup_iters=2", "--train.train_iters=12"]
    monkeypatch.setenv("SLURM_JOB_ID", "11")
    assert main(["begin", *selector]) == 0
    _checkpoint(run, 12, {"step": 12})
    assert main(["decide", "--exit-code", "137", *selector]) == 3
    assert "training finished: step_00000012, the last step's checkpoint, is complete" in capsys.readouterr().out
    with open(os.path.join(run, "slurm", "attempts.jsonl")) as f:
        assert [r["event"] for r in map(json.loads, f)] == ["begin", "finished"]
    # The same checkpoint is not the last step of a longer run: a failure without progress, which stops.
    longer = [*selector[:-1], "--train.train_iters=24"]
    assert main(["begin", *longer]) == 0
    assert main(["decide", "--exit-code", "137", *longer]) == 1
    assert "before writing a new checkpoint (the newest is still step_00000012)" in capsys.readouterr().out


def test_the_command_reads_the_stop_from_the_checkpoint(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    selector = ["--config", TINY, f"--logging.dir={run}", "--max-retries", "0"]
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    assert main(["begin", *selector]) == 0
    _checkpoint(run, 4, {"step": 4, "stopped_on_signal": True})
    assert main(["decide", "--exit-code", "143", *selector]) == 0  # no retries allowed, none used
    assert "preempted: checkpoint written; requeueing job 8 (step_00000004" in capsys.readouterr().out


def _checkpoint(run, step, state=None):
    path = os.path.join(run, "checkpoints", f"step_{step:08d}")
    os.makedirs(path)
    with open(os.path.join(path, "COMPLETE.json"), "w") as f:
        f.write("{}")
    if state is not None:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump(state, f)


def test_the_command_counts_retries_per_job_and_logs_each_attempt(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    selector = ["--config", TINY, f"--logging.dir={run}"]
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("MMOE_MAX_RETRIES", "1")

    def attempt(restart, write_step, code):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        assert main(["begin", *selector]) == 0
        if write_step:
            _checkpoint(run, write_step)
        return main(["decide", "--exit-code", str(code), *selector])

    assert attempt(0, 4, 137) == 0  # progress: retry 1 of 1
    assert attempt(1, 8, 75) == 0  # a preemption is always requeued, and not counted
    assert attempt(2, 12, 137) == 1  # progress, but the one retry is spent
    out = capsys.readouterr().out
    assert "attempt 1 of job 42: newest complete checkpoint none" in out
    assert "attempt 3 of job 42: newest complete checkpoint step_00000008" in out
    assert "already retried 1 time(s), the limit (--max-retries / MMOE_MAX_RETRIES=1)" in out
    with open(os.path.join(run, "slurm", "attempts.jsonl")) as f:
        events = [(r["restart"], r["event"], r["newest_checkpoint"]) for r in map(json.loads, f)]
    assert events == [(0, "begin", None), (0, "retry", 4), (1, "begin", 4), (1, "requeue", 8),
                      (2, "begin", 8), (2, "stop", 12)]
    # Another job (a resubmission) starts with its own count; a flag beats the environment.
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert main(["begin", *selector]) == 0
    _checkpoint(run, 16)
    assert main(["decide", "--exit-code", "1", "--max-retries", "0", *selector]) == 1
    assert main(["decide", "--exit-code", "1", "--max-retries", "5", *selector]) == 0


def test_a_failure_without_a_recorded_start_is_not_retried(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    _checkpoint(run, 4)
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    assert main(["decide", "--exit-code", "137", "--config", TINY, f"--logging.dir={run}"]) == 1
    assert "this attempt's start was not recorded" in capsys.readouterr().out
    assert main(["decide", "--exit-code", "1", "--config", TINY, "--no.such=1"]) == 2
    assert "not requeueing" in capsys.readouterr().out


@pytest.mark.parametrize("seeds, index, where", [([], "1", ("k2",)), ([1, 2], "3", ("k2", "seed2"))])
def test_a_suite_array_task_finds_its_run_by_its_index(tmp_path, monkeypatch, capsys, seeds, index, where):
    import yaml

    from mmoe_megatron.evaluation.suite import load_suite, run_dir, runs

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "s", "base": TINY, "runs_dir": str(tmp_path / "runs"), "seeds": seeds,
        "members": [{"name": "elastic", "role": "elastic"},
                    {"name": "k2", "role": "specialist",
                     "overrides": {"matryoshka.strategy": "fixed", "matryoshka.ks": [2]}}],
    }))
    run = os.path.join(tmp_path, "runs", "s", *where)
    spec = load_suite(str(suite))
    assert run_dir(spec, runs(spec)[int(index)]) == run  # where the suite itself trains this run
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    assert main(["begin", "--suite", str(suite), "--member", index]) == 0
    _checkpoint(run, 3)
    assert main(["decide", "--exit-code", "9", "--suite", str(suite), "--member", index]) == 0
    assert "step_00000003 was completed during this attempt" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(run, "slurm", "attempts.jsonl"))
    assert not (tmp_path / "runs" / "s" / "elastic").exists()
    assert main(["decide", "--exit-code", "9", "--suite", str(suite)]) == 2  # which run?
    if seeds:  # a member's name names one run per seed
        assert main(["decide", "--exit-code", "9", "--suite", str(suite), "--member", "k2"]) == 2
        assert "names 2 runs (k2/seed1, k2/seed2)" in capsys.readouterr().out
