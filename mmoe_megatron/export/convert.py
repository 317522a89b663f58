"""Whole-directory conversions behind `tools/export_hf.py` and `tools/import_hf.py`.

export_to_hf: a training checkpoint (global-named safetensors) + its run config ->
    <out>/model.safetensors, config.json (with the `matryoshka` record), matryoshka.json,
    budgets.json (when given), generation_config.json and tokenizer files (when a tokenizer is known).
import_from_hf: a Qwen3-MoE directory ->
    <out>/model/model.safetensors (global megatron names: a valid `checkpoint.init_weights`)
    and <out>/config.yaml, a full experiment config with the model's architecture and a
    Matryoshka schedule, whose checkpoint.init_weights points at <out>.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Mapping, Optional, Sequence

import yaml
from safetensors.torch import save_file

from mmoe_megatron.config import ExperimentConfig, config_from_dict, load_config, save_config
from mmoe_megatron.config.base import to_dict
from mmoe_megatron.export.engines import warn_serving_problems
from mmoe_megatron.export.hf_files import read_hf_dir, save_hf_weights, write_hf_tokenizer, write_json
from mmoe_megatron.export.qwen3_moe import (ExportError, check_exportable, dims_from_config, gate_log_gains,
                                            gate_log_temperatures, hf_config_dict, to_hf_state_dict)
from mmoe_megatron.export.qwen3_moe_import import experiment_sections, from_hf_state_dict


def read_budgets(path: Optional[str], width: float = 1.0) -> dict[str, list[int]]:
    """budgets.json (name -> one k per MoE layer, written by the budget search); {} for None.
    A budget of the two-dimensional search ({"ks": [...], "widths": [...]}) is kept as its ks when
    every layer's width is the export's `width`, and refused otherwise."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise ExportError(f"layer budgets file {path} not found; run mmoe_megatron.evaluation.budget "
                          "first, or drop --layer-budgets")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        data = None
    out = {}
    for name, value in (data or {}).items():
        if isinstance(value, dict) and isinstance(value.get("ks"), list) and isinstance(value.get("widths"), list):
            if any(w != width for w in value["widths"]):
                raise ExportError(
                    f"layer budget {name!r} in {path} runs its MoE layers at widths {value['widths']}, but the "
                    f"export writes every expert at width {width:g} (one moe_intermediate_size; the vLLM "
                    "plugin serves a k per layer, not a width per layer); export it at its width if its "
                    "widths are all equal, or leave it out of --layer-budgets")
            value = value["ks"]
        if not isinstance(value, list):
            data = None
            break
        out[name] = value
    if data is None:
        raise ExportError(f"{path} must map budget names to per-layer k lists (or {{ks, widths}}), like the "
                          "budgets.json the budget search writes")
    return out


def export_to_hf(
    cfg: ExperimentConfig, global_sd: Mapping, out_dir: str, k: int,
    layer_budgets: Optional[Mapping[str, Sequence[int]]] = None, tokenizer: Optional[str] = None,
    dtype: str = "float32", source: Optional[str] = None, width: float = 1.0,
) -> list[str]:
    """Write the Hugging Face directory with the experts at `width`; returns the files written.
    The weights, k, width and budgets are checked (ExportError) before anything is written."""
    check_exportable(cfg)
    m = cfg.model
    setting = ("model.kv_channels" if m.kv_channels else
               f"model.hidden_size / model.num_attention_heads = {m.hidden_size} / {m.num_attention_heads}")
    warn_serving_problems(dims_from_config(cfg).head_dim, setting)
    hf_sd = to_hf_state_dict(cfg, global_sd, width, k)
    log_temperatures, log_gains = gate_log_temperatures(cfg, global_sd), gate_log_gains(cfg, global_sd)
    vocab_rows = int(hf_sd["model.embed_tokens.weight"].shape[0])
    budgets = dict(layer_budgets or {})
    # validates k and the budgets
    hf_config_dict(cfg, vocab_rows, k, budgets, dtype, width=width, log_temperatures=log_temperatures,
                   log_gains=log_gains)
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    special = {}
    if tokenizer is not None:
        special = write_hf_tokenizer(tokenizer, out_dir, vocab_rows)
        written += ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"]
    config = hf_config_dict(cfg, vocab_rows, k, budgets, dtype, special, width=width,
                            log_temperatures=log_temperatures, log_gains=log_gains)
    written += save_hf_weights(hf_sd, out_dir, dtype)
    write_json(os.path.join(out_dir, "config.json"), config)
    written.append("config.json")
    if special.get("eos_token_id") is not None:
        generation = {"bos_token_id": special.get("bos_token_id"), "eos_token_id": special["eos_token_id"],
                      "pad_token_id": special.get("pad_token_id"), "do_sample": False}
        write_json(os.path.join(out_dir, "generation_config.json"), generation)
        written.append("generation_config.json")
    record = dict(config["matryoshka"], source_checkpoint=source, run_config=to_dict(cfg))
    write_json(os.path.join(out_dir, "matryoshka.json"), record)
    written.append("matryoshka.json")
    if budgets:
        write_json(os.path.join(out_dir, "budgets.json"), budgets)
        written.append("budgets.json")
    return written


def import_from_hf(
    hf_dir: str, out_dir: str, base_config: str, ks: Optional[Sequence[int]] = None,
    overrides: Sequence[tuple[str, object]] = (), te_names: bool = False,
) -> ExperimentConfig:
    """Write `<out>/model/model.safetensors` and `<out>/config.yaml`; returns the config.

    The config is `base_config` (data, training, optimizer settings) with the model and moe
    sections replaced by the Hugging Face architecture, a Matryoshka schedule over `ks`,
    `checkpoint.init_weights` = `<out>`, then the dotted `overrides`. `model.backend` is pinned
    to the layer spec whose parameter names were written (`te_names`).
    """
    hf_config, hf_sd = read_hf_dir(hf_dir)
    sections = experiment_sections(hf_config, ks)
    global_sd = from_hf_state_dict(hf_config, hf_sd, te_names=te_names)
    with open(base_config) as f:
        data = yaml.safe_load(f)
    data["model"] = {**sections["model"], "backend": "transformer_engine" if te_names else "local"}
    data["moe"] = {**{k: v for k, v in (data.get("moe") or {}).items() if k in ("dispatcher", "router_dtype")},
                   **sections["moe"]}
    data["matryoshka"] = {**(data.get("matryoshka") or {}), **sections["matryoshka"]}
    data["matryoshka"].pop("eval_ks", None)  # the base's eval ks may not fit the new range
    data["checkpoint"] = {**(data.get("checkpoint") or {}), "init_weights": os.path.abspath(out_dir), "load": "auto"}
    data["name"] = os.path.basename(os.path.normpath(out_dir))
    spm = os.path.join(hf_dir, "tokenizer.model")
    if os.path.isfile(spm):
        # A SentencePiece model shipped with the checkpoint: train on data tokenized with it.
        data.setdefault("data", {})["tokenizer"] = os.path.abspath(os.path.join(out_dir, "tokenizer.model"))
    cfg = config_from_dict(data, overrides)
    model_dir = os.path.join(out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    save_file(global_sd, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    if os.path.isfile(spm):
        shutil.copyfile(spm, os.path.join(out_dir, "tokenizer.model"))
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    load_config(os.path.join(out_dir, "config.yaml"))  # what training will read must load
    return cfg
