"""Rendezvous ports are drawn outside the kernel's ephemeral range, where no outgoing connection or
bind to port 0 elsewhere on the machine can take them between being found and being bound."""

import os
import random
import socket
import subprocess
import sys

import pytest

from mmoe_megatron import ports
from tests.helpers import ROOT, TINY


def _range_file(tmp_path, first, last):
    path = tmp_path / "ip_local_port_range"
    path.write_text(f"{first}\t{last}\n")
    return str(path)


def _outside(port, first, last):
    return not first <= port <= last


def test_ports_lie_outside_the_machines_ephemeral_range_and_are_free():
    first, last = ports.ephemeral_range()
    for _ in range(20):
        port = ports.free_port()
        assert _outside(port, first, last) and port >= ports.LOWEST
        assert _outside(port, *ports.SLURM_JOB_PORTS)  # the Slurm scripts' job ports
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_consecutive_ports_are_all_free_and_outside_the_range():
    first, last = ports.ephemeral_range()
    for _ in range(20):
        got = ports.free_ports(3)
        assert got == list(range(got[0], got[0] + 3))
        assert all(_outside(p, first, last) and _outside(p, *ports.SLURM_JOB_PORTS) for p in got)
    socks = [socket.socket() for _ in got]
    try:
        for s, p in zip(socks, got):
            s.bind(("127.0.0.1", p))
    finally:
        for s in socks:
            s.close()


def _held_port_with_a_free_neighbour():
    """A listening socket on port p, with p + 1 free now."""
    for _ in range(50):
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", held.getsockname()[1] + 1))
                return held
            except OSError:
                held.close()
    raise RuntimeError("no port with a free neighbour on this machine")


def test_a_held_port_is_never_returned(tmp_path, monkeypatch):
    # A window of two ports below a made-up ephemeral range; a listener holds the first.
    held = _held_port_with_a_free_neighbour()
    try:
        lowest = held.getsockname()[1]
        monkeypatch.setattr(ports, "LOWEST", lowest)
        path = _range_file(tmp_path, lowest + 2, 65535)
        assert {ports.free_ports(1, path=path)[0] for _ in range(30)} == {lowest + 1}
    finally:
        held.close()


def test_the_draw_ignores_the_seed_of_the_random_module():
    # Two processes that seeded `random` alike (tests, training scripts) must not draw alike.
    draws = set()
    for _ in range(5):
        random.seed(0)
        draws.add(ports.free_port())
    assert len(draws) > 1


def test_without_room_outside_the_range_it_falls_back_to_a_free_ephemeral_port(tmp_path):
    path = _range_file(tmp_path, ports.LOWEST, 65535)
    port = ports.free_ports(1, path=path)[0]
    assert port >= ports.LOWEST
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_the_range_is_read_from_the_kernel_file_or_defaults(tmp_path):
    assert ports.ephemeral_range(_range_file(tmp_path, 40000, 50000)) == (40000, 50000)
    assert ports.ephemeral_range(str(tmp_path / "missing")) == ports.DEFAULT_EPHEMERAL
    bad = tmp_path / "bad"
    bad.write_text("not numbers\n")
    assert ports.ephemeral_range(str(bad)) == ports.DEFAULT_EPHEMERAL


def test_asking_for_no_ports_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        ports.free_ports(0)


def test_a_benchmarks_lone_process_does_not_export_its_rendezvous_port():
    # A subprocess the benchmark starts (a serving engine, a launcher) inherits the environment: a
    # MASTER_PORT there would name the port this process's store holds.
    code = (
        "import os\n"
        "from bench.common import single_process\n"
        "from mmoe_megatron.config import load_config\n"
        f"single_process(load_config({TINY!r}, []))\n"
        "import torch.distributed as dist\n"
        "print(dist.is_initialized(), dist.get_world_size(), 'MASTER_PORT' in os.environ, "
        "'MASTER_ADDR' in os.environ)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True 1 False False"
