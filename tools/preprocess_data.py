"""Tokenize JSONL / plain-text corpora into megatron-core indexed datasets (.bin + .idx).

    python tools/preprocess_data.py --input data/corpus/*.jsonl --tokenizer data/tok/tokenizer.model \
        --output-prefix data/corpus_text_document --workers 8

One document per sequence, each ending in the tokenizer's end-of-document token; written by
megatron-core's IndexedDatasetBuilder. Output is identical for any --workers. Writes
<prefix>.bin, <prefix>.idx and <prefix>.json (tokenizer and counts). With --valid-fraction F,
documents go to <prefix>_train or <prefix>_valid (by a seeded hash of their text) instead, for
data.blend and data.valid_blend.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmoe_megatron.data.errors import DataError  # noqa: E402

# Importing megatron-core on a CPU machine warns about missing GPU kernels it does not use here.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.strip().splitlines()[1:]),
    )
    parser.add_argument("--input", nargs="+", required=True,
                        help="corpus files, directories or quoted globs (.jsonl/.json/.txt, .gz ok)")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model (with metadata)")
    parser.add_argument("--output-prefix", required=True, help="dataset prefix, without .bin/.idx")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: all cores)")
    parser.add_argument("--json-key", default="text", help="text field of JSONL records")
    parser.add_argument("--text-mode", choices=["file", "paragraph", "line"], default="file",
                        help="what one document is in a plain-text file")
    parser.add_argument("--min-chars", type=int, default=1,
                        help="skip documents shorter than this after stripping whitespace")
    parser.add_argument("--no-eod", dest="append_eod", action="store_false",
                        help="do not end documents with the end-of-document token")
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="fraction of documents for <prefix>_valid (0: one dataset)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the train/valid split")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    from mmoe_megatron.data.indexed import preprocess

    try:
        stats = preprocess(
            args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
            text_mode=args.text_mode, num_workers=args.workers, append_eod=args.append_eod,
            min_chars=args.min_chars, valid_fraction=args.valid_fraction, seed=args.seed,
            progress=args.progress,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, prefix in stats.outputs.items():
        print(f"{prefix}: {stats.num_documents[name]:,} documents, {stats.num_tokens[name]:,} tokens")
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
