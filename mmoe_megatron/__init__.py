"""Matryoshka Mixture-of-Experts pretraining on megatron-core and DeepSpeed.

One model trained with a top-k drawn per token and MoE layer (or per layer, per step) serves at
any k afterwards.
"""

__version__ = "0.1.0"
