"""Small shared builders for tests."""

from __future__ import annotations

import os

import torch

from mmoe_megatron.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
VOCAB = 256


def tiny_config(**overrides):
    """configs/tiny.yaml with dotted overrides, e.g. tiny_config(**{"moe.dispatcher": "allgather"})."""
    return load_config(TINY, list(overrides.items()))


def tiny_batch(cfg, num_samples: int, seed: int = 0):
    """Random token ids [num_samples, seq] with labels shifted by one, and the causal mask."""
    gen = torch.Generator().manual_seed(seed)
    seq = cfg.data.seq_length
    tokens = torch.randint(0, VOCAB, (num_samples, seq + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]


def forward_loss(model, tokens, labels):
    """Mean token loss of a megatron GPTModel (it returns per-token losses when given labels)."""
    seq = tokens.shape[1]
    positions = torch.arange(seq).expand_as(tokens)
    per_token = model(tokens, positions, causal_mask(seq), labels=labels)
    return per_token.float().mean()


def logged_steps(run_dir) -> dict[int, tuple]:
    """(loss, grad norm, lr) of every step in <run_dir>/metrics.jsonl; a step logged again by a
    resumed run keeps its last record (the project's own reader)."""
    from mmoe_megatron.training.metrics import read_metrics

    return {step: (r["loss"], r["grad_norm"], r["lr"]) for step, r in read_metrics(str(run_dir))["train"].items()}


def set_gate_log_gains(model) -> list[list[float]]:
    """Give every MoE layer's learned gains (one per trained k) distinct values away from 1 (about
    0.7 to 2.2, rising with k), so that folding them into the experts, or forgetting to rescale them
    for another k, changes the logits visibly. Returns them in layer order."""
    values = []
    with torch.no_grad():
        params = [p for n, p in model.named_parameters() if n.endswith("router.log_gain")]
        assert params, "the model has no learned gains"
        for layer, param in enumerate(params):
            log_g = torch.linspace(-0.3, 0.6, param.numel()) * (1.0 + 0.2 * layer)
            param.copy_(log_g.to(param.dtype))
            values.append([float(x) for x in param.float()])
    return values


def set_gate_log_temperatures(model) -> list[list[float]]:
    """Give every MoE layer's learned gate temperatures (one per trained k) distinct values far
    from 1 (T from about 0.5 to 2), as a long training run might, so that folding them into the
    gates, or forgetting to, changes the logits visibly. Returns them in layer order."""
    values = []
    with torch.no_grad():
        params = [p for n, p in model.named_parameters() if n.endswith("router.log_temperature")]
        assert params, "the model has no learned gate temperatures"
        for layer, param in enumerate(params):
            log_t = torch.linspace(0.6, -0.5, param.numel()) * (1.0 + 0.25 * layer)
            param.copy_(log_t.to(param.dtype))
            values.append([float(x) for x in param.float()])
    return values
