"""Hugging Face export and import (Qwen3-MoE), and loading an export at any k.

* `qwen3_moe`: the parameter and config mapping, megatron -> Hugging Face, and `ExportError`;
  `qwen3_moe_import`: Hugging Face -> megatron weights and experiment config.
* `convert`: whole directories (`export_to_hf`, `import_from_hf`), used by tools/export_hf.py
  and tools/import_hf.py.
* `serving`: `load_hf_model(path, k)` with one k or one k per MoE layer.
"""

from mmoe_megatron.export.qwen3_moe import ExportError, check_exportable, hf_config_dict, to_hf_state_dict
from mmoe_megatron.export.qwen3_moe_import import experiment_sections, from_hf_state_dict
from mmoe_megatron.export.serving import current_hf_topk, load_hf_model, set_hf_topk

__all__ = [
    "ExportError",
    "check_exportable",
    "current_hf_topk",
    "experiment_sections",
    "from_hf_state_dict",
    "hf_config_dict",
    "load_hf_model",
    "set_hf_topk",
    "to_hf_state_dict",
]
