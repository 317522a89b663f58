"""Export a training checkpoint to a Hugging Face Qwen3-MoE directory served at a chosen k.

    python -m tools.export_hf --run runs/X --k 2 [--width 0.5] [--checkpoint PATH]
        [--layer-budgets runs/X/budgets.json] [--tokenizer PATH] [--dtype float32|bfloat16] --out exports/X

Reads the run's config.yaml and its latest complete checkpoint (or --checkpoint). With --width w
(slimmable experts) every expert is written sliced to its first w x I columns, a plain Qwen3-MoE
with moe_intermediate_size = w x I; a comma-separated list gives one width per MoE layer, which
must all be equal (one config has one moe_intermediate_size). Writes
safetensors weights, config.json (num_experts_per_tok = k, and a `matryoshka` record of the
training range and per-layer budgets), matryoshka.json, budgets.json, and, when the run has a
tokenizer, tokenizer.json / tokenizer_config.json / tokenizer.model and generation_config.json.
Settings Qwen3-MoE cannot express stop the export with the setting named (ExportError).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmoe_megatron.export.qwen3_moe import ExportError, check_serving_width  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (or its config.yaml)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the run's latest complete one)")
    p.add_argument("--k", type=int, required=True, help="experts per token written as num_experts_per_tok")
    p.add_argument("--width", default="1", help="expert width fraction (default 1: full experts)")
    p.add_argument("--layer-budgets", default=None,
                   help="budgets.json of per-layer k vectors to record (default: <run>/budgets.json if present)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the run's data.tokenizer)")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mmoe_megatron.evaluation.run import latest_checkpoint, run_config
    from mmoe_megatron.export.convert import export_to_hf, read_budgets
    from mmoe_megatron.training.checkpoint import load_global_state_dict

    # One process, no model is built: the export only renames and reshapes tensors.
    cfg = run_config(args.run, world_size=1)
    checkpoint = args.checkpoint or latest_checkpoint(cfg)
    run_dir = args.run if os.path.isdir(args.run) else os.path.dirname(args.run)
    budgets_path = args.layer_budgets
    if budgets_path is None and os.path.isfile(os.path.join(run_dir, "budgets.json")):
        budgets_path = os.path.join(run_dir, "budgets.json")
    tokenizer = None if args.no_tokenizer else (args.tokenizer or (None if cfg.data.mock else cfg.data.tokenizer))
    try:
        try:
            parts = [float(w) for w in args.width.strip("[]").split(",")]
        except ValueError:
            raise ExportError(f"--width {args.width!r}: give a fraction such as 0.5, or one per MoE layer") from None
        width = check_serving_width(cfg, parts[0] if len(parts) == 1 else parts, "--width") / cfg.moe.expert_ffn_hidden_size
        files = export_to_hf(cfg, load_global_state_dict(checkpoint), args.out, args.k,
                             read_budgets(budgets_path, width), tokenizer, args.dtype, source=checkpoint,
                             width=width)
    except ExportError as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print("no tokenizer written (mock data or --no-tokenizer); pass --tokenizer PATH to include one")
    print(f"exported {checkpoint} at k={args.k}, width {width:g} to {args.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
