"""Hugging Face model directories: safetensors weights (no pickle), config.json, tokenizer files.

The project tokenizer is a SentencePiece model. transformers 5.23 builds its `LlamaTokenizer`
(a `tokenizers` BPE with byte fallback) from a `tokenizer.model` file offline and saves it as
`tokenizer.json`, which AutoTokenizer, vLLM, SGLang and lm-eval load without sentencepiece.
Measured against SentencePiece on the project's tokenizers: the same ids for ordinary text and
for user-defined symbols; a text that *starts* with whitespace gets one piece fewer (SentencePiece
always adds its dummy-prefix piece, the HF pre-tokenizer does not add it to a leading space).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file

from mmoe_megatron.export.qwen3_moe import ExportError
from mmoe_megatron.training.checkpoint import merge_safetensors

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_hf_weights(hf_sd: Mapping[str, torch.Tensor], out_dir: str, dtype: str = "float32",
                    max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write the weights as safetensors shards (one file, or several plus the index transformers
    reads when the model exceeds `max_shard_bytes`). Returns the file names."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    tensors = {name: t.detach().to("cpu", DTYPES[dtype]).contiguous() for name, t in sorted(hf_sd.items())}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    os.makedirs(out_dir, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX]


def read_hf_dir(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, all weights) of a Hugging Face model directory with safetensors weights."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ExportError(f"{config_path} not found: give a Hugging Face model directory")
    with open(config_path) as f:
        config = json.load(f)
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        bins = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        hint = (f"; it holds pickled weights ({bins[0]}): re-save them as safetensors "
                "(save_pretrained(..., safe_serialization=True)) first") if bins else ""
        raise ExportError(f"{path} holds no .safetensors weights{hint}")
    return config, merge_safetensors(path, files, ExportError)


def write_json(path: str, data: Mapping) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# --- tokenizer -------------------------------------------------------------------------------------


def sentencepiece_special_ids(spm_path: str) -> dict[str, Optional[int]]:
    """bos/eos/pad/unk ids of a SentencePiece model (None where it has none). eos is the
    end-of-document token megatron's data pipeline appends (its `eod`)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_path)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id(),
           "unk_token_id": sp.unk_id()}
    out = {name: (i if i >= 0 else None) for name, i in ids.items()}
    out["num_pieces"] = sp.get_piece_size()
    out["pieces"] = {name: sp.id_to_piece(i) for name, i in out.items() if name.endswith("_id") and i is not None}
    return out


def write_hf_tokenizer(spm_path: str, out_dir: str, vocab_rows: int) -> dict[str, Optional[int]]:
    """tokenizer.json + tokenizer_config.json (and a copy of tokenizer.model) in `out_dir`.
    Returns the special token ids for config.json / generation_config.json."""
    if not os.path.isfile(spm_path):
        raise ExportError(f"tokenizer {spm_path} not found; pass --tokenizer PATH to the SentencePiece .model")
    special = sentencepiece_special_ids(spm_path)
    if special["num_pieces"] > vocab_rows:
        raise ExportError(
            f"tokenizer {spm_path} has {special['num_pieces']} pieces but the model's embedding has "
            f"{vocab_rows} rows: it is not the tokenizer this model was trained with"
        )
    try:
        # transformers reads the .model file with protobuf (convert_slow_tokenizer's
        # SentencePieceExtractor); without it, it misreads the file as tiktoken. Loading the
        # export needs neither: tokenizer.json is read by `tokenizers`.
        import google.protobuf  # noqa: F401
    except ImportError:
        raise ExportError(
            "writing the Hugging Face tokenizer needs protobuf (installed with tensorboard): "
            "pip install protobuf, or export with --no-tokenizer"
        ) from None
    from transformers import LlamaTokenizer

    pieces = special["pieces"]
    settings = {
        # No BOS: the training data are documents separated by the end-of-document token only.
        "add_bos_token": False, "add_eos_token": False,
        # legacy=False: the Metaspace pre-tokenizer adds SentencePiece's dummy prefix once per
        # text, also after user-defined symbols (legacy mode would add it after each one).
        "legacy": False, "add_prefix_space": True,
        "unk_token": pieces.get("unk_token_id"), "bos_token": pieces.get("bos_token_id"),
        "eos_token": pieces.get("eos_token_id"), "pad_token": pieces.get("pad_token_id"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(spm_path, os.path.join(tmp, "tokenizer.model"))
        write_json(os.path.join(tmp, "tokenizer_config.json"), {"tokenizer_class": "LlamaTokenizer", **settings})
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
    shutil.copyfile(spm_path, os.path.join(out_dir, "tokenizer.model"))
    return {name: special[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
