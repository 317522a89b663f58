"""Optional GPU extras, detected at run time and never required.

Transformer Engine and NVIDIA Apex are built on GPU clusters (see README, "GPU extras").
Note: the PyPI package named `apex` is an unrelated web toolkit; NVIDIA Apex is recognised
by its `apex.normalization` module.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def have_transformer_engine() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # an install without its CUDA libraries counts as absent
        return False
    return True


@functools.cache
def have_nvidia_apex() -> bool:
    try:
        return importlib.util.find_spec("apex.normalization") is not None
    except ModuleNotFoundError:
        return False
