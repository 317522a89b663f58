"""Import a Hugging Face Qwen3-MoE model for continued (Matryoshka) pretraining.

    python -m tools.import_hf --hf PATH --out imports/X [--config configs/tiny.yaml] [--ks 1,2,4,8]
        [--backend local|transformer_engine] [--section.field=value ...]
    python -m mmoe_megatron.train --config imports/X/config.yaml [--data.blend=...]

Writes <out>/model/model.safetensors (megatron global parameter names) and <out>/config.yaml: the
--config file's data, training and optimizer settings with the Hugging Face architecture, a
Matryoshka schedule over --ks (default 1..num_experts_per_tok) and
checkpoint.init_weights: <out>. The optimizer starts fresh. Settings the megatron model cannot
express (attention biases, sliding windows, scaled rotary) stop the import with the setting named.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmoe_megatron.config import ConfigError, parse_overrides  # noqa: E402
from mmoe_megatron.export.qwen3_moe import ExportError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--hf", required=True, help="Hugging Face Qwen3-MoE directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"),
                   help="experiment YAML whose data/train/optimizer settings to use")
    p.add_argument("--ks", default=None,
                   help="Matryoshka training range, e.g. 1,2,4,8 (default 1..num_experts_per_tok)")
    p.add_argument("--backend", choices=["local", "transformer_engine"], default="local",
                   help="layer spec whose parameter names to write; pinned as model.backend")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    from mmoe_megatron.export.convert import import_from_hf

    ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    try:
        cfg = import_from_hf(args.hf, args.out, args.config, ks, parse_overrides(rest),
                             te_names=args.backend == "transformer_engine")
    except (ExportError, ConfigError) as e:
        print(f"import error: {e}", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.hf, "tokenizer.model")):
        print(f"note: {args.hf} has no SentencePiece tokenizer.model, so data.tokenizer stays "
              f"{cfg.data.tokenizer!r} from --config: the training data must be tokenized with the "
              "model's own vocabulary, or the imported embeddings mean nothing")
    config = os.path.join(args.out, "config.yaml")
    print(f"imported {args.hf} to {args.out}: model/model.safetensors, config.yaml "
          f"(Matryoshka ks {cfg.matryoshka.ks}, data.tokenizer {cfg.data.tokenizer})")
    print(f"train with: python -m mmoe_megatron.train --config {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
