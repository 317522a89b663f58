"""The main job end to end on the tiny default: prepare the demo corpus, train an elastic
Matryoshka MoE with expert parallelism, evaluate it at several k (and per-layer vectors), search
per-layer budgets, and export it to Hugging Face at a chosen k.

    python -m tools.demo [--nproc 2] [--iters 300] [--run runs/demo] [--serve-k 2]
        [--config configs/tiny.yaml --skip-data] [--section.field=value ...]

Every step runs the same command a user would type (printed with a leading `+`); rerunning
resumes training from its last checkpoint and skips corpus steps that are up to date.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], env: dict) -> float:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if code != 0:
        raise SystemExit(f"step failed with exit code {code}: {' '.join(cmd)}")
    return time.time() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="training processes (expert parallel size)")
    p.add_argument("--iters", type=int, default=300, help="training steps")
    p.add_argument("--run", default="runs/demo", help="run directory")
    p.add_argument("--serve-k", type=int, default=2, help="the k written into the export")
    p.add_argument("--config", default="configs/tiny.yaml", help="experiment config to train")
    p.add_argument("--skip-data", action="store_true",
                   help="do not prepare the demo corpus (the config names its own data)")
    p.add_argument("--out", default=None, help="export directory (default exports/<run name>)")
    args, overrides = p.parse_known_args(argv)

    py = sys.executable
    # PYTHON: the launcher scripts start this interpreter (the one with the project installed).
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHON": py,
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions")),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    timings = {}
    if not args.skip_data:
        timings["prepare data"] = run([py, "-m", "tools.prepare_demo_corpus"], env)
    timings["train"] = run(
        ["bash", "launchers/torchrun.sh", "--nproc", str(args.nproc), "--config", args.config,
         f"--parallel.expert={args.nproc}", f"--train.train_iters={args.iters}",
         f"--logging.dir={args.run}", "--name=demo", *overrides], env)
    timings["evaluate"] = run(
        [py, "-m", "mmoe_megatron.evaluation.run", "--run", args.run, "--ks", "1,2,3,4,6,8",
         "--layer-ks", "1,2,3,4", "--layer-ks", "4,3,2,1"], env)
    timings["budget search"] = run(
        [py, "-m", "mmoe_megatron.evaluation.budget", "--run", args.run, "--mean-k", "1.5",
         "--mean-k", "2", "--ks", "1,2,3,4", "--widths", "1"], env)
    export_dir = args.out or os.path.join("exports", os.path.basename(os.path.normpath(args.run)))
    timings["export"] = run(
        [py, "-m", "tools.export_hf", "--run", args.run, "--k", str(args.serve_k),
         "--layer-budgets", os.path.join(args.run, "budgets.json"), "--out", export_dir], env)

    with open(os.path.join(ROOT, args.run, "eval", "eval.json")) as f:
        results = json.load(f)["results"]
    print("\nvalidation loss of the one elastic model at each k:")
    for r in results:
        print(f"  k={r['label']:<10} loss {r['loss']:.4f}  ppl {r['ppl']:8.2f}  "
              f"{r['flops_per_token'] / 1e6:.2f} MFLOP/token")
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"report: {args.run}/eval/eval.md, plot: {args.run}/eval/eval.png, "
          f"budgets: {args.run}/budget_search.md, Hugging Face model: {export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
