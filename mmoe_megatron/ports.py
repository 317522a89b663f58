"""Free TCP ports for a local rendezvous, chosen outside the kernel's ephemeral range.

A port found by binding port 0 comes from the ephemeral range, which the kernel also hands out to
every outgoing connection and to every other bind to port 0 on the machine (an inference engine's
sockets, a download, another job's store clients). Between being found and being bound by the
rendezvous such a port can be taken, and the job fails with "address already in use". A port below
that range is only ever taken by a process that names it, so it is drawn at random from there and
checked.

    python -m mmoe_megatron.ports        # prints one port (the local launchers use this)

This module imports nothing heavy: the launchers call it before starting Python jobs.
"""

from __future__ import annotations

import random
import socket

RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default, used where RANGE_FILE cannot be read
LOWEST = 10000  # below this lie the ports that common services are configured to use
# The ports the Slurm scripts give a job's rendezvous (slurm/common.sh: 20000 + job id mod 10000),
# bound later by the job without a check: local draws stay out of them.
SLURM_JOB_PORTS = (20000, 29999)
ATTEMPTS = 200

# Not the module-level generator: two processes that seeded `random` alike would draw the same ports.
_draw = random.SystemRandom()


def ephemeral_range(path: str = RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (first, last), or Linux's default where it cannot be read."""
    try:
        with open(path) as f:
            first, last = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return first, last


def _windows(n: int, path: str) -> list[tuple[int, int]]:
    """Ranges [lo, hi] of start ports whose n consecutive ports lie outside the ephemeral range."""
    first, last = ephemeral_range(path)
    windows = [(LOWEST, first - n), (last + 1, 65536 - n)]
    slurm_first, slurm_last = SLURM_JOB_PORTS
    split = []
    for lo, hi in windows:  # remove the start ports whose n ports would touch the Slurm jobs' range
        split += [(lo, min(hi, slurm_first - n)), (max(lo, slurm_last + 1), hi)]
    return [(lo, hi) for lo, hi in split if lo <= hi]


def _bindable(ports: range) -> bool:
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_ports(n: int = 1, path: str = RANGE_FILE) -> list[int]:
    """n consecutive TCP ports on 127.0.0.1 that are free now, outside the ephemeral range.

    Consecutive because some daemons take a range (e.g. slurm.conf's SlurmdPort per node). Falls back
    to the ephemeral range (ports from binding port 0) only when no port outside it is free.
    """
    if n < 1:
        raise ValueError(f"asked for {n} ports; ask for at least 1")
    windows = _windows(n, path)
    for _ in range(ATTEMPTS if windows else 0):
        lo, hi = _draw.choices(windows, weights=[hi - lo + 1 for lo, hi in windows])[0]
        start = _draw.randint(lo, hi)
        if _bindable(range(start, start + n)):
            return list(range(start, start + n))
    for _ in range(ATTEMPTS):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        if start + n <= 65536 and _bindable(range(start, start + n)):
            return list(range(start, start + n))
    raise RuntimeError(f"found no {n} consecutive free TCP ports on 127.0.0.1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, outside the ephemeral range."""
    return free_ports(1)[0]


if __name__ == "__main__":
    print(free_port())
