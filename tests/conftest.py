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
