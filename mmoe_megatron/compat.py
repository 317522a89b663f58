"""Run megatron-core where it was not written to run, and across its supported releases.

Three independent groups of adjustments, each applied only where it is needed:

* ``apply_cpu_compat()``: only when no CUDA device exists. It lets the same megatron-core
  code run on CPU with the gloo backend (tests, CI, laptops). On a machine with CUDA it
  returns without touching anything.
* ``apply_missing_te_fix()``: only when Transformer Engine is not installed. megatron-core
  0.16.1 names ``te_general_gemm`` in ``moe_utils.router_gating_linear`` even when its
  import failed; this binds the name to ``None`` so the plain ``torch.mm`` path is taken.
  With Transformer Engine installed (or from 0.17 on, which binds it itself) it changes nothing.
* API differences between the two supported releases, megatron-core 0.16.1 (Python 3.11) and
  0.19.2 (Python 3.12): the form of a layer spec's MoE entry, the keyword arguments megatron
  hands to MLP and router builders, and the MoE metrics tracker. These are plain functions
  that look at what the installed release provides; nothing is patched.

Each item names the megatron-core line (``site-packages/megatron/core/...``) it answers, with
the release when the line differs between them. Everything else in the project goes through
megatron-core's public extension points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Optional

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
    # weight there in `gating` (0.19.2: utils.py:715, router.py:98-100,184-247, mappings.py:95-447).
    # Answer with the CPU device.
    torch.cuda.current_device = lambda: torch.device("cpu")

    # transformer/moe/token_dispatcher.py:445 creates a torch.cuda.Stream in __init__, and
    # :871-895 use current_stream / stream() / record_event around the DtoH copies (0.19.2: :469
    # and :920-945).
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda device=None: _CURRENT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()

    # tensor_parallel/random.py:55 and :84-111 read and write the CUDA generator when forking
    # the model-parallel RNG tracker (dropout, expert init); random.py:422-431 seeds it
    # (0.19.2: :104-150, :305, :490).
    # On CPU the tracker keeps CPU generator states instead.
    from megatron.core.tensor_parallel import random as mcore_random

    def _get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = _get_rng_state
    mcore_random._set_cuda_rng_state = _set_rng_state
    # random.py:264-266 (0.19.2: :333) warns when the CPU generator changed inside a CUDA-RNG
    # fork; here the forked state *is* the CPU generator's, so every dropout inside a fork would warn.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed

    # transformer/moe/moe_utils.py:1093 (0.19.2: :1185) turns split sizes into numpy only for CUDA
    # tensors; left as CPU tensors, gloo's all_to_all_single (tensor_parallel/mappings.py,
    # `all_to_all`) rejects them. token_dispatcher.py:31 (0.19.2: :39) imported the function by
    # name, so rebind it there.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def _move_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = _move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_cpu
    logger.debug("megatron-core CPU compatibility layer applied")


# --- API differences between megatron-core 0.16.1 and 0.19.2 -----------------------------------


def megatron_core_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the installed megatron-core (local suffixes such as +abc dropped)."""
    from megatron.core import package_info

    # package_info.py:32 (0.19.2) appends the commit of the current directory's git checkout
    # to __version__; the numbers themselves are exact.
    return (int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH))


@dataclasses.dataclass(frozen=True)
class MoEMlpEntry:
    """A builder entry of a transformer layer spec (the MoE layer, or its experts), whatever form
    the release gives it."""

    module: type
    """The class the entry builds (megatron's MoELayer or a subclass; SequentialMLP, ...)."""
    submodules: Any
    """Its submodules (MoESubmodules of the layer; MLPSubmodules of the experts)."""
    params: dict
    """Other keyword arguments the entry passes to the class."""
    form: str
    """"module_spec" (0.16) or "partial" (0.19)."""


def moe_mlp_entry(mlp) -> Optional[MoEMlpEntry]:
    """The MoE entry in a layer spec's `mlp` submodule, or None for a dense MLP.

    0.16.1: `ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))`
    (models/gpt/moe_module_specs.py:63). 0.19.2: a builder
    `functools.partial(MoELayer, submodules=MoESubmodules(...))` (moe_module_specs.py:87), called
    by transformer_layer.py:433 with config, pg_collection, is_mtp_layer and name.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp, ModuleSpec):
        if isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer):
            return MoEMlpEntry(mlp.module, mlp.submodules, dict(mlp.params), "module_spec")
        return None
    if isinstance(mlp, functools.partial) and isinstance(mlp.func, type) and issubclass(mlp.func, MoELayer):
        params = dict(mlp.keywords)
        submodules = params.pop("submodules", None)
        if mlp.args:
            raise TypeError(f"unexpected positional arguments in the MoE layer builder: {mlp.args}")
        return MoEMlpEntry(mlp.func, submodules, params, "partial")
    return None


def with_moe_mlp(mlp, module: type, submodules) -> Any:
    """`mlp` (an MoE entry of either form) rebuilt with another layer class and submodules."""
    entry = moe_mlp_entry(mlp)
    if entry is None:
        raise TypeError(f"not an MoE layer entry: {mlp!r}")
    if entry.form == "module_spec":
        return dataclasses.replace(mlp, module=module, submodules=submodules)
    return functools.partial(module, submodules=submodules, **entry.params)


def experts_entry(experts) -> Optional[MoEMlpEntry]:
    """The experts entry of an MoESubmodules, or None for a form not known here.

    0.16.1: `ModuleSpec(module=SequentialMLP or TEGroupedMLP, submodules=MLPSubmodules(...))`
    (models/gpt/moe_module_specs.py:57), built by build_module (moe_layer.py:223). 0.19.2:
    `functools.partial(SequentialMLP or TEGroupedMLP, submodules=...)` (models/backends.py:135,
    extensions/transformer_engine_spec_provider.py:78), called by moe_layer.py:326 with
    num_local_experts, config, pg_collection and name.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(experts, ModuleSpec) and isinstance(experts.module, type):
        return MoEMlpEntry(experts.module, experts.submodules, dict(experts.params), "module_spec")
    if isinstance(experts, functools.partial) and isinstance(experts.func, type) and not experts.args:
        params = dict(experts.keywords)
        submodules = params.pop("submodules", None)
        return MoEMlpEntry(experts.func, submodules, params, "partial")
    return None


def with_experts(experts, module: type, **params) -> Any:
    """An experts entry rebuilt with another class, in the same form, with `params` added to the
    keyword arguments the class is built with."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    entry = experts_entry(experts)
    if entry is None:
        raise TypeError(f"not an experts entry: {experts!r}")
    params = {**entry.params, **params}
    if entry.form == "module_spec":
        return ModuleSpec(module=module, submodules=entry.submodules, params=params)
    return functools.partial(module, submodules=entry.submodules, **params)


def moe_metrics_values() -> dict[str, tuple["torch.Tensor", Any]]:
    """Each MoE metric recorded since the last clear: name -> (per-layer sums [num_layers], the
    group its per-rank values are to be summed over, or None).

    0.16.1: moe_utils.get_moe_layer_wise_logging_tracker() (moe_utils.py:1103). 0.19.2 moved the
    tracker to moe_logging.get_moe_metrics_tracker() (moe_logging.py:49) and deprecated the old
    accessors (moe_utils.py:1086, with a warning on every call).
    """
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return {name: (entry["values"], entry.get("reduce_group"))
                for name, entry in get_moe_layer_wise_logging_tracker().items()}
    return {name: (entry.values, entry.reduce_group)
            for name, entry in get_moe_metrics_tracker().metrics.items()}


def clear_moe_metrics() -> None:
    """Zero the MoE metrics tracker (0.16.1: moe_utils.py:903; 0.19.2: moe_logging.py:214)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        return
    get_moe_metrics_tracker().clear()


def record_moe_metric(name: str, value: "torch.Tensor", layer_number: int, num_layers: int) -> None:
    """Add a per-layer value to the MoE metrics tracker (0.16.1: save_to_aux_losses_tracker,
    moe_utils.py:866; 0.19.2: MoEMetricsTracker.record, moe_logging.py:94)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

        save_to_aux_losses_tracker(name, value, layer_number, num_layers)
        return
    get_moe_metrics_tracker().record(name, value, layer_number, num_layers)


def null_tokenizer_library() -> str:
    """The `library` name of megatron-core's NullTokenizer in tokenizer metadata: "null" in
    0.16.1 (tokenizers/megatron_tokenizer.py:21), "null-text" in 0.19.2 (megatron_tokenizer.py:29;
    "null" is refused at :84)."""
    from megatron.core.tokenizers import megatron_tokenizer

    return "null-text" if "null-text" in getattr(megatron_tokenizer, "TEXT_LIBRARIES", ()) else "null"
