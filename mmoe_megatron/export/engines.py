"""What the serving engines accept, checked at export time (a warning, since transformers serves
any shape): vLLM's attention backends support only some head sizes.

Read from vLLM 0.32.0 (the version the serving venv pins):
* CPU: vllm/v1/attention/backends/cpu_attn.py, CPUAttentionBackend.get_supported_head_sizes
  (lines 69-70): 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512. A head of 16 fails at the
  first forward with "Unsupported CPU attention configuration: head_dim=16".
* NVIDIA GPU: vllm/v1/attention/backends/flash_attn.py, FlashAttentionBackend.supports_head_size
  (lines 423-427): a multiple of 8 up to 256 (512 only with FlashAttention 4);
  vllm/v1/attention/backends/triton_attn.py, TritonAttentionBackend.supports_head_size
  (lines 355-356): 32 or more. vLLM picks a backend that accepts the head size, so a head size
  is refused on GPU only when neither accepts it.
"""

from __future__ import annotations

import warnings

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ServingCompatibilityWarning(UserWarning):
    """The export is valid Qwen3-MoE but a serving engine will refuse to run it."""


def vllm_gpu_accepts(head_dim: int) -> bool:
    flash_attention = head_dim % 8 == 0 and head_dim <= 256
    triton = head_dim >= 32
    return flash_attention or triton


def serving_problems(head_dim: int, setting: str) -> list[str]:
    """Why vLLM would refuse a model with heads of `head_dim` (empty when it accepts it);
    `setting` names where head_dim comes from in the training config."""
    problems = []
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        problems.append(
            f"head_dim={head_dim} ({setting}): vLLM's CPU attention runs only head sizes "
            f"{list(VLLM_CPU_HEAD_SIZES)}; train with one of those to serve this model with vLLM on CPU")
    if not vllm_gpu_accepts(head_dim):
        problems.append(
            f"head_dim={head_dim} ({setting}): vLLM's GPU attention needs a multiple of 8 up to 256 "
            "(FlashAttention) or at least 32 (Triton); train with such a head size to serve this model "
            "with vLLM on GPU")
    return problems


def warn_serving_problems(head_dim: int, setting: str) -> list[str]:
    problems = serving_problems(head_dim, setting)
    for problem in problems:
        warnings.warn(problem, ServingCompatibilityWarning, stacklevel=3)
    return problems
