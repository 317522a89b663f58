"""Prepare the held-out evaluation corpora from PyPI archives, tokenized with the demo tokenizer
(run tools/prepare_demo_corpus.py first): Wikipedia articles (gensim's test data) and the Sphinx
and Docutils manuals.

    python -m tools.prepare_heldout_corpus    # data/heldout/{wiki,docs}_text_document.{bin,idx}

No model trains on them; suites evaluate every member on them (`eval.heldout`) to show elasticity
on text outside the training distribution. Idempotent.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmoe_megatron.data.errors import DataError  # noqa: E402

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tokenizer", default="data/demo/tokenizer.model")
    parser.add_argument("--out-dir", default="data/heldout")
    parser.add_argument("--corpora", default="wiki,docs", help="comma-separated: wiki, docs")
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.path.isfile(args.tokenizer):
        print(f"error: {args.tokenizer} not found; run `python -m tools.prepare_demo_corpus` first "
              "or pass --tokenizer", file=sys.stderr)
        return 2
    from mmoe_megatron.data.heldout import prepare_heldout

    try:
        corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
        manifest = prepare_heldout(args.tokenizer, args.out_dir, corpora, num_workers=args.workers,
                                   progress=False)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name in corpora:
        m = manifest[name]
        print(f"{m['prefix']}: {m['num_documents']:,} documents {m['num_documents_per_source']}, "
              f"{m['num_tokens']:,} tokens, {m['bytes_per_token']:.2f} bytes/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
