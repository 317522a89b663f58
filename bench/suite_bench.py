"""Run a suite (train every member, evaluate all at every k, compare) as a benchmark and record
its comparison table, plot and wall time in bench/results/<suite name>.json.

    python -m bench.suite_bench --suite bench/suites/elasticity_cpu.yaml [--nproc 2]
    python -m bench.suite_bench --suite bench/suites/ablations_cpu.yaml

The suite's members resume if interrupted: rerunning the command finishes the remaining work.
For an ablation suite (every member elastic) the summary names the member with the lowest mean
loss over the uniform ks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from bench.common import RESULTS, ROOT, write_result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--nproc", type=int, default=2, help="training processes per member")
    args = p.parse_args(argv)

    from mmoe_megatron.evaluation.suite import load_suite

    spec = load_suite(args.suite)
    launcher = f"{sys.executable} -m torch.distributed.run --nproc-per-node {args.nproc}"
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  os.path.join(ROOT, ".cache", "torch_extensions"))}
    start = time.time()
    code = subprocess.call([sys.executable, "-m", "mmoe_megatron.evaluation.suite", "run", "--suite",
                            args.suite, "--launcher", launcher], cwd=ROOT, env=env)
    wall = time.time() - start
    if code != 0:
        print(f"suite failed with exit code {code}", file=sys.stderr)
        return code

    report = os.path.join(ROOT, spec.runs_dir, spec.name, "report")
    with open(os.path.join(report, "comparison.json")) as f:
        comparison = json.load(f)
    with open(os.path.join(report, "comparison.md")) as f:
        table = f.read()
    slug = spec.name.replace("-", "_")
    png = os.path.join(RESULTS, f"{slug}.png")
    shutil.copyfile(os.path.join(report, "comparison.png"), png)

    analysis = ""
    elastic = next(m for m in spec.members if m.role == "elastic")
    with open(os.path.join(ROOT, spec.runs_dir, spec.name, elastic.name, "eval", "eval.md")) as f:
        text = f.read()
    if "### Expert ranking" in text:
        analysis = "\n#### " + text[text.index("### Expert ranking") + 4:]

    lines = [table.replace("## ", "#### ", 1)]
    ranked = sorted((r for r in comparison["rows"] if r["mean_loss_uniform_k"] is not None),
                    key=lambda r: r["mean_loss_uniform_k"])
    if all(m.role == "elastic" for m in spec.members):
        best = ranked[0]
        lines.append(f"Lowest mean loss over uniform ks: **{best['name']}** ({best['mean_loss_uniform_k']:.4f}); "
                     "order: " + " < ".join(f"{r['name']} ({r['mean_loss_uniform_k']:.4f})" for r in ranked) + ".")
    gaps = comparison["elastic_gap_to_specialist"]
    if gaps:
        lines.append("Elastic minus specialist at each specialist's k: "
                     + ", ".join(f"k={k}: {v:+.4f}" for k, v in gaps.items()) + ".")
    lines += [f"Wall time of the whole suite (train {len(spec.members)} models, evaluate, compare): "
              f"{wall / 60:.1f} min with {args.nproc} training processes per model.",
              "", f"![{spec.name}](bench/results/{slug}.png)", analysis]
    write_result(slug, f"Suite: {spec.name}", "\n".join(lines),
                 {"comparison": comparison, "wall_s": wall, "suite": os.path.relpath(args.suite, ROOT)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
