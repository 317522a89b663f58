"""Train a SentencePiece tokenizer (BPE or unigram) on corpus files, for megatron-core.

    python tools/train_tokenizer.py --input data/corpus/ --output data/tok/tokenizer.model \
        --vocab-size 32000 --special-tokens "<|im_start|>,<|im_end|>"

Inputs: JSONL files (one document per line, text in --json-key) and/or plain-text files,
directories (searched recursively) or quoted globs; each may be gzipped. Writes the model and,
beside it, megatron-core's tokenizer_metadata.json (one tokenizer per directory). Ids 0-3 are
<unk>, <s>, </s> (the end-of-document token), <pad>; --special-tokens follow.

    python tools/train_tokenizer.py --write-metadata path/to/existing.model

only writes the metadata for a SentencePiece model trained elsewhere.
"""

from __future__ import annotations

import argparse
import logging
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
    parser.add_argument("--input", nargs="+", help="corpus files, directories or quoted globs")
    parser.add_argument("--output", help="path of the model to write; must end in .model")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                        help="map unseen characters to <unk> instead of their UTF-8 bytes")
    parser.add_argument("--special-tokens", default="",
                        help="comma-separated extra special tokens (matched in text as whole pieces)")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--json-key", default="text", help="text field of JSONL records")
    parser.add_argument("--text-mode", choices=["file", "paragraph", "line"], default="file",
                        help="what one document is in a plain-text file")
    parser.add_argument("--max-train-bytes", type=float, default=2e9,
                        help="subsample larger corpora by document to about this many bytes")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=None, help="SentencePiece trainer threads")
    parser.add_argument("--write-metadata", metavar="MODEL",
                        help="only write tokenizer_metadata.json for an existing SentencePiece model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from mmoe_megatron.data.tokenizer import load_tokenizer, train_tokenizer, write_metadata

    try:
        if args.write_metadata:
            if not os.path.isfile(args.write_metadata):
                raise DataError(f"{args.write_metadata} not found; give the path of a .model file")
            path = write_metadata(args.write_metadata)
            tok = load_tokenizer(args.write_metadata)
            print(f"wrote {path} ({tok.vocab_size} pieces, end of document id {tok.eod})")
            return 0
        if not args.input or not args.output:
            parser.error("--input and --output are required (or use --write-metadata MODEL)")
        specials = [t for t in args.special_tokens.split(",") if t]
        stats = train_tokenizer(
            args.input, args.output, args.vocab_size, model_type=args.model_type,
            byte_fallback=args.byte_fallback, special_tokens=specials,
            character_coverage=args.character_coverage, json_key=args.json_key,
            text_mode=args.text_mode, max_train_bytes=int(args.max_train_bytes), seed=args.seed,
            num_threads=args.threads,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {stats.model_path} ({stats.model_type}, {stats.vocab_size} pieces) from "
        f"{stats.num_documents:,} documents, {stats.num_train_bytes / 1e6:.1f} MB, in "
        f"{stats.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
