"""Slurm: the submit helper's rendered scripts and its checks, and real jobs on a Slurm cluster
started on this machine (tests/slurm_cluster.py: munged, slurmctld, two slurmd) — a 2-node training
job that matches torchrun, a job preempted by its pre-limit signal that requeues and resumes
exactly, requests the partition cannot run, and a suite trained as an array job and compared by a
dependent job. Failures (crashed ranks, a lost node) are in test_slurm_faults.py.

Ranks run on CPU with gloo; each emulated node runs one rank, and expert parallelism (2) spans the
two nodes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import ROOT, TINY, VOCAB, logged_steps
from tests.slurm_cluster import STEPS, TRAIN_ARGS, submit_waiting


def _submit_helper(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "mmoe_megatron.slurm", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kw)


# --- the submit helper, without a cluster ---------------------------------------------------------


def test_dry_run_renders_the_script_from_the_config_and_submits_nothing(tmp_path):
    run = tmp_path / "run"
    proc = _submit_helper("submit", "--config", TINY, "--gpus-per-node", "4", "--time", "01:00:00",
                          "--partition", "gpu", "--account", "proj", "--dry-run",
                          "--parallel.expert=8", "--train.global_batch_size=32", f"--logging.dir={run}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # expert parallel 8 on 4-GPU nodes: 2 nodes by default, one task per GPU.
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --time=01:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --job-name=tiny", "srun --export=ALL"):
        assert line in out, line
    assert out.count("#SBATCH --nodes=") == 1  # the template's own line was replaced
    assert f"sbatch --parsable {run}/slurm/train.sbatch {TINY} --parallel.expert=8 " in out
    assert not run.exists()


def test_suite_dry_run_renders_the_array_and_the_dependent_report_job():
    proc = _submit_helper("suite", "--suite", os.path.join(ROOT, "configs", "suites", "demo.yaml"),
                          "--gpus-per-node", "0", "--tasks-per-node", "2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    member, report = proc.stdout.split("suite_report.sbatch\n", 1)
    # Six members: one array task each; the report waits for all of them.
    assert "#SBATCH --array=0-5" in member and "#SBATCH --requeue" in member
    assert '-m mmoe_megatron.evaluation.suite train --suite "$suite" --member' in member
    assert "#SBATCH --dependency=afterok:<array job id>" in report
    assert "#SBATCH --kill-on-invalid-dep=yes" in report and "--signal" not in report
    assert "0=elastic, 1=k1, 2=k2, 3=k4, 4=k8, 5=top2-standard" in proc.stdout


def test_layout_that_does_not_fit_the_nodes_is_refused_before_queueing():
    proc = _submit_helper("submit", "--config", TINY, "--gpus-per-node", "0", "--tasks-per-node", "3",
                          "--dry-run", "--parallel.expert=2")
    assert proc.returncode == 2
    assert "parallel.expert" in proc.stderr and "data-parallel size 3" in proc.stderr
    proc = _submit_helper("submit", "--config", TINY, "--gpus-per-node", "8", "--tasks-per-node", "2",
                          "--dry-run")
    assert proc.returncode == 2 and "one GPU" in proc.stderr


def test_help_names_the_module_command_and_a_layout_error_names_the_gpu_default():
    proc = _submit_helper("submit", "--help")
    assert proc.stdout.startswith("usage: python -m mmoe_megatron.slurm submit ")
    # 8 GPUs per node by default: a CPU user who forgot --gpus-per-node 0 is told so.
    proc = _submit_helper("submit", "--config", TINY, "--dry-run")
    assert proc.returncode == 2
    assert "4 x 8" in proc.stderr and "--gpus-per-node 8 (the default)" in proc.stderr
    assert "on CPU nodes pass --gpus-per-node 0 --tasks-per-node N" in proc.stderr


def test_sbatch_scripts_print_their_steps_in_a_dry_run():
    proc = subprocess.run(["bash", "slurm/train.sbatch", "--dry-run", TINY, "--train.lr=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # A failed task ends the step (--kill-on-bad-exit), and so does a lost node (--wait).
    assert proc.stdout.startswith("srun --export=ALL --kill-on-bad-exit=1 --wait=10 ")
    assert f"-m mmoe_megatron.train --config {TINY} --train.lr=1" in proc.stdout


# --- a real cluster -------------------------------------------------------------------------------


def _read(path) -> str:
    with open(path) as f:
        return f.read()


@pytest.mark.slow
def test_two_node_job_trains_like_torchrun(slurm_cluster, slurm_reference, tmp_path):
    run = str(tmp_path / "run")
    proc = slurm_cluster.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out",
                        "slurm/train.sbatch", TINY, *TRAIN_ARGS, f"--logging.dir={run}"], check=False, cwd=ROOT)
    job = proc.stdout.split()[-1]
    log = _read(f"{tmp_path}/{job}.out")
    assert proc.returncode == 0, log[-4000:] + slurm_cluster.logs()
    # One rank on each emulated node; their names do not resolve, so the rendezvous falls back
    # to the first node's NodeAddr.
    assert "SLURM_JOB_NODELIST=node[1-2]" in log and "MASTER_ADDR=127.0.0.1" in log
    # Each rank says where it runs.
    assert "rank 0 of 2 started: local rank 0, node node1" in log
    assert "rank 1 of 2 started: local rank 0, node node2" in log
    assert f"MASTER_PORT={20000 + int(job) % 10000}" in log
    for node in ("node1", "node2"):
        assert f"launch task StepId={job}.0 " in _read(slurm_cluster.path("log", f"slurmd.{node}.log"))
    assert "=== resolved config" in log and "num_experts: 8" in log
    assert os.path.isfile(os.path.join(run, "checkpoints", f"step_{STEPS:08d}", "COMPLETE.json"))
    # Same entry point, same ranks: the losses match torchrun's bit for bit (fp32 on CPU).
    assert logged_steps(run) == slurm_reference


def _wait_for_step(run, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"the job never logged step {step}"
        if os.path.exists(os.path.join(run, "metrics.jsonl")) and max(logged_steps(run), default=0) >= step:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_pre_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm_cluster, slurm_reference, tmp_path):
    run = str(tmp_path / "run")
    # Submitted through the helper (2 CPU nodes x 1 rank); --wait returns when the job is done,
    # requeues included, and prints the job id as soon as it is queued (used here while it runs).
    proc, job = submit_waiting(slurm_cluster, "--config", TINY, "--gpus-per-node", "0", "--nodes", "2",
                               "--job-name", "preempted", *TRAIN_ARGS, f"--logging.dir={run}")
    try:
        _wait_for_step(run, 2, proc)
        # What Slurm does `--signal` seconds before the time limit: SIGUSR1 to every job step.
        slurm_cluster.run(["scancel", "--signal=USR1", job])
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = _read(os.path.join(run, "slurm", f"preempted-{job}.out"))
    assert proc.returncode == 0, out[-2000:] + log[-4000:]
    assert f"preempted: checkpoint written; requeueing job {job}" in log and "(restart 1)" in log
    stopped = re.findall(r"stop signal received: checkpointed step (\d+), exiting", log)
    assert len(stopped) == 1, log[-4000:]
    at = int(stopped[0])
    assert 2 <= at < STEPS
    assert f"resumed from {run}/checkpoints/step_{at:08d} at step {at}" in log
    # What lets the script tell a preemption from a crash when srun reports another rank's code.
    state = json.loads(_read(os.path.join(run, "checkpoints", f"step_{at:08d}", "trainer_state.json")))
    assert state["stopped_on_signal"] is True
    # The requeued run continues bit for bit from the preemption checkpoint.
    assert logged_steps(run) == slurm_reference


def test_requests_the_partition_cannot_run_are_refused_and_leave_no_script(slurm_cluster, tmp_path):
    run = tmp_path / "run"

    def submit(*args):
        return _submit_helper("submit", "--config", TINY, *TRAIN_ARGS, f"--logging.dir={run}", *args,
                              env=slurm_cluster.env)

    # The 8-GPU default on CPU nodes (the layout fits 8 ranks, so only the partition can object).
    proc = submit("--train.global_batch_size=16")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--gpus-per-node 8 (the default): the nodes of partition debug have no GPUs" in proc.stderr
    assert "pass --gpus-per-node 0 --tasks-per-node N" in proc.stderr
    # More nodes than the partition has would pend for ever.
    proc = submit("--gpus-per-node", "0", "--nodes", "3", "--parallel.expert=1", "--train.global_batch_size=6")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--nodes 3: partition debug has 2 node(s)" in proc.stderr
    assert not run.exists()  # refused before anything was written
    # sbatch itself refuses (a malformed time limit): the rendered script is removed again.
    proc = submit("--gpus-per-node", "0", "--nodes", "2", "--time", "soon")
    assert proc.returncode == 1 and "nothing was queued" in proc.stderr, proc.stdout + proc.stderr
    assert not run.exists()  # the script and the folders made for it


@pytest.mark.slow
def test_suite_array_job_and_dependent_report(slurm_cluster, tmp_path):
    from mmoe_megatron.config import load_config, save_config

    base = str(tmp_path / "base.yaml")
    save_config(load_config(TINY, [
        ("data.mock", True), ("model.vocab_size", VOCAB), ("data.seq_length", 32),
        ("train.micro_batch_size", 4), ("train.global_batch_size", 8), ("train.train_iters", 3),
        ("train.eval_interval", 0), ("train.eval_iters", 1), ("train.log_interval", 1),
        ("optimizer.warmup_iters", 1), ("checkpoint.save_interval", 0), ("logging.tensorboard", False),
    ]), base)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "s", "base": base, "runs_dir": str(tmp_path / "runs"), "seeds": [1],
        "eval": {"ks": [1, 2], "num_samples": 8},
        "members": [
            {"name": "elastic", "role": "elastic"},
            {"name": "k2", "role": "specialist",
             "overrides": {"matryoshka.strategy": "fixed", "matryoshka.ks": [2]}},
        ],
    }))
    proc = _submit_helper("suite", "--suite", str(suite), "--gpus-per-node", "0", "--wait",
                          env=slurm_cluster.env, timeout=600)
    out_dir = tmp_path / "runs" / "s" / "slurm"
    logs = {p.name: p.read_text() for p in out_dir.glob("*.out")} if out_dir.exists() else {}
    assert proc.returncode == 0, proc.stdout + proc.stderr + "\n".join(f"{k}\n{v[-3000:]}" for k, v in logs.items())
    # One array job, one task per run (member, seed), each training into its run's directory; then
    # the report job.
    array = re.search(r"array job (\d+) trains", proc.stdout).group(1)
    assert f"array job {array} trains 0=elastic/seed1, 1=k2/seed1" in proc.stdout
    for i, member in enumerate(["elastic", "k2"]):
        log = logs[f"s-{array}_{i}.out"]
        assert f"SLURM_ARRAY_TASK_ID={i}" in log and f"--member {i}" in log
        run = tmp_path / "runs" / "s" / member / "seed1"
        assert sorted(logged_steps(run)) == [1, 2, 3]
        assert (run / "slurm" / "attempts.jsonl").is_file()  # the requeue check found this run
    comparison = json.loads((tmp_path / "runs" / "s" / "report" / "comparison.json").read_text())
    rows = {r["name"]: r for r in comparison["rows"]}
    assert set(rows) == {"elastic", "k2"} and comparison["columns"] == ["1", "2"]
    for name, row in rows.items():
        evaluated = json.loads((tmp_path / "runs" / "s" / name / "seed1" / "eval" / "eval.json").read_text())
        assert row["loss"] == {r["label"]: r["loss"] for r in evaluated["results"]}
