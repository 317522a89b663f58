"""Run megatron-core 0.16.1 where it was not written to run.

Two independent groups of adjustments, each applied only where it is needed:

* ``apply_cpu_compat()``: only when no CUDA device exists. It lets the same megatron-core
  code run on CPU with the gloo backend (tests, CI, laptops). On a machine with CUDA it
  returns without touching anything.
* ``apply_missing_te_fix()``: only when Transformer Engine is not installed. megatron-core
  0.16.1 names ``te_general_gemm`` in ``moe_utils.router_gating_linear`` even when its
  import failed; this binds the name to ``None`` so the plain ``torch.mm`` path is taken.
  With Transformer Engine installed it changes nothing.

Each item names the megatron-core line (``site-packages/megatron/core/...``) it answers.
Everything else in the project goes through megatron-core's public extension points.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

_applied: set[str] = set()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_all() -> None:
    """Apply whatever this machine needs; idempotent and cheap to call often."""
    apply_missing_te_fix()
    apply_cpu_compat()


def apply_missing_te_fix() -> None:
    if "te" in _applied:
        return
    _applied.add("te")
    from megatron.core.transformer.moe import moe_utils

    # transformer/moe/moe_utils.py:1192 reads `te_general_gemm`, bound only by the TE import
    # at :24-35. Without TE the name is missing (NameError on every router forward).
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _NoStream:
    """Stand-in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def record_event(self, event=None):
        return _NoStream()

    def synchronize(self):
        pass

    def record(self, stream=None):
        pass

    def wait_event(self, event):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoStream)

    __hash__ = object.__hash__


_CURRENT_STREAM = _NoStream()


def apply_cpu_compat() -> None:
    if cuda_available() or "cpu" in _applied:
        return
    _applied.add("cpu")

    # utils.py:631, transformer/moe/router.py:90-92,169-198, tensor_parallel/mappings.py:91,141,
    # 148,181,442 allocate with `device=torch.cuda.current_device()`; the router also moves its
    # weight there in `gating`. Answer with the CPU device.
    torch.cuda.current_device = lambda: torch.device("cpu")

    # transformer/moe/token_dispatcher.py:445 creates a torch.cuda.Stream in __init__, and
    # :871-895 use current_stream / stream() / record_event around the DtoH copies.
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda device=None: _CURRENT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()

    # tensor_parallel/random.py:55 and :84-111 read and write the CUDA generator when forking
    # the model-parallel RNG tracker (dropout, expert init); random.py:422-431 seeds it.
    # On CPU the tracker keeps CPU generator states instead.
    from megatron.core.tensor_parallel import random as mcore_random

    def _get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = _get_rng_state
    mcore_random._set_cuda_rng_state = _set_rng_state
    # random.py:264-266 warns when the CPU generator changed inside a CUDA-RNG fork; here the
    # forked state *is* the CPU generator's, so every dropout inside a fork would warn.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed

    # transformer/moe/moe_utils.py:1093 turns split sizes into numpy only for CUDA tensors;
    # left as CPU tensors, gloo's all_to_all_single (tensor_parallel/mappings.py, `all_to_all`)
    # rejects them. token_dispatcher.py:31 imported the function by name, so rebind it there.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def _move_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = _move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_cpu
    logger.debug("megatron-core CPU compatibility layer applied")
