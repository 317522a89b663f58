"""Serving an export with a different top-k in every MoE layer.

* `layer_ks`: which k each MoE layer routes at, from config.json and the engine's start-up
  overrides (pure Python, shared by the engine plugin and the tests).
* `vllm_plugin`: the `vllm.general_plugins` entry point; it registers
  `MatryoshkaQwen3MoeForCausalLM` (`vllm_model`) with vLLM. Nothing here imports vLLM until vLLM
  itself loads the plugin.
"""
