"""Entry point: `python -m mmoe_megatron.train --config configs/X.yaml [--section.field=value ...]`.

The same command runs under torchrun, the deepspeed launcher and srun; they only start the
processes. With `strategy: fixed` in the config it trains a fixed-k specialist baseline.
"""

from __future__ import annotations

import argparse
import logging
import sys

# Stopped by SIGTERM/SIGUSR1 after writing a checkpoint: the run is not finished and should be
# started again (it resumes). 75 is EX_TEMPFAIL; slurm/train.sbatch requeues the job on it.
EXIT_PREEMPTED = 75


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train a Matryoshka MoE (or a fixed-k specialist) from a YAML config.",
        epilog="Any config field can be overridden: --train.lr=3e-4 --matryoshka.strategy=fixed",
    )
    parser.add_argument("--config", required=True, help="experiment YAML under configs/")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; ranks are read from the environment")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit without training")
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    from mmoe_megatron.config import ConfigError, dump_config, load_config, parse_overrides

    try:
        cfg = load_config(args.config, parse_overrides(rest))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mmoe_megatron import distributed
    from mmoe_megatron.training.trainer import Trainer

    try:
        distributed.init_distributed(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    # `record` writes an uncaught exception where torchrun reads it, so torchrun's failure report
    # shows each failed rank's error (a rank killed by a signal is reported by its signal).
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def train() -> int:
        try:
            trainer = Trainer(cfg)
            trainer.install_signal_handlers()
            trainer.fit()
            trainer.metrics.close()
            distributed.pause_point("exit")
        finally:
            distributed.shutdown()
        return EXIT_PREEMPTED if trainer.preempted else 0

    return train()


if __name__ == "__main__":
    sys.exit(main())
