"""Print parameters, tokens per step and estimated memory per GPU of a config.

    python tools/estimate_resources.py --config configs/gpu_16e_8xh100.yaml --world-size 8
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmoe_megatron.config import load_config, parse_overrides  # noqa: E402
from mmoe_megatron.config.estimate import describe  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, required=True, help="number of GPUs")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="tokenizer vocabulary (default: model.vocab_size from the config)")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(args.config, parse_overrides(rest))
    vocab = args.vocab_size or cfg.model.vocab_size
    if vocab is None:
        parser.error("the config has model.vocab_size: null; pass --vocab-size")
    print(describe(cfg, vocab, args.world_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
