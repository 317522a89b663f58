"""The CPU compatibility layer acts only without CUDA, and the TE fix only without TE."""

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_cpu_layer_changes_nothing_when_cuda_is_present():
    out = run("""
        import torch
        torch.cuda.is_available = lambda: True          # what a GPU machine reports
        before = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.get_rng_state,
                  torch.cuda.manual_seed, torch.cuda.current_stream)
        from megatron.core.tensor_parallel import random as r
        from megatron.core.transformer.moe import token_dispatcher as td
        mcore = (r._get_cuda_rng_state, r._set_cuda_rng_state, td.maybe_move_tensor_to_cpu)
        from mmoe_megatron import compat
        compat.apply_cpu_compat()
        after = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.get_rng_state,
                 torch.cuda.manual_seed, torch.cuda.current_stream)
        print(before == after, mcore == (r._get_cuda_rng_state, r._set_cuda_rng_state,
                                         td.maybe_move_tensor_to_cpu))
    """)
    assert out == "True True"


def test_cpu_layer_applies_without_cuda():
    out = run("""
        import torch
        from mmoe_megatron import compat
        compat.apply_cpu_compat()
        torch.cuda.Stream().wait_stream(torch.cuda.current_stream())
        from megatron.core.transformer.moe import token_dispatcher as td
        print(torch.cuda.current_device(), td.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True).tolist())
    """)
    assert out == "cpu [1, 2]"


def test_te_fix_only_fills_a_missing_name():
    out = run("""
        from megatron.core.transformer.moe import moe_utils
        had = hasattr(moe_utils, "te_general_gemm")
        sentinel = object()
        if had:
            moe_utils.te_general_gemm = sentinel
        from mmoe_megatron import compat
        compat.apply_missing_te_fix()
        print(had, moe_utils.te_general_gemm is (sentinel if had else None))
    """)
    assert out.endswith("True")
