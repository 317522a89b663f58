"""`MatryoshkaQwen3MoeForCausalLM`: vLLM's Qwen3-MoE with its own top-k in every MoE layer.

Imported by vLLM only (through the plugin's lazy registration); it needs vLLM 0.32.

Why a model class: vLLM's Qwen3-MoE (vllm/model_executor/models/qwen3_moe.py, 0.32.0) builds every
MoE block with `top_k=config.num_experts_per_tok` (Qwen3MoeSparseMoeBlock.__init__, line 207), and
that k reaches the router, the expert kernel's configuration and its workspace sizes, so it must be
right when the layer is built, not patched afterwards. Each decoder layer here is built from a
copy of the engine config whose model config carries that layer's k; the weights, the weight
loading and everything else are the stock Qwen3-MoE's, so any Qwen3-MoE export loads unchanged.
Which k each layer gets, and the errors for a request the model cannot serve, come from
`mmoe_megatron.serving.layer_ks` and are raised while the engine starts. A model trained with
learned gate temperatures has them folded into its gate weights at the export's k; each layer's
gate weight is rescaled to its own k while the weights load (`gate_scales`); learned gains,
folded into the experts' down projections, are rescaled the same way (`down_scales`).
"""

from __future__ import annotations

import copy
import re
from typing import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models import qwen3_moe
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

from mmoe_megatron.serving.layer_ks import down_scales, gate_scales, serving_layer_ks

logger = init_logger(__name__)
_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")
_DOWN = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(?:\d+\.)?down_proj(?:\.weight)?$")


def _with_top_k(vllm_config: VllmConfig, k: int) -> VllmConfig:
    """A shallow copy of the engine config whose model config says `num_experts_per_tok = k`;
    every other sub-config (cache, compilation, parallel) is the shared original."""
    text_config = copy.copy(vllm_config.model_config.hf_text_config)
    text_config.num_experts_per_tok = k
    model_config = copy.copy(vllm_config.model_config)
    model_config.hf_text_config = text_config
    out = copy.copy(vllm_config)
    out.model_config = model_config
    return out


class MatryoshkaQwen3MoeDecoderLayer(qwen3_moe.Qwen3MoeDecoderLayer):
    """A Qwen3-MoE decoder layer whose MoE block routes at the k resolved for its index."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        layer_ks = serving_layer_ks(vllm_config.model_config.hf_text_config)
        k = layer_ks.get(extract_layer_index(prefix))
        if k is not None:  # dense layers (mlp_only_layers) have no router
            vllm_config = _with_top_k(vllm_config, k)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)


class MatryoshkaQwen3MoeModel(qwen3_moe.Qwen3MoeModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         decoder_layer_type=MatryoshkaQwen3MoeDecoderLayer)


class MatryoshkaQwen3MoeForCausalLM(qwen3_moe.Qwen3MoeForCausalLM):
    """Qwen3MoeForCausalLM whose inner model is built from `MatryoshkaQwen3MoeDecoderLayer`s.

    The parent's constructor builds its inner model by a fixed class, so this one builds the
    same parts itself, the way vLLM's own Qwen3-VL-MoE language model (qwen3_vl_moe.py,
    Qwen3MoeLLMForCausalLM) does; forward, logits and weight loading are inherited.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_text_config
        # The user's mistake is raised before anything is allocated.
        self.layer_top_ks = serving_layer_ks(config)
        self.gate_scales = gate_scales(config, self.layer_top_ks)
        self.down_scales = down_scales(config, self.layer_top_ks)
        logger.info("Matryoshka Qwen3-MoE: top-k per MoE layer %s", self.layer_top_ks)
        if self.gate_scales:
            logger.info("Matryoshka Qwen3-MoE: gate weights rescaled to the learned temperature of each "
                        "layer's k by %s", {i: round(f, 6) for i, f in self.gate_scales.items()})
        if self.down_scales:
            logger.info("Matryoshka Qwen3-MoE: expert down projections rescaled to the learned gain of each "
                        "layer's k by %s", {i: round(f, 6) for i, f in self.down_scales.items()})
        self.config = config
        self.quant_config = vllm_config.quant_config
        if getattr(config, "mlp_only_layers", []):  # dense layers hold a fused gate_up_proj
            self.packed_modules_mapping = {**self.packed_modules_mapping, "gate_up_proj": ["gate_proj", "up_proj"]}
        self.model = MatryoshkaQwen3MoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self._set_moe_metadata()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def rescaled():
            for name, tensor in weights:
                match, down = _GATE.match(name), _DOWN.match(name)
                scale = (self.gate_scales.get(int(match.group(1))) if match else
                         self.down_scales.get(int(down.group(1))) if down else None)
                yield name, tensor if scale is None else (tensor.float() * scale).to(tensor.dtype)

        return super().load_weights(rescaled())

    def _set_moe_metadata(self) -> None:
        """The expert counts vLLM's MixtureOfExperts interface reads (expert load balancing)."""
        blocks = [layer.mlp for layer in self.model.layers
                  if isinstance(getattr(layer, "mlp", None), qwen3_moe.Qwen3MoeSparseMoeBlock)]
        if not blocks:
            raise RuntimeError("no Qwen3-MoE sparse block was built: the config lists every layer as dense")
        example = blocks[0]
        self.moe_layers = [block.experts for block in blocks]
        self.num_moe_layers = len(blocks)
        self.num_expert_groups = 1
        self.num_shared_experts = 0
        self.num_logical_experts = example.n_logical_experts
        self.num_physical_experts = example.n_physical_experts
        self.num_local_physical_experts = example.n_local_physical_experts
        self.num_routed_experts = example.n_routed_experts
        self.num_redundant_experts = example.n_redundant_experts
