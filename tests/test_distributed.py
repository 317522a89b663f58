"""Rank and rendezvous discovery from the launchers' environment variables."""

import socket

from mmoe_megatron.distributed import env_from_os


def test_torchrun_and_srun_variables_give_the_rank_and_rendezvous():
    env = env_from_os({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "2345"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "n1", 2345)
    env = env_from_os({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2",
                       "MASTER_ADDR": "n2", "MASTER_PORT": "20017"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (5, 6, 2, "n2", 20017)


def test_a_lone_process_never_takes_a_port_a_job_is_using():
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 29500))
        busy.listen()
        env = env_from_os({})
        assert (env.rank, env.world_size) == (0, 1)
        assert env.master_port != 29500
        with socket.socket() as probe:  # the port it picked is free
            probe.bind(("127.0.0.1", env.master_port))
