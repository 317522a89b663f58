"""Hugging Face export and import (mmoe_megatron/export, tools/export_hf.py, tools/import_hf.py),
checked with real transformers in fp32 on CPU.

Export: a tiny Matryoshka MoE (MoE layers 0, 2, 3 and a dense layer 1, head_dim 24 != 64 / 4, a
vocabulary of 520 padded to 576 rows, a learned gate temperature per k) trains 3 steps on mock
data with expert parallelism 2 on two gloo processes; its temperatures are then set far from 1
(T 0.5 to 2, different in every layer) and saved. Those processes then compute, with the megatron
model in its EP-2 layout, the reference logits at several ks and a greedy continuation; the main
process exports the saved checkpoint with the CLI, loads it with AutoModelForCausalLM and compares.
Import: a random Qwen3-MoE built by transformers (tied embeddings, norm_topk_prob false, a dense
first layer) is imported with the CLI; megatron must reproduce its logits, and exporting the
imported weights must give back the original file bit for bit.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.data_fixtures import small_tokenizer  # noqa: F401
from tests.dist import run_distributed
from tests.helpers import causal_mask, set_gate_log_gains, set_gate_log_temperatures, tiny_config

VOCAB = 520  # padded by make_vocab_size_divisible_by=64 to 576 rows
PADDED = 576
SEQ = 32
PATTERN = [1, 0, 1, 1]
SPECS = [1, 2, 4, [1, 4, 2]]  # k = 1, a middle k, k_max (the training range is 1..4), per layer
SERVE_K = 2
# Points of the (k, width) grid exported as plain Qwen3-MoE models with sliced experts.
GRID = [(2, 0.5), ([1, 4, 2], 0.25)]
BUDGET = "mean_k=2.33"
TEXT = "Shall I compare thee to a summer's day?"
NEW_TOKENS = 8
# fp32, same weights, different kernels (megatron's baddbmm attention vs torch SDPA, rotary
# computed separately): measured differences are below 1e-6; a routing or mapping error gives > 1e-2.
TOL = 1e-4


def _train_config(run_dir: str):
    return tiny_config(**{
        "data.mock": True, "model.vocab_size": VOCAB, "model.kv_channels": 24, "moe.layer_freq": PATTERN,
        "data.seq_length": SEQ, "train.micro_batch_size": 2, "train.global_batch_size": 4,
        "train.train_iters": 3, "train.eval_interval": 0, "train.eval_iters": 1, "train.log_interval": 1,
        "optimizer.warmup_iters": 1, "matryoshka.eval_ks": [4], "parallel.expert": 2,
        "matryoshka.widths": [0.25, 0.5, 1.0], "matryoshka.gate_temperature": "learned",
        "matryoshka.gate_gain": "learned",
        "logging.dir": run_dir, "logging.tensorboard": False,
    })


def _megatron_logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, causal_mask(tokens.shape[1])).float()


def _train_ep2_and_reference(rank, world_size, run_dir, tokens, prompt):
    """Train with EP 2, save, then megatron's logits at each spec and a greedy continuation."""
    from mmoe_megatron import distributed
    from mmoe_megatron.model import set_point, set_topk
    from mmoe_megatron.training.trainer import Trainer

    cfg = _train_config(run_dir)
    distributed.init_distributed(cfg)
    trainer = Trainer(cfg)
    trainer.fit()
    model = trainer.engine.module
    out = {"log_temperatures": set_gate_log_temperatures(model), "log_gains": set_gate_log_gains(model),
           "logits": []}
    trainer.save()
    model.eval()
    with torch.no_grad():
        for spec in SPECS:
            set_point(model, spec)
            out["logits"].append(_megatron_logits(model, tokens))
        out["grid"] = []
        for k, width in GRID:
            set_point(model, k, width)
            out["grid"].append(_megatron_logits(model, tokens))
        set_point(model, SERVE_K)  # back to full width
        set_topk(model, SERVE_K)
        seq = prompt.clone()
        for _ in range(NEW_TOKENS):
            next_id = _megatron_logits(model, seq)[:, -1].argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, next_id], dim=1)
        out["generated"] = seq
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_tokenizer):  # noqa: F811
    import sentencepiece as spm

    from tools import export_hf

    tmp = tmp_path_factory.mktemp("export")
    run_dir = str(tmp / "run")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    prompt_ids = spm.SentencePieceProcessor(model_file=small_tokenizer).encode(TEXT)
    prompt = torch.tensor([prompt_ids])
    outs = run_distributed(_train_ep2_and_reference, world_size=2, timeout=400, run_dir=run_dir,
                           tokens=tokens, prompt=prompt)
    # Both ranks ran the same forwards (EP 2 splits the experts, not the tokens), to a few ulps:
    # each expert's GEMM holds both ranks' copies of a token at different rows, and BLAS kernels
    # may round rows by where they fall (MKL's AVX2 ones: 2.1e-7 on logits of size 1).
    for a, b in zip(outs[0]["logits"], outs[1]["logits"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    budgets = str(tmp / "budgets.json")
    with open(budgets, "w") as f:
        json.dump({BUDGET: SPECS[-1]}, f)
    out = str(tmp / "hf")
    code = export_hf.main(["--run", run_dir, "--k", str(SERVE_K), "--layer-budgets", budgets,
                           "--tokenizer", small_tokenizer, "--out", out])
    assert code == 0
    return {"dir": out, "tokens": tokens, "prompt": prompt, "prompt_ids": prompt_ids, "ref": outs[0],
            "tokenizer": small_tokenizer, "run": run_dir}


def test_exported_logits_equal_megatron_at_every_k(exported):
    from mmoe_megatron.export import current_hf_topk, load_hf_model

    diffs = {}
    for spec, ref in zip(SPECS, exported["ref"]["logits"]):
        model = load_hf_model(exported["dir"], k=spec, dtype=torch.float32).eval()
        assert current_hf_topk(model) == ([spec] * 3 if isinstance(spec, int) else spec)
        with torch.no_grad():
            logits = model(exported["tokens"]).logits
        assert logits.shape == ref.shape == (2, SEQ, PADDED)
        diffs[str(spec)] = float((logits - ref).abs().max())
    print("max |HF - megatron| logits:", diffs)
    assert max(diffs.values()) < TOL, diffs
    # The ks route differently, so a k ignored by the loader would fail above.
    ref = exported["ref"]["logits"]
    assert float((ref[0] - ref[2]).abs().max()) > 100 * TOL


def test_exported_grid_points_equal_megatron(exported, tmp_path):
    """A width below 1 exports as a plain Qwen3-MoE with sliced experts; transformers loads it
    with no custom code and gives megatron's logits at that (k, width)."""
    from safetensors.torch import load_file

    from mmoe_megatron.export import current_hf_topk, load_hf_model
    from tools import export_hf

    for (k, width), ref in zip(GRID, exported["ref"]["grid"]):
        out = str(tmp_path / f"w{width}")
        assert export_hf.main(["--run", exported["run"], "--k", str(SERVE_K), "--width", str(width),
                               "--no-tokenizer", "--out", out]) == 0
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
        columns = int(width * 64)
        assert config["moe_intermediate_size"] == columns and config["matryoshka"]["serving_width"] == width
        weights = load_file(os.path.join(out, "model.safetensors"))
        assert weights["model.layers.0.mlp.experts.3.gate_proj.weight"].shape == (columns, 64)
        assert weights["model.layers.2.mlp.experts.7.down_proj.weight"].shape == (64, columns)
        model = load_hf_model(out, k=k, dtype=torch.float32).eval()
        assert current_hf_topk(model) == ([k] * 3 if isinstance(k, int) else k)
        with torch.no_grad():
            diff = float((model(exported["tokens"]).logits - ref).abs().max())
        print(f"max |HF - megatron| logits at k={k}, width {width}: {diff:.2e}")
        assert diff < TOL, (k, width, diff)
    # The width changes the model: a full-width export would not have passed.
    assert float((exported["ref"]["grid"][0] - exported["ref"]["logits"][1]).abs().max()) > 100 * TOL


def test_export_refuses_widths_one_config_cannot_express(exported, tmp_path, capsys):
    from mmoe_megatron.export import ExportError, hf_config_dict
    from mmoe_megatron.export.convert import read_budgets
    from tools import export_hf

    cfg = _train_config(exported["run"])
    with pytest.raises(ExportError, match=r"width=\[1, 0.5, 0.5\]: Qwen3-MoE has one moe_intermediate_size") as error:
        hf_config_dict(cfg, PADDED, k=2, width=[1, 0.5, 0.5])
    assert "vLLM plugin (mmoe_megatron.serving) serves a k per layer but not a width per layer" in str(error.value)
    with pytest.raises(ExportError, match=r"0.3 .* 19.2 columns"):
        hf_config_dict(cfg, PADDED, k=2, width=0.3)
    assert export_hf.main(["--run", exported["run"], "--k", "2", "--width", "0.5,1,1", "--out",
                           str(tmp_path / "x")]) == 2
    assert "one moe_intermediate_size" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({"mixed": {"ks": [1, 2, 4], "widths": [1.0, 0.5, 0.5]},
                                   "narrow": {"ks": [2, 2, 1], "widths": [0.5, 0.5, 0.5]}}))
    with pytest.raises(ExportError, match=r"'mixed'.*widths \[1.0, 0.5, 0.5\]"):
        read_budgets(str(budgets), 0.5)
    budgets.write_text(json.dumps({"narrow": {"ks": [2, 2, 1], "widths": [0.5, 0.5, 0.5]}}))
    assert read_budgets(str(budgets), 0.5) == {"narrow": [2, 2, 1]}


def test_learned_temperatures_are_folded_at_the_export_k_and_rescaled_for_others(exported):
    """The gates hold the temperature of the export's k; load_hf_model and set_hf_topk rescale
    them for any other k, also one after another; a plain from_pretrained at another k keeps the
    export's temperature, which the temperatures set by the fixture make visibly wrong."""
    from transformers import AutoModelForCausalLM

    from mmoe_megatron.export import current_hf_topk, load_hf_model, set_hf_topk

    with open(os.path.join(exported["dir"], "config.json")) as f:
        record = json.load(f)["matryoshka"]["gate_temperatures"]
    assert record["trained_ks"] == [1, 2, 3, 4] and record["folded_ks"] == [SERVE_K] * 3
    assert torch.allclose(torch.tensor(record["log_temperatures"]), torch.tensor(exported["ref"]["log_temperatures"]))
    refs = dict(zip(map(str, SPECS), exported["ref"]["logits"]))
    model = load_hf_model(exported["dir"], k=1, dtype=torch.float32).eval()
    diffs = {}
    for spec in (4, [1, 4, 2], 1, SERVE_K):
        set_hf_topk(model, spec)
        assert current_hf_topk(model) == ([spec] * 3 if isinstance(spec, int) else spec)
        with torch.no_grad():
            diffs[str(spec)] = float((model(exported["tokens"]).logits - refs[str(spec)]).abs().max())
    print("max |HF - megatron| logits after successive set_hf_topk:", diffs)
    assert max(diffs.values()) < TOL, diffs
    plain = AutoModelForCausalLM.from_pretrained(exported["dir"], num_experts_per_tok=4, dtype=torch.float32).eval()
    with torch.no_grad():
        wrong = float((plain(exported["tokens"]).logits - refs["4"]).abs().max())
    # The experts of a model trained 3 steps add little to the logits, so the temperature moves
    # them by ~1e-2 (measured 9.6e-3), still 10 times the tolerance and 1e4 times the rounding.
    print(f"max |HF at k=4 with the export k's temperature - megatron at k=4| logits: {wrong:.2e}")
    assert wrong > 10 * TOL


def test_learned_gains_are_folded_into_the_experts_and_rescaled_for_other_ks(exported):
    """The experts' down projections hold the gain of the export's k (recorded with every layer's
    gains); set_hf_topk rescales them with the gates (the logits above equal megatron's at every
    k); undoing only the gain rescale at k = 4 leaves the logits visibly off."""
    from mmoe_megatron.export import load_hf_model
    from mmoe_megatron.serving.layer_ks import log_temperature_at

    with open(os.path.join(exported["dir"], "config.json")) as f:
        record = json.load(f)["matryoshka"]["gate_gains"]
    assert record["trained_ks"] == [1, 2, 3, 4] and record["folded_ks"] == [SERVE_K] * 3
    assert torch.allclose(torch.tensor(record["log_gains"]), torch.tensor(exported["ref"]["log_gains"]))
    model = load_hf_model(exported["dir"], k=4, dtype=torch.float32).eval()
    with torch.no_grad():
        right = float((model(exported["tokens"]).logits - exported["ref"]["logits"][2]).abs().max())
        for i, layer in zip((0, 2, 3), exported["ref"]["log_gains"]):  # PATTERN: layer 1 is dense
            ratio = math.exp(log_temperature_at([1, 2, 3, 4], layer, 4) - log_temperature_at([1, 2, 3, 4], layer, SERVE_K))
            model.model.layers[i].mlp.experts.down_proj.div_(ratio)
        wrong = float((model(exported["tokens"]).logits - exported["ref"]["logits"][2]).abs().max())
    print(f"max |HF - megatron| logits at k=4: {right:.2e}; with the export k's gain kept: {wrong:.2e}")
    assert right < TOL and wrong > 10 * TOL


def test_per_layer_budget_loads_by_name(exported):
    from mmoe_megatron.export import current_hf_topk, load_hf_model

    model = load_hf_model(exported["dir"], k=BUDGET).eval()
    assert current_hf_topk(model) == SPECS[-1]
    with torch.no_grad():
        logits = model(exported["tokens"]).logits
    assert float((logits - exported["ref"]["logits"][-1]).abs().max()) < TOL


def test_greedy_generation_agrees(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # No k given: config.json's num_experts_per_tok, the serving k.
    model = AutoModelForCausalLM.from_pretrained(exported["dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported["dir"])
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids.tolist() == [exported["prompt_ids"]]  # the HF tokenizer = SentencePiece here
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
    # generate stops early only at the end-of-document token, which megatron must then have chosen too.
    assert generated.shape[1] > ids.shape[1]
    assert generated.tolist() == exported["ref"]["generated"][:, :generated.shape[1]].tolist()


def test_export_directory(exported):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = exported["dir"]
    names = set(os.listdir(d))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model", "matryoshka.json", "budgets.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    cfg = _train_config(exported["run"])
    assert config["num_experts_per_tok"] == SERVE_K and config["num_experts"] == cfg.moe.num_experts
    assert config["vocab_size"] == PADDED and config["head_dim"] == 24
    assert config["mlp_only_layers"] == [i for i, m in enumerate(PATTERN) if not m]
    assert config["norm_topk_prob"] is (cfg.matryoshka.normalization == "topk_softmax")
    record = config["matryoshka"]
    assert record["trained_ks"] == cfg.matryoshka.ks and record["strategy"] == cfg.matryoshka.strategy
    assert record["layer_budgets"] == {BUDGET: SPECS[-1]} and record["moe_layers"] == [0, 2, 3]
    sp = spm.SentencePieceProcessor(model_file=exported["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(d)
    for text in ["And God said, Let there be light: and there was light.", "Sonnets excerpt 12\n\nx <|sep|> y"]:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    with open(os.path.join(d, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == sp.eos_id()


# --- import -------------------------------------------------------------------------------------


def _random_qwen3_moe(path: str):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
        norm_topk_prob=False, mlp_only_layers=[0], tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, dtype="float32",
    )
    torch.manual_seed(3)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms too, so a misplaced norm weight shows
            p.normal_(0.0, 0.3 if p.dim() == 1 else 0.08).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(path)
    return model


def _imported_megatron_logits(rank, world_size, imported, tokens, ks):
    """Load the imported weights as training's checkpoint.init_weights does, and run megatron."""
    from mmoe_megatron import distributed
    from mmoe_megatron.config import load_config
    from mmoe_megatron.model import build_model, set_topk
    from mmoe_megatron.training.checkpoint import load_global_state_dict, load_weights_into

    cfg = load_config(os.path.join(imported, "config.yaml"), [("logging.dir", imported)])
    distributed.init_distributed(cfg)
    model = build_model(cfg, cfg.model.vocab_size).eval()
    load_weights_into(model, cfg, load_global_state_dict(cfg.checkpoint.init_weights))
    out = []
    with torch.no_grad():
        for k in ks:
            set_topk(model, k)
            out.append(_megatron_logits(model, tokens))
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from tools import import_hf

    tmp = tmp_path_factory.mktemp("import")
    hf_dir, out = str(tmp / "hf"), str(tmp / "imported")
    model = _random_qwen3_moe(hf_dir)
    assert import_hf.main(["--hf", hf_dir, "--out", out, "--ks", "1,2,3"]) == 0
    return {"hf_dir": hf_dir, "out": out, "model": model}


def test_import_gives_the_hf_logits_in_megatron(imported):
    from mmoe_megatron.export import set_hf_topk

    tokens = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(9))
    ks = [1, 3, [2, 6]]
    (megatron,) = run_distributed(_imported_megatron_logits, world_size=1, imported=imported["out"],
                                  tokens=tokens, ks=ks)
    for k, ref in zip(ks, megatron):
        set_hf_topk(imported["model"], k)
        with torch.no_grad():
            logits = imported["model"](tokens).logits
        diff = float((logits - ref).abs().max())
        print(f"import: max |HF - megatron| logits at k={k}: {diff:.2e}")
        assert diff < TOL, (k, diff)


def test_hf_megatron_hf_round_trip_is_bitwise(imported):
    from safetensors.torch import load_file

    from mmoe_megatron.config import load_config
    from mmoe_megatron.export import hf_config_dict, to_hf_state_dict
    from mmoe_megatron.training.checkpoint import load_global_state_dict

    cfg = load_config(os.path.join(imported["out"], "config.yaml"))
    assert cfg.checkpoint.init_weights == os.path.abspath(imported["out"])
    assert cfg.matryoshka.ks == [1, 2, 3] and cfg.matryoshka.normalization == "softmax_topk"
    original = load_file(os.path.join(imported["hf_dir"], "model.safetensors"))
    back = to_hf_state_dict(cfg, load_global_state_dict(cfg.checkpoint.init_weights))
    assert set(back) == set(original)
    assert all(torch.equal(back[name], original[name]) for name in original)
    with open(os.path.join(imported["hf_dir"], "config.json")) as f:
        before = json.load(f)
    after = hf_config_dict(cfg, cfg.model.vocab_size, k=before["num_experts_per_tok"])
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts_per_tok",
                "norm_topk_prob", "mlp_only_layers", "tie_word_embeddings", "rms_norm_eps", "rope_parameters"):
        assert after[key] == before[key], key
    assert after["num_experts"] == before["num_local_experts"]


def test_grouped_gemm_expert_names_export_alike(imported):
    """Checkpoints trained with grouped GEMM name experts ...experts.linear_fc1.weight<E>."""
    import re

    from mmoe_megatron.config import load_config
    from mmoe_megatron.export import to_hf_state_dict
    from mmoe_megatron.training.checkpoint import load_global_state_dict

    cfg = load_config(os.path.join(imported["out"], "config.yaml"))
    sequential = load_global_state_dict(cfg.checkpoint.init_weights)
    grouped = {re.sub(r"experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", r"experts.\2.weight\1", n): t
               for n, t in sequential.items()}
    assert "decoder.layers.1.mlp.experts.linear_fc1.weight5" in grouped
    a, b = to_hf_state_dict(cfg, sequential), to_hf_state_dict(cfg, grouped)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_transformer_engine_names_round_trip(imported):
    from safetensors.torch import load_file

    from mmoe_megatron.config import load_config
    from mmoe_megatron.export import from_hf_state_dict, to_hf_state_dict
    from mmoe_megatron.export.hf_files import read_hf_dir

    config, original = read_hf_dir(imported["hf_dir"])
    te = from_hf_state_dict(config, original, te_names=True)
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te  # the dense layer
    cfg = load_config(os.path.join(imported["out"], "config.yaml"))
    back = to_hf_state_dict(cfg, te)
    original = load_file(os.path.join(imported["hf_dir"], "model.safetensors"))
    assert back.keys() == original.keys() and all(torch.equal(back[n], t) for n, t in original.items())


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    ({"model.normalization": "LayerNorm"}, "model.normalization"),
    ({"model.qk_layernorm": False}, "model.qk_layernorm"),
    ({"matryoshka.normalization": "nested"}, "matryoshka.normalization=nested"),
    ({"moe.shared_expert_ffn_hidden_size": 48}, "moe.shared_expert_ffn_hidden_size=48"),
    ({"matryoshka.gate_gain": "channels"}, "matryoshka.gate_gain=channels"),
    ({"matryoshka.k_adapter_rank": 4}, "matryoshka.k_adapter_rank=4"),
])
def test_export_refuses_what_qwen3_moe_cannot_express(overrides, field):
    from mmoe_megatron.export import ExportError, hf_config_dict, to_hf_state_dict

    cfg = tiny_config(**overrides)
    with pytest.raises(ExportError, match=field):
        to_hf_state_dict(cfg, {})
    with pytest.raises(ExportError, match=field):
        hf_config_dict(cfg, 256, k=2)


def test_export_of_learned_temperatures_needs_one_k_and_the_temperatures(exported):
    from mmoe_megatron.evaluation.run import latest_checkpoint
    from mmoe_megatron.export import ExportError, hf_config_dict, to_hf_state_dict
    from mmoe_megatron.training.checkpoint import load_global_state_dict

    cfg = _train_config(exported["run"])
    weights = load_global_state_dict(latest_checkpoint(cfg))
    for k in (None, [1, 2, 4]):
        with pytest.raises(ExportError, match=r"learned a gate temperature per k; give the one k to export at"):
            to_hf_state_dict(cfg, weights, k=k)
    with pytest.raises(ExportError, match=r"gate_temperature=learned but no learned temperatures were given"):
        hf_config_dict(cfg, PADDED, k=2)
    with pytest.raises(ExportError, match=r"gate_gain=learned but no learned gains were given"):
        hf_config_dict(cfg, PADDED, k=2, log_temperatures=[[0.0] * 4] * 3)
    gains = dict(weights)
    del gains["decoder.layers.3.mlp.router.log_gain"]
    with pytest.raises(ExportError, match=r"no decoder\.layers\.3\.mlp\.router\.log_gain"):
        to_hf_state_dict(cfg, gains, k=2)
    del weights["decoder.layers.2.mlp.router.log_temperature"]
    with pytest.raises(ExportError, match=r"no decoder\.layers\.2\.mlp\.router\.log_temperature"):
        to_hf_state_dict(cfg, weights, k=2)


@pytest.mark.parametrize("k, budgets, message", [
    (9, None, r"k=9: every k must be an int in 1\.\.8"),
    (0, None, r"k=0: every k must be an int in 1\.\.8"),
    (2, {"short": [1, 2]}, r"layer budget 'short'.*2 entries but the model has 4 MoE layers"),
    (2, {"wide": [1, 2, 9, 1]}, r"layer budget 'wide'.*got \[9\]"),
])
def test_export_refuses_ks_the_model_cannot_route(k, budgets, message):
    from mmoe_megatron.export import ExportError, hf_config_dict

    with pytest.raises(ExportError, match=message):
        hf_config_dict(tiny_config(), 256, k=k, layer_budgets=budgets)


def test_baselines_export_at_the_forced_k_they_are_evaluated_at():
    """top-p and EMoE route like top-k outside training (baselines.py), so they are exportable;
    the method is recorded."""
    from mmoe_megatron.export import hf_config_dict

    cfg = tiny_config(**{"matryoshka.method": "top_p", "matryoshka.strategy": "fixed", "matryoshka.ks": [2]})
    config = hf_config_dict(cfg, 256, k=3)
    assert config["num_experts_per_tok"] == 3 and config["matryoshka"]["method"] == "top_p"
    assert config["matryoshka"]["trained_ks"] == [2]


def test_export_refuses_weights_without_a_counterpart():
    from mmoe_megatron.export import ExportError, to_hf_state_dict

    with pytest.raises(ExportError, match=r"decoder\.layers\.0\.self_attention\.linear_qkv\.bias"):
        to_hf_state_dict(tiny_config(), {"decoder.layers.0.self_attention.linear_qkv.bias": torch.zeros(4)}, k=2)


@pytest.mark.parametrize("change, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type"),
    ({"model_type": "mixtral"}, "model_type"),
])
def test_import_refuses_what_megatron_cannot_express(imported, change, field):
    from mmoe_megatron.export import ExportError, from_hf_state_dict
    from mmoe_megatron.export.hf_files import read_hf_dir

    config, sd = read_hf_dir(imported["hf_dir"])
    with pytest.raises(ExportError, match=field):
        from_hf_state_dict({**config, **change}, sd)


def test_export_cli_reports_the_refusal(exported, tmp_path, capsys):
    from tools import export_hf

    assert export_hf.main(["--run", exported["run"], "--k", "9", "--out", str(tmp_path / "x")]) == 2
    assert "export error: k=9" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")


def test_loader_refuses_bad_ks(exported):
    from mmoe_megatron.export import ExportError, load_hf_model

    with pytest.raises(ExportError, match=r"k=\[1, 2\]: the model has 3 MoE layers"):
        load_hf_model(exported["dir"], k=[1, 2])
    with pytest.raises(ExportError, match=r"no such budget.*mean_k=2\.33"):
        load_hf_model(exported["dir"], k="mean_k=9")
    with pytest.raises(ExportError, match=r"must lie in 1\.\.8"):
        load_hf_model(exported["dir"], k=9)
