"""vLLM plugin (entry point `vllm.general_plugins` in pyproject.toml): per-layer top-k in vLLM.

vLLM calls `register()` in each of its processes. It registers the architecture
`MatryoshkaQwen3MoeForCausalLM` lazily (as "module:class", so vLLM imports the model code only
when a model asks for it). A plain Qwen3-MoE export is served with one k per MoE layer by
selecting it at start-up:

    vllm serve exports/X --hf-overrides \
        '{"architectures": ["MatryoshkaQwen3MoeForCausalLM"], "matryoshka_layer_ks": [1, 4, 2]}'
    vllm serve exports/X --hf-overrides \
        '{"architectures": ["MatryoshkaQwen3MoeForCausalLM"], "matryoshka_budget": "mean_k=2"}'
"""

from __future__ import annotations

from mmoe_megatron.serving.layer_ks import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "mmoe_megatron.serving.vllm_model:MatryoshkaQwen3MoeForCausalLM")
