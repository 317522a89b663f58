"""Training, validation and test datasets from the config, built by megatron-core.

    vocab = resolve_vocab_size(cfg)
    train, valid, test = build_datasets(cfg, train_samples, valid_samples, test_samples)

`BlendedMegatronDatasetBuilder` builds `GPTDataset`s over the `data.blend` prefixes (a
`BlendedDataset` on top when there are several), each split a contiguous range of every
dataset's documents (`data.split`), or `data.valid_blend` for validation. Items are dicts with
`tokens`, `labels`, `loss_mask`, `position_ids` (seq_length each; no attention mask: the trainer
passes its own causal mask). `data.mock` gives megatron-core's `MockGPTDataset`.

Every prefix is checked first (`check_indexed_dataset`), so a wrong path or a damaged file fails
with the file and the fix instead of deep inside megatron-core.

Distributed: call on every rank. megatron-core builds the sample indices on rank 0, writes them
to the cache directory, waits at a barrier, and the other ranks load them; so the cache directory
must be on storage all ranks see (the default is under the run directory).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from mmoe_megatron.config.schema import BlendEntry, ExperimentConfig
from mmoe_megatron.data.errors import DataError
from mmoe_megatron.data.indexed import IndexSummary, check_indexed_dataset, dataset_fingerprint
from mmoe_megatron.data.tokenizer import file_sha256, tokenizer_vocab_size

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def resolve_vocab_size(cfg: ExperimentConfig) -> int:
    """The model's vocabulary size before padding: `model.vocab_size`, or the tokenizer's when
    that is null. Raises `DataError` when the tokenizer is missing or has more pieces than
    `model.vocab_size` (its ids would index past the embedding table)."""
    from mmoe_megatron.config.derive import padded_vocab_size

    if cfg.data.mock:
        if cfg.model.vocab_size is None:
            raise DataError(
                "data.mock: true needs model.vocab_size (the synthetic data has no tokenizer); "
                "set it, e.g. model.vocab_size: 4096"
            )
        return cfg.model.vocab_size
    path = cfg.data.tokenizer
    tokenizer_vocab = tokenizer_vocab_size(path)
    model_vocab = cfg.model.vocab_size
    if model_vocab is None:
        return tokenizer_vocab
    if tokenizer_vocab > model_vocab:
        raise DataError(
            f"tokenizer {path} has {tokenizer_vocab} pieces but model.vocab_size is {model_vocab} "
            f"(embedding padded to {padded_vocab_size(cfg, model_vocab)} rows): its ids would not "
            f"fit. Set model.vocab_size: null to take the tokenizer's size, or >= {tokenizer_vocab}, "
            "or train a smaller tokenizer (tools/train_tokenizer.py --vocab-size)"
        )
    return model_vocab


def _split_ratios(split: str) -> list[float]:
    ratios = [float(x) for x in split.split(",")]
    total = sum(ratios)
    return [r / total for r in ratios]


def _split_matrix(ratios: list[float], train_fraction: float) -> list[Optional[tuple[float, float]]]:
    """megatron-core's split matrix for the normalised `ratios`: (lo, hi) of the documents per
    split, or None. The train split is cut to its first `train_fraction`, which a split string
    cannot say (its splits are contiguous)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
    )

    matrix = convert_split_vector_to_split_matrix(ratios)
    if train_fraction < 1 and matrix[0] is not None:
        lo, hi = matrix[0]
        matrix[0] = (lo, lo + (hi - lo) * train_fraction)
    return matrix


def _check_blend(entries: list[BlendEntry], field: str, tokenizer_path: str, vocab: int,
                 matrix: Optional[list[Optional[tuple[float, float]]]]) -> list[IndexSummary]:
    """Check each prefix's files, that it was tokenized for this tokenizer and vocabulary, and
    that every split of the split matrix gets at least one of its documents."""
    summaries = []
    sha = None
    for i, entry in enumerate(entries):
        where = f"{field}[{i}].prefix"
        try:
            summary = check_indexed_dataset(entry.prefix)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        side = summary.sidecar or {}
        if side.get("vocab_size", 0) > vocab:
            raise DataError(
                f"{where}: {entry.prefix} was tokenized with {side.get('tokenizer')} "
                f"({side['vocab_size']} pieces), more than the model's vocabulary {vocab}; "
                "re-run tools/preprocess_data.py with data.tokenizer"
            )
        if side.get("tokenizer_sha256"):
            sha = sha or file_sha256(tokenizer_path)
            if side["tokenizer_sha256"] != sha:
                raise DataError(
                    f"{where}: {entry.prefix} was tokenized with {side.get('tokenizer')}, a "
                    f"different model than data.tokenizer {tokenizer_path}; re-run "
                    f"tools/preprocess_data.py --tokenizer {tokenizer_path}, or point "
                    "data.tokenizer at the tokenizer it was made with"
                )
        if matrix is not None:
            # megatron-core's split: documents [round(lo * n), round(hi * n)) for each split.
            n = summary.num_documents
            for name, bounds in zip(SPLITS, matrix):
                if bounds is not None and int(round(bounds[1] * n)) - int(round(bounds[0] * n)) == 0:
                    fix = "raise data.train_fraction, " if name == "train" else ""
                    raise DataError(
                        f"{where}: data.split gives the {name} split none of the {n} documents "
                        f"of {entry.prefix} (a split needs at least one document, or megatron-core "
                        f"loops forever); {fix}set its ratio to 0, raise it, add documents, or for "
                        f"validation give data.valid_blend"
                    )
        summaries.append(summary)
    return summaries


def _blend(entries: list[BlendEntry]):
    prefixes = [e.prefix for e in entries]
    # A single dataset needs no BlendedDataset on top (megatron-core builds one if given weights).
    return (prefixes, None if len(entries) == 1 else [float(e.weight) for e in entries])


def _mock_tokenizer(vocab_size: int):
    from megatron.core.tokenizers import MegatronTokenizer

    from mmoe_megatron import compat

    # NullTokenizer(n) has n + 1 ids, the last being the end of document.
    return MegatronTokenizer.from_pretrained(
        metadata_path={"library": compat.null_tokenizer_library()}, vocab_size=vocab_size - 1
    )


def _train_ratios(split: str, separate_validation: bool) -> list[float]:
    """The normalised ratios data.blend is cut by: with data.valid_blend, train and test share it."""
    ratios = _split_ratios(split)
    if not separate_validation:
        return ratios
    if ratios[0] + ratios[2] == 0:
        raise DataError(
            f"data.split {split!r}: with data.valid_blend, data.blend is shared by the train and "
            "test ratios, which are both 0; give train a positive ratio, e.g. '1,0,0'"
        )
    return [ratios[0] / (ratios[0] + ratios[2]), 0.0, ratios[2] / (ratios[0] + ratios[2])]


def train_split_tokens(cfg: ExperimentConfig) -> list[tuple[str, float, int]]:
    """(prefix, normalised weight, tokens) of each dataset of data.blend: the tokens of the
    documents its train split holds (data.split, data.train_fraction), which one epoch over it
    reads. Reads only the `.idx` files."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    d = cfg.data
    if d.mock:
        raise DataError("data.mock: true has no documents to count; give a data.blend")
    bounds = _split_matrix(_train_ratios(d.split, d.valid_blend is not None),
                           d.train_fraction)[0]
    total = sum(e.weight for e in d.blend)
    out = []
    for entry in d.blend:
        check_indexed_dataset(entry.prefix)
        # The lengths are a view of the index's memory map: sum them while the dataset holds it.
        dataset = IndexedDataset(entry.prefix)
        n = len(dataset.sequence_lengths)
        lo, hi = (0, 0) if bounds is None else (int(round(bounds[0] * n)), int(round(bounds[1] * n)))
        out.append((entry.prefix, entry.weight / total, int(dataset.sequence_lengths[lo:hi].sum())))
    return out


def build_datasets(cfg: ExperimentConfig, train_samples: int, valid_samples: int,
                   test_samples: int, tokenizer=None):
    """(train, valid, test) megatron-core datasets; each None when its split is empty.

    `*_samples` are the numbers of sequences each split must provide (datasets are repeated in
    epochs when smaller). Needs torch.distributed initialised; call on every rank.
    """
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    if not dist.is_initialized():
        raise RuntimeError(
            "build_datasets needs torch.distributed initialised (megatron-core's BlendedDataset "
            "asks for the rank); call it after mmoe_megatron.distributed setup"
        )
    d = cfg.data
    sizes = [train_samples, valid_samples, test_samples]
    ratios = _split_ratios(d.split)
    common = dict(
        random_seed=cfg.data_seed,
        sequence_length=d.seq_length,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,
        num_dataset_builder_threads=1,
    )
    cache_root = d.cache_dir or os.path.join(cfg.run_dir, "data_cache")

    if d.mock:
        vocab = resolve_vocab_size(cfg)
        config = GPTDatasetConfig(
            tokenizer=tokenizer or _mock_tokenizer(vocab), blend=None, split=d.split,
            path_to_cache=os.path.join(cache_root, "mock"), **common,
        )
        built = BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config).build()
        # The mock config forces split 1,1,1; report the splits the config asked for.
        return tuple(ds if r > 0 else None for ds, r in zip(built, ratios))

    vocab = resolve_vocab_size(cfg)
    if tokenizer is None:
        from mmoe_megatron.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer.vocab_size > vocab:
        raise DataError(
            f"the tokenizer passed to build_datasets has {tokenizer.vocab_size} pieces, more than "
            f"the model's vocabulary {vocab}; pass the tokenizer of data.tokenizer"
        )

    if d.valid_blend is None:
        matrix = _split_matrix(ratios, d.train_fraction)
        _check_blend(d.blend, "data.blend", d.tokenizer, vocab, matrix)
        prefixes = [e.prefix for e in d.blend]
        config = GPTDatasetConfig(
            tokenizer=tokenizer, blend=_blend(d.blend), split=d.split,
            path_to_cache=os.path.join(cache_root, dataset_fingerprint(prefixes)), **common,
        )
        if d.train_fraction < 1:
            config.split_matrix = matrix
        return tuple(BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build())

    # Separate validation data: train (and test) from data.blend by the split's train and test
    # ratios, validation from all documents of data.valid_blend.
    train_test = _train_ratios(d.split, separate_validation=True)
    train_matrix = _split_matrix(train_test, d.train_fraction)
    _check_blend(d.blend, "data.blend", d.tokenizer, vocab, train_matrix)
    _check_blend(d.valid_blend, "data.valid_blend", d.tokenizer, vocab, None)
    prefixes = [e.prefix for e in d.blend] + [e.prefix for e in d.valid_blend]
    cache = os.path.join(cache_root, dataset_fingerprint(prefixes))
    train_config = GPTDatasetConfig(
        tokenizer=tokenizer, blend=_blend(d.blend), split=",".join(f"{r:.12f}" for r in train_test),
        path_to_cache=cache, **common,
    )
    if d.train_fraction < 1:
        train_config.split_matrix = train_matrix
    train, _, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, 0, test_samples], lambda: True, train_config
    ).build()
    valid_config = GPTDatasetConfig(
        tokenizer=tokenizer, blend_per_split=[None, _blend(d.valid_blend), None],
        path_to_cache=cache, **common,
    )
    _, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [0, valid_samples, 0], lambda: True, valid_config
    ).build()
    return train, valid, test
