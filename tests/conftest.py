import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_config_path():
    return os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="session")
def single_process_mcore():
    """torch.distributed (gloo, world 1) and megatron parallel_state with no parallelism."""
    import torch.distributed as dist

    from mmoe_megatron import compat
    from tests.dist import free_port

    compat.apply_all()
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(create_gloo_process_groups=False)
    from mmoe_megatron.distributed import seed_everything

    seed_everything(1234)
    yield


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real Slurm cluster on this machine (tests/slurm_cluster.py), shared by the Slurm tests."""
    from tests.slurm_cluster import JOB_ENV, SlurmCluster, ensure_installed

    why_not = ensure_installed()
    if why_not:
        pytest.skip(f"Slurm cannot be installed here: {why_not}")
    with SlurmCluster(str(tmp_path_factory.mktemp("slurm"))) as c:
        c.env.update(JOB_ENV)
        yield c


@pytest.fixture(scope="session")
def slurm_reference(tmp_path_factory):
    """Losses of the Slurm tests' training (tests.slurm_cluster.TRAIN_ARGS) under torchrun: 2 local
    processes, expert parallel 2, uninterrupted. The SIGKILL test in test_reliability.py resumes
    the same training and compares with it too."""
    import subprocess

    from tests.dist import free_port
    from tests.helpers import TINY, logged_steps
    from tests.slurm_cluster import JOB_ENV, STEPS, TRAIN_ARGS

    run = str(tmp_path_factory.mktemp("torchrun") / "run")
    env = {**os.environ, **JOB_ENV, "MASTER_PORT": str(free_port())}
    proc = subprocess.run(["bash", "launchers/torchrun.sh", "--nproc", "2", "--config", TINY, *TRAIN_ARGS,
                           f"--logging.dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    losses = logged_steps(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses
