"""Average a run's weights over its last checkpoints, for evaluation or export.

    python -m tools.average_checkpoints --run runs/X --last 5 --out runs/X/averaged
    python -m tools.average_checkpoints --run runs/X --since-step 1500 --out runs/X/averaged
    python -m tools.average_checkpoints --checkpoint runs/X/checkpoints/step_00001900 \\
        --checkpoint runs/X/checkpoints/step_00002000 --out runs/X/averaged

Then `python -m mmoe_megatron.evaluation.run --run runs/X --checkpoint runs/X/averaged` or
`python -m tools.export_hf --run runs/X --checkpoint runs/X/averaged ...`. Keep the checkpoints to
average with `checkpoint.save_interval` and `checkpoint.keep_last` (or `keep_steps`) in training.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--run", default=None, help="run directory whose complete checkpoints are averaged")
    p.add_argument("--last", type=int, default=None, help="average the newest N complete checkpoints")
    p.add_argument("--since-step", type=int, default=None, help="average the complete checkpoints from this step on")
    p.add_argument("--checkpoint", action="append", default=[], help="a checkpoint to average (repeatable)")
    p.add_argument("--out", required=True, help="folder to write (model/model.safetensors, averaged.json)")
    args = p.parse_args(argv)

    from mmoe_megatron.training.averaging import tail_checkpoints, write_average
    from mmoe_megatron.training.checkpoint import CheckpointError

    if bool(args.run) == bool(args.checkpoint):
        p.error("give --run (with --last and/or --since-step) or --checkpoint paths, not both")
    if args.run:
        if args.last is None and args.since_step is None:
            p.error("with --run, say which checkpoints: --last N and/or --since-step S")
        from mmoe_megatron.evaluation.run import run_config

        ckpt_dir = run_config(args.run, world_size=1).checkpoint_dir
        checkpoints = tail_checkpoints(ckpt_dir, args.last, args.since_step)
        if not checkpoints:
            print(f"no complete checkpoint in {ckpt_dir} matches --last {args.last} --since-step "
                  f"{args.since_step}", file=sys.stderr)
            return 1
    else:
        checkpoints = args.checkpoint
    try:
        write_average(checkpoints, args.out)
    except CheckpointError as e:
        print(f"average_checkpoints: {e}", file=sys.stderr)
        return 1
    print(f"averaged {len(checkpoints)} checkpoints ({', '.join(os.path.basename(c) for c in checkpoints)}) "
          f"into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
