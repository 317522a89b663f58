"""The launchers and the training command line: dry runs, real runs under torchrun and the
deepspeed launcher, and a run stopped by `exit_interval` that resumes to the same losses."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.data_fixtures import small_datasets, small_run_config, small_tokenizer  # noqa: F401
from tests.dist import free_port
from tests.helpers import ROOT, logged_steps


def _launch(launcher, config, run_dir, *extra, dry_run=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port()),
           "PYTHON": os.environ.get("PYTHON", __import__("sys").executable)}
    cmd = ["bash", os.path.join(ROOT, "launchers", launcher)] + (["--dry-run"] if dry_run else []) + [
        "--nproc", "2", "--config", config, "--parallel.expert=2", f"--logging.dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


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


@pytest.mark.slow
def test_launchers_train_alike_and_exit_interval_resumes_exactly(tmp_path, config_file):
    reference = str(tmp_path / "deepspeed")
    proc = _launch("deepspeed.sh", config_file, reference)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
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
