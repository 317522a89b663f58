"""Run a function on N real processes with the gloo backend (no mocks of torch.distributed).

    results = run_distributed(fn, world_size=2, arg=...)

`fn(rank, world_size, **kwargs)` must be a module-level function (it is pickled into the
processes). Its return value comes back per rank; an exception on any rank fails the caller
with that rank's traceback. Every process is given the caller's environment and stdout/stderr,
and RANK/WORLD_SIZE/MASTER_* like torchrun.

The processes are forked from a multiprocessing fork server that has imported torch,
megatron-core and DeepSpeed once: importing them costs a fresh interpreter over 10 s of CPU
(megatron-core's torch.compile decorators alone several), paid by every rank of every test
otherwise. Each rank is still a process of its own that starts with nothing initialised.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import traceback
from multiprocessing import reduction

from mmoe_megatron.ports import free_port  # noqa: F401 - tests import it from here

PRELOAD = ["mmoe_megatron.training.trainer", "deepspeed"]


class _CallerFd:
    """One of the caller's file descriptors, duplicated into a rank when the rank is started (the
    fork server's own stdout and stderr are those of the test that started it)."""

    def __init__(self, fd):
        self.fd = fd

    def __reduce__(self):
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


def _worker(fn, rank, world_size, port, kwargs, results, env, stdout, stderr):
    for fd, target in ((stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(
        env, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        out = fn(rank, world_size, **kwargs)
        # Serialise here: tensors put on a queue directly are shared through file descriptors
        # that vanish when this process exits.
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from mmoe_megatron import distributed

            distributed.shutdown()
        except Exception:
            pass


def run_distributed(fn, world_size: int = 2, timeout: float = 300, **kwargs) -> list:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, kwargs, results, env,
                                          _CallerFd(1), _CallerFd(2)), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, payload = results.get(timeout=timeout)
            if status == "ok":
                import torch

                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=True)
            else:
                errors[rank] = payload
            if errors:
                break
    except queue.Empty:
        errors[-1] = f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(outputs))}"
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        rank, tb = sorted(errors.items())[0]
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    return [outputs[r] for r in range(world_size)]
