"""Slimmable experts (mmoe_megatron/slimmable.py) on one process: a width-w expert is the dense
SwiGLU FFN of its weight slices, full width is the stock experts bit for bit, gradients reach only
the active slice, per-token widths equal per-row references, and the grouped path's masking."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import VOCAB, forward_loss, tiny_batch, tiny_config

WIDTHS = [0.25, 0.5, 0.75, 1.0]
H, I, E = 64, 64, 8  # tiny.yaml: hidden 64, experts of 64 columns, 8 experts


def slim_config(**overrides):
    return tiny_config(**{"matryoshka.widths": WIDTHS, "data.seq_length": 16, **overrides})


def layer0_experts(model):
    from mmoe_megatron.model import slimmable_experts

    return slimmable_experts(model)[0]


def dense_ffn(x_NH, fc1_FH, fc2_HI, columns):
    """A plain SwiGLU FFN of width `columns` built from copies of the weight slices."""
    gate = torch.nn.Linear(H, columns, bias=False)
    up = torch.nn.Linear(H, columns, bias=False)
    down = torch.nn.Linear(columns, H, bias=False)
    with torch.no_grad():
        gate.weight.copy_(fc1_FH[:columns])
        up.weight.copy_(fc1_FH[I:I + columns])
        down.weight.copy_(fc2_HI[:, :columns])
    return down(F.silu(gate(x_NH)) * up(x_NH))


def dispatched(counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(counts)
    return torch.randn(n, H, generator=gen), torch.tensor(counts), torch.rand(n, generator=gen)


@pytest.mark.parametrize("width", WIDTHS)
def test_a_width_w_expert_is_the_dense_ffn_of_its_slices(single_process_mcore, width):
    from mmoe_megatron.model import build_model

    experts = layer0_experts(build_model(slim_config(), VOCAB))
    counts = [5, 0, 3, 7, 1, 0, 2, 4]
    x_NH, tokens_per_expert, probs_N = dispatched(counts)
    experts.set_width(width)
    out_NH, bias = experts(x_NH, tokens_per_expert, probs_N)
    assert bias is None and out_NH.shape == (sum(counts), H)
    start = 0
    for e, n in enumerate(counts):
        mlp = experts.local_experts[e]
        ref = dense_ffn(x_NH[start:start + n], mlp.linear_fc1.weight, mlp.linear_fc2.weight, int(width * I))
        torch.testing.assert_close(out_NH[start:start + n], ref * probs_N[start:start + n, None],
                                   rtol=1e-5, atol=1e-6)
        start += n


def _stock_and_slimmable(cfg):
    """The same model twice: megatron's SequentialMLP experts, and the slimmable experts."""
    import dataclasses
    from unittest import mock

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from mmoe_megatron import model as model_module
    from mmoe_megatron.config.derive import padded_vocab_size, transformer_config
    from mmoe_megatron.model import build_model, init_weights, layer_specs

    ours = build_model(cfg, VOCAB)
    tconfig = dataclasses.replace(transformer_config(cfg), perform_initialization=False)
    # The same layer specs with megatron-core's experts entry left as it is (whatever its form).
    with mock.patch.object(model_module, "experts_spec", lambda cfg, experts: experts):
        specs = layer_specs(cfg, tconfig)
    block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=LocalSpecProvider().layer_norm(rms_norm=True))
    stock = GPTModel(config=tconfig, transformer_layer_spec=block, vocab_size=padded_vocab_size(cfg, VOCAB),
                     max_sequence_length=cfg.data.seq_length, position_embedding_type="rope",
                     parallel_output=True)
    init_weights(stock, cfg, cfg.train.seed)
    assert type(layer0_experts(ours)).__name__ == "SlimmableSequentialMLP"
    assert not any(type(m).__name__.startswith("Slimmable") for m in stock.modules())
    return stock, ours


@pytest.mark.parametrize("widths", [[1.0], WIDTHS])
def test_full_width_is_the_stock_experts_bit_for_bit(single_process_mcore, widths):
    """Loss and every gradient are identical (==) to megatron's SequentialMLP at every k."""
    from mmoe_megatron.model import set_point, set_topk

    cfg = slim_config(**{"matryoshka.widths": widths})
    stock, ours = _stock_and_slimmable(cfg)
    tokens, labels = tiny_batch(cfg, 2, seed=4)
    for k in (1, 3):
        set_topk(stock, k)
        set_point(ours, k, 1.0)
        results = []
        for model in (stock, ours):
            model.zero_grad()
            loss = forward_loss(model, tokens, labels)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert torch.equal(results[0][0], results[1][0])
        assert results[0][1].keys() == results[1][1].keys()
        assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1]), k


def test_gradients_reach_only_the_active_slice(single_process_mcore):
    from mmoe_megatron.model import build_model, set_point

    model = build_model(slim_config(), VOCAB)
    tokens, labels = tiny_batch(slim_config(), 2, seed=1)
    set_point(model, 8, 0.25)  # every expert used, at its first 16 columns
    forward_loss(model, tokens, labels).backward()
    c = int(0.25 * I)
    for e in range(E):
        mlp = layer0_experts(model).local_experts[e]
        g1, g2 = mlp.linear_fc1.weight.grad, mlp.linear_fc2.weight.grad
        assert torch.count_nonzero(g1[c:I]) == 0 and torch.count_nonzero(g1[I + c:]) == 0
        assert torch.count_nonzero(g2[:, c:]) == 0
        assert torch.count_nonzero(g1[:c]) > 0 and torch.count_nonzero(g1[I:I + c]) > 0
        assert torch.count_nonzero(g2[:, :c]) > 0


def test_per_token_widths_equal_each_row_at_its_width(single_process_mcore):
    """Rows carrying their width level (the dispatched level column) each equal the dense FFN of
    their own width; a zero column takes the level's place in the output."""
    from mmoe_megatron.model import build_model

    experts = layer0_experts(build_model(slim_config(), VOCAB))
    counts = [6, 0, 9, 4, 1, 3, 0, 5]
    x_NH, tokens_per_expert, probs_N = dispatched(counts, seed=2)
    levels_N = torch.randint(1, 5, (sum(counts),), generator=torch.Generator().manual_seed(3))
    experts.set_token_levels(torch.ones(4, 2, dtype=torch.long))  # marks per-token mode
    x_with_level = torch.cat([x_NH, levels_N[:, None].float()], dim=1)
    out, _ = experts(x_with_level, tokens_per_expert, probs_N)
    assert out.shape == (sum(counts), H + 1) and torch.count_nonzero(out[:, -1]) == 0
    expert_N = torch.repeat_interleave(torch.arange(E), tokens_per_expert)
    for row in range(sum(counts)):
        mlp = experts.local_experts[int(expert_N[row])]
        columns = int(WIDTHS[int(levels_N[row]) - 1] * I)
        ref = dense_ffn(x_NH[row:row + 1], mlp.linear_fc1.weight, mlp.linear_fc2.weight, columns) * probs_N[row]
        torch.testing.assert_close(out[row:row + 1, :-1], ref, rtol=1e-5, atol=1e-6)


def test_grouped_path_masking_equals_the_sliced_experts():
    """The grouped (Transformer Engine) path's math on CPU: full-width linear_fc1 per expert, the
    columns beyond each row's width zeroed (`masked_swiglu`), full-width linear_fc2; outputs and
    weight gradients equal the sliced local path's."""
    from mmoe_megatron.slimmable import masked_swiglu, sliced_swiglu

    gen = torch.Generator().manual_seed(5)
    fc1 = (torch.randn(2 * I, H, generator=gen) * 0.1).requires_grad_()
    fc2 = (torch.randn(H, I, generator=gen) * 0.1).requires_grad_()
    x_NH, probs_N = torch.randn(12, H, generator=gen), torch.rand(12, generator=gen)
    columns_N = torch.tensor([16, 32, 48, 64] * 3)
    masked = F.linear(masked_swiglu(F.linear(x_NH, fc1), columns_N, probs_N, F.silu), fc2)
    sliced = torch.cat([sliced_swiglu(x_NH[i:i + 1], fc1, fc2, probs_N[i:i + 1], int(c), F.silu)
                        for i, c in enumerate(columns_N)])
    # Equal up to the order of fp32 sums (zeros added in another blocking).
    torch.testing.assert_close(masked, sliced, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), (fc1, fc2)) for out in (masked, sliced)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_active_parameters_and_flops_follow_the_width(single_process_mcore):
    from mmoe_megatron.config.derive import flops_per_token, param_counts
    from mmoe_megatron.model import build_model

    cfg = slim_config()
    model = build_model(cfg, VOCAB)
    expert = sum(p.numel() for n, p in model.named_parameters() if "layers.0.mlp.experts.local_experts.0." in n)
    full = param_counts(cfg, VOCAB, 2).active
    for width in WIDTHS:
        # An expert at width w holds w of its weights (3 H x wI); 2 experts per token, 4 MoE layers.
        assert full - param_counts(cfg, VOCAB, 2, width).active == 4 * 2 * round((1 - width) * expert)
    per_layer = param_counts(cfg, VOCAB, [1, 2, 3, 4], [1.0, 0.5, 0.25, 0.75]).active
    assert full - per_layer == sum((2 - k * w) * expert for k, w in zip([1, 2, 3, 4], [1.0, 0.5, 0.25, 0.75]))
    # FLOPs are affine in k x width: (k=4, 0.5) costs what (k=2, 1.0) costs.
    assert flops_per_token(cfg, VOCAB, 4, 0.5) == flops_per_token(cfg, VOCAB, 2)
    with pytest.raises(ValueError, match="multiple of 1/64"):
        flops_per_token(cfg, VOCAB, 2, 0.3)


def test_widths_can_be_set_per_layer_and_bad_ones_are_refused(single_process_mcore):
    from mmoe_megatron.model import build_model, set_point, set_width, slimmable_experts

    model = build_model(slim_config(), VOCAB)
    set_point(model, [1, 2, 3, 4], [1.0, 0.5, 0.25, 0.75])
    assert [e.width for e in slimmable_experts(model)] == [1.0, 0.5, 0.25, 0.75]
    set_point(model, 2)  # no width: back to full width everywhere
    assert [e.width for e in slimmable_experts(model)] == [1.0] * 4
    with pytest.raises(ValueError, match="one width per MoE layer"):
        set_width(model, [0.5, 1.0])
    with pytest.raises(ValueError, match=r"0.3 .* 19.2 columns"):
        set_width(model, 0.3)


@pytest.mark.parametrize("per_token", [False, True], ids=["one-width", "per-token-widths"])
def test_a_shared_expert_adds_its_full_width_output_at_every_k_and_width(single_process_mcore, per_token):
    """An MoE layer with a shared expert returns the routed experts' output plus the shared
    expert's dense SwiGLU at full width, whatever the routed experts' k and width (with per-token
    widths the dispatched rows carry a level column that the layer must drop before adding)."""
    from mmoe_megatron.model import build_model, set_point

    S, B, C = 16, 2, 48
    model = build_model(slim_config(**{"moe.shared_expert_ffn_hidden_size": C}), VOCAB).eval()
    layer = model.decoder.layers[0].mlp
    shared = layer.shared_experts
    assert tuple(shared.linear_fc1.weight.shape) == (2 * C, H)
    x_SBH = torch.randn(S, B, H, generator=torch.Generator().manual_seed(4))
    set_point(model, 2, 0.5)
    if per_token:
        levels_SB = torch.randint(1, 5, (S, B), generator=torch.Generator().manual_seed(5))
        layer.experts.set_token_levels(levels_SB)
    fc1, fc2 = shared.linear_fc1.weight.detach().clone(), shared.linear_fc2.weight.detach().clone()
    x_NH = x_SBH.reshape(-1, H)
    expected_NH = F.linear(F.silu(F.linear(x_NH, fc1[:C])) * F.linear(x_NH, fc1[C:]), fc2)
    with torch.no_grad():
        with_shared = layer(x_SBH)[0]
        shared.linear_fc2.weight.zero_()  # the same routing, without the shared expert's part
        routed_only = layer(x_SBH)[0]
    assert with_shared.shape == (S, B, H)
    assert expected_NH.abs().max() > 1e-3
    torch.testing.assert_close((with_shared - routed_only).reshape(-1, H), expected_NH, rtol=1e-4, atol=1e-6)
