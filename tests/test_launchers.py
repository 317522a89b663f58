"""The launchers and the training command line: dry runs, real runs under torchrun and the
deepspeed launcher, a run stopped by `exit_interval` that resumes to the same losses, the
interpreter and port the launchers pick, and a logged aux loss that does not depend on the
number of processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from mmoe_megatron.ports import ephemeral_range
from tests.data_fixtures import small_datasets, small_run_config, small_tokenizer  # noqa: F401
from tests.dist import free_port
from tests.helpers import ROOT, logged_steps


def _launch(launcher, config, run_dir, *extra, dry_run=False, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port()),
           "PYTHON": os.environ.get("PYTHON", sys.executable)}
    layout = ["--parallel.expert=2"] if nproc == 2 else []
    cmd = ["bash", os.path.join(ROOT, "launchers", launcher)] + (["--dry-run"] if dry_run else []) + [
        "--nproc", str(nproc), "--config", config, *layout, f"--logging.dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _logged(run_dir, field):
    from mmoe_megatron.training.metrics import read_metrics

    return {step: r[field] for step, r in read_metrics(run_dir)["train"].items()}


@pytest.fixture(scope="module")
def config_file(small_run_config):
    return small_run_config


@pytest.mark.parametrize("launcher, expected", [
    ("torchrun.sh", "-m torch.distributed.run"),
    ("deepspeed.sh", "-m deepspeed.launcher.runner"),
])
def test_dry_run_prints_the_command_and_runs_nothing(tmp_path, config_file, launcher, expected):
    proc = _launch(launcher, config_file, str(tmp_path / "run"), dry_run=True)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout and "mmoe_megatron.train" in proc.stdout
    assert "2" in proc.stdout.split() and config_file in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def deepspeed_run(config_file, tmp_path_factory):
    """The small run under the deepspeed launcher: 2 processes, expert parallel 2, so each rank
    runs 2 of the step's 4 micro-batches."""
    reference = str(tmp_path_factory.mktemp("launchers") / "deepspeed")
    proc = _launch("deepspeed.sh", config_file, reference)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return reference, proc.stdout


@pytest.mark.slow
def test_launchers_train_alike_and_exit_interval_resumes_exactly(tmp_path, config_file, deepspeed_run):
    reference, _ = deepspeed_run
    full = logged_steps(reference)
    assert sorted(full) == [1, 2, 3, 4]

    run = str(tmp_path / "torchrun")
    first = _launch("torchrun.sh", config_file, run, "--train.exit_interval=2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert sorted(logged_steps(run)) == [1, 2]
    assert os.path.isfile(os.path.join(run, "checkpoints", "step_00000002", "COMPLETE.json"))
    second = _launch("torchrun.sh", config_file, run)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    resumed = logged_steps(run)
    # Both launchers run the same entry point; the resumed run continues bitwise (fp32 on CPU).
    assert resumed == full


@pytest.mark.slow
def test_logged_aux_loss_does_not_depend_on_the_number_of_processes(tmp_path, config_file, deepspeed_run):
    """One process runs all 4 micro-batches of a step, two run 2 each: the logged load-balancing
    loss (metrics.jsonl and the console) is the mean over micro-batches, layers and ranks."""
    reference, reference_out = deepspeed_run
    single = str(tmp_path / "single")
    proc = _launch("torchrun.sh", config_file, single, nproc=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    two, one = _logged(reference, "load_balancing_loss"), _logged(single, "load_balancing_loss")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5), step
    # Balanced routing gives about the coefficient-free value 1 (the tracker logs loss / coeff),
    # not a multiple of it that grows with the micro-batches per rank.
    assert all(0.9 < v < 1.5 for v in one.values()), one
    assert f"aux {one[1]:.4f}" in proc.stdout and f"aux {two[1]:.4f}" in reference_out


def _copy_launchers(root):
    shutil.copytree(os.path.join(ROOT, "launchers"), os.path.join(root, "launchers"))


def _dry_run_command(root, env_extra, launcher="torchrun.sh"):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "MASTER_PORT")}
    env.update(env_extra)
    proc = subprocess.run(["bash", os.path.join(root, "launchers", launcher), "--dry-run", "--nproc", "2",
                           "--config", "c.yaml"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize("launcher", ["torchrun.sh", "deepspeed.sh"])
def test_launchers_prefer_the_project_venv_over_python_on_path(tmp_path, launcher):
    _copy_launchers(tmp_path)
    port = {"MASTER_PORT": "12345"}  # no interpreter needed to pick one
    # No .venv: whatever `python` is on PATH.
    assert _dry_run_command(tmp_path, port, launcher)[0] == "python"
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    assert _dry_run_command(tmp_path, port, launcher)[0] == str(venv_python)
    # An explicit interpreter, or an activated environment, still wins.
    assert _dry_run_command(tmp_path, {**port, "PYTHON": sys.executable}, launcher)[0] == sys.executable
    active = os.path.dirname(os.path.dirname(sys.executable))
    assert _dry_run_command(tmp_path, {**port, "VIRTUAL_ENV": active}, launcher)[0] == \
        os.path.join(active, "bin", "python")


def _port_of(command):
    flag = "--master-port" if "--master-port" in command else "--master_port"
    return int(command[command.index(flag) + 1])


@pytest.mark.parametrize("launcher", ["torchrun.sh", "deepspeed.sh"])
def test_launchers_pick_a_free_port_unless_master_port_is_set(tmp_path, launcher):
    _copy_launchers(tmp_path)
    env = {"PYTHON": sys.executable}
    # Another local job holds the usual default, 29500: the launcher picks a port that is free.
    busy = socket.socket()
    try:
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass  # already held by something else: just as busy
        port = _port_of(_dry_run_command(tmp_path, env, launcher))
        assert port != 29500
        # Outside the ephemeral range, where other processes' connections cannot take it.
        first, last = ephemeral_range()
        assert not first <= port <= last
    finally:
        busy.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert _port_of(_dry_run_command(tmp_path, {**env, "MASTER_PORT": "23456"}, launcher)) == 23456
