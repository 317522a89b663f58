"""Back-of-the-envelope resource estimates for a config on a given number of GPUs.

Memory per GPU, bytes (ZeRO-1/2 under DeepSpeed, bf16 weights, fp32 master and Adam):
  weights      2 B x (dense params / TP + expert params / (EP x TP_expert))
  gradients    4 B (fp32 accumulation) x local params, divided by DP under ZeRO-2
  optimizer    12 B (fp32 master + two Adam moments) x local params / DP (ZeRO shards them)
  activations  per layer and token, bf16: 2 B x (12 h + k_max x (2 h + 3 I_expert)): attention
               and norm inputs (~12 h, with flash attention so no seq^2 scores; local attention
               on CPU adds 5 heads seq), and per selected expert the dispatched copy and the
               SwiGLU intermediates. Selective recompute ("moe") keeps ~13 h, full ~1 h.
               Plus fp32 logits: 4 B x vocab per token.
These are estimates for planning, not measurements; allocator overheads and communication
buffers come on top (budget ~10-20 %).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmoe_megatron.config.derive import flops_per_token, param_counts, padded_vocab_size
from mmoe_megatron.config.schema import ExperimentConfig


@dataclass(frozen=True)
class Estimate:
    world_size: int
    total_params: int
    active_params_k_max: int
    tokens_per_step: int
    train_flops_per_token_k_max: float
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib


def estimate(cfg: ExperimentConfig, vocab_size: int, world_size: int) -> Estimate:
    m, moe = cfg.model, cfg.moe
    tp, ep = cfg.parallel.tensor, cfg.parallel.expert
    dp = world_size // (tp * cfg.parallel.pipeline)
    counts = param_counts(cfg, vocab_size)
    expert_params = cfg.num_moe_layers * moe.num_experts * 3 * m.hidden_size * moe.expert_ffn_hidden_size
    dense_params = counts.total - expert_params
    local = dense_params / tp + expert_params / (ep * tp)
    gib = 1024 ** 3
    grads = 4 * local / (dp if cfg.optimizer.zero_stage == 2 else 1)
    optimizer = 12 * local / dp
    h = m.hidden_size
    moe_part = cfg.matryoshka.k_max * (2 * h + 3 * moe.expert_ffn_hidden_size)
    per_token_layer = {"none": 12 * h + moe_part, "selective": 13 * h, "full": h}[cfg.train.recompute]
    if m.backend == "local":
        per_token_layer += 5 * m.num_attention_heads * cfg.data.seq_length
    tokens_local = cfg.train.micro_batch_size * cfg.data.seq_length
    activations = 2 * per_token_layer * tokens_local * m.num_layers / tp
    activations += 4 * tokens_local * padded_vocab_size(cfg, vocab_size) / tp  # fp32 logits
    return Estimate(
        world_size=world_size,
        total_params=counts.total,
        active_params_k_max=counts.active,
        tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_length,
        train_flops_per_token_k_max=3 * flops_per_token(cfg, vocab_size),
        weights_gib=2 * local / gib,
        grads_gib=grads / gib,
        optimizer_gib=optimizer / gib,
        activations_gib=activations / gib,
    )


def describe(cfg: ExperimentConfig, vocab_size: int, world_size: int) -> str:
    e = estimate(cfg, vocab_size, world_size)
    ks = cfg.matryoshka.ks
    active = {k: param_counts(cfg, vocab_size, k).active for k in (ks[0], ks[-1])}
    return "\n".join([
        f"{cfg.name} on {world_size} GPUs (TP {cfg.parallel.tensor}, EP {cfg.parallel.expert}, "
        f"DP {world_size // cfg.parallel.tensor}, ZeRO-{cfg.optimizer.zero_stage})",
        f"  parameters: {_count(e.total_params)} total; active {_count(active[ks[0]])} at "
        f"k={ks[0]} .. {_count(active[ks[-1]])} at k={ks[-1]}",
        f"  tokens per step: {e.tokens_per_step:,} "
        f"({cfg.train.global_batch_size} x {cfg.data.seq_length})",
        f"  training FLOPs per token at k_max: {e.train_flops_per_token_k_max / 1e6:,.1f} MFLOP",
        f"  memory per GPU (estimate): weights {e.weights_gib:.1f} + grads {e.grads_gib:.1f} + "
        f"optimizer {e.optimizer_gib:.1f} + activations {e.activations_gib:.1f} "
        f"= {e.total_gib:.1f} GiB",
    ])


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
