"""Run a suite (train its members on every seed, evaluate them at every k, compare) as a benchmark,
and record the comparison in bench/results/<suite name>.json (plus its plots).

    python -m bench.suite_bench --suite bench/suites/elasticity_cpu.yaml [--nproc 2]
    python -m bench.suite_bench --suite S.yaml --member k2 --seed 3     # one run; the table grows
    python -m bench.suite_bench --suite S.yaml --report-only             # re-assemble the table

A suite can be built in parts: each evaluated run's results (losses at every k, checkpoint and
domain, with the code version and CPU it was trained on) are kept as a small JSON file in
bench/results/<suite name>/, and the table is assembled from every such file there, so runs
made at different times (or on different machines, which the table then says) add up. Runs
resume if interrupted, and a run already evaluated is not evaluated again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from bench.common import RESULTS, ROOT, kept_records, suite_slug, write_result


def _suite_cmd(command: str, suite: str, extra: list[str], env: dict) -> int:
    return subprocess.call([sys.executable, "-m", "mmoe_megatron.evaluation.suite", command, "--suite", suite,
                            *extra], cwd=ROOT, env=env)


def bench_env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   os.path.join(ROOT, ".cache", "torch_extensions"))}


def threads_per_process(nproc: int, threads=None) -> int:
    """Threads each training process runs: `threads` when given, else OMP_NUM_THREADS when the caller
    set it, else the cores shared out over the processes. Always set explicitly for the launch: a
    run's numbers change with its thread count (bench/run_numerics.py), and torchrun pins one
    thread per process only when it starts several."""
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads is None:
        threads = (os.cpu_count() or 1) // nproc
    return max(1, threads)


def train_and_keep(spec, suite: str, run, nproc: int, kept: str, env: dict) -> int:
    """Train one run (resuming if interrupted), evaluate it, and keep its results in `kept`.
    `env["OMP_NUM_THREADS"]` is the training processes' thread count (recorded per launch)."""
    from mmoe_megatron.evaluation.suite import result_file_name, run_dir

    launcher = f"{sys.executable} -m torch.distributed.run --nproc-per-node {nproc}"
    which = ["--member", run.member.name] + ([] if run.seed is None else ["--seed", str(run.seed)])
    start = time.time()
    code = _suite_cmd("train", suite, which + ["--launcher", launcher], env)
    wall = time.time() - start
    if code == 0:
        code = _suite_cmd("evaluate", suite, which, env)
    if code != 0:
        print(f"{run.label} failed with exit code {code}", file=sys.stderr)
        return code
    with open(os.path.join(ROOT, run_dir(spec, run), "eval", "results.json")) as f:
        record = json.load(f)
    record.setdefault("bench", {}).setdefault("train_wall_s", []).append(
        {"seconds": wall, "nproc": nproc, "threads": int(env["OMP_NUM_THREADS"])})
    with open(os.path.join(kept, result_file_name(run)), "w") as f:
        json.dump(record, f, indent=2)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--nproc", type=int, default=2, help="training processes per run")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per training process (default: OMP_NUM_THREADS if set, else cores / nproc)")
    p.add_argument("--member", default=None, help="only this member's runs")
    p.add_argument("--seed", type=int, default=None, help="only the runs of this seed")
    p.add_argument("--report-only", action="store_true", help="only assemble the table from the kept results")
    args = p.parse_args(argv)

    from mmoe_megatron.evaluation.compare import markdown, write_comparison
    from mmoe_megatron.evaluation.suite import load_suite, own_runs, select

    spec = load_suite(args.suite)
    slug = suite_slug(spec)
    kept = os.path.join(RESULTS, slug)
    os.makedirs(kept, exist_ok=True)
    env = {**bench_env(), "OMP_NUM_THREADS": str(threads_per_process(args.nproc, args.threads))}
    if not args.report_only:
        for run in own_runs(spec, select(spec, args.member, args.seed)):
            code = train_and_keep(spec, args.suite, run, args.nproc, kept, env)
            if code != 0:
                return code

    records = kept_records(spec, kept)
    if not records:
        print(f"no evaluated run of {spec.name} in {kept}", file=sys.stderr)
        return 1
    report = os.path.join(ROOT, spec.runs_dir, spec.name, "report")
    paths = write_comparison(spec, records, out=report)
    with open(paths["json"]) as f:
        data = json.load(f)
    images = []
    for key, path in paths.items():
        if key.startswith("png"):
            name = f"{slug}{os.path.basename(path)[len('comparison'):-4]}.png"
            shutil.copyfile(path, os.path.join(RESULTS, name))
            images.append(f"![{spec.name} {key}](bench/results/{name})")
    expected = len(spec.members) * max(1, len(spec.seeds))
    launches = [w for r in records for w in r.get("bench", {}).get("train_wall_s", [])]
    walls = sorted(w["seconds"] / 60 for w in launches)
    nprocs = "/".join(str(n) for n in sorted({w["nproc"] for w in launches}))
    lines = [markdown(data, level=4),
             f"Runs evaluated: {len(records)} of {expected}"
             + (f"; training wall time per launch: median {walls[len(walls) // 2]:.1f} min, "
                f"{walls[0]:.1f}-{walls[-1]:.1f} min (a launch that found its run trained only evaluates; "
                f"{nprocs} process(es) per run, on a machine possibly shared with other work)" if walls else "")
             + ".", "", *images]
    write_result(slug, f"Suite: {spec.name}", "\n".join(lines),
                 {"comparison": data, "suite": os.path.relpath(os.path.abspath(args.suite), ROOT)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
