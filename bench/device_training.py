"""A suite member's training on a GPU against the same run on CPU: loss per step and speed.

    python -m bench.device_training run --suite S --member M [--member M2] [--seed 1] --steps 200
    python -m bench.device_training report

`run` trains each member's configuration (the suite's overrides, the member's, the seed) for
`--steps` steps through the user entry point, `mmoe_megatron.train`, on whatever device this
machine gives it (CUDA when present), logging every step, and keeps
`<records-dir>/<device>-<member>-s<seed>.json`: the loss and tokens/s of every step, the device,
the code version. The k and width draws come from seeded CPU generators and the data order from
the seed, so a CUDA run and a CPU run of the same member and seed see the same tokens at the same
ks: their losses differ only by the devices' rounding, which compounds over the steps.

`report` pairs the CUDA and CPU records of each member and seed: the first step whose losses
differ by more than DIVERGED, the per-step gap at steps 10, 50 and the last, and the difference of
the mean loss over the last tenth of the steps, set against the same difference between two seeds
of the member on CPU when both were run; the validation losses of the runs' final evaluations
(`final_valid`, the same tokens on both devices; `final-valid --runs-dir D` adds them to records
brought back without them); and the steps per second on each device (median after the first ten).
It writes bench/results/device_training.json and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import RESULTS, ROOT, write_result

RECORDS = os.path.join(RESULTS, "device_training")
SKIP_STEPS = 10
"""Steps left out of the speed figures (start-up, allocator warm-up)."""


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train(suite: str, member_name: str, seed: int, steps: int, records_dir: str,
          version: str | None = None) -> str:
    import torch

    from mmoe_megatron.config import override_args
    from mmoe_megatron.evaluation.suite import code_version, load_suite, member_overrides
    from mmoe_megatron.training.metrics import read_metrics

    spec = load_suite(suite)
    member = next((m for m in spec.members if m.name == member_name), None)
    if member is None:
        raise SystemExit(f"no member {member_name!r} in {suite}; members: {[m.name for m in spec.members]}")
    device = device_name()
    run_dir = os.path.join(ROOT, "runs", "device_training", device, f"{member_name}-s{seed}")
    # The suite's overrides at this seed, then this benchmark's: fewer steps (the schedule scaled to
    # them, the same on both devices), every step logged, one checkpoint at the end.
    overrides = [(k, v) for k, v in member_overrides(spec, member, seed)
                 if k not in ("checkpoint.keep_steps", "logging.dir")]
    overrides += [("train.train_iters", steps), ("train.log_interval", 1),
                  ("optimizer.warmup_iters", max(1, steps // 10)), ("checkpoint.save_interval", steps),
                  ("checkpoint.keep_last", 1), ("logging.dir", run_dir)]
    cmd = [sys.executable, "-m", "mmoe_megatron.train", "--config", spec.base] + override_args(overrides)
    if os.path.isdir(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    start = time.time()
    print("+ " + " ".join(cmd), flush=True)
    status = subprocess.call(cmd, cwd=ROOT)
    wall = time.time() - start
    metrics = read_metrics(run_dir)
    history = metrics["train"]
    if status != 0 or len(history) < steps:
        raise SystemExit(f"{member_name} seed {seed} on {device}: training exited with {status} after "
                         f"{len(history)} of {steps} logged steps (log: {run_dir})")
    record = {
        "suite": spec.name, "member": member_name, "seed": seed, "steps": steps, "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__, "code_version": version or code_version(ROOT), "wall_s": wall,
        "loss": [history[s]["loss"] for s in range(1, steps + 1)],
        "tokens_per_s": [history[s]["tokens_per_s"] for s in range(1, steps + 1)],
        "tokens_per_step": spec_tokens_per_step(overrides, spec.base),
    }
    record["final_valid"] = final_valid(metrics, run_dir)
    os.makedirs(records_dir, exist_ok=True)
    path = os.path.join(records_dir, f"{device}-{member_name}-s{seed}.json")
    with open(path, "w") as f:
        json.dump(record, f)
    print(f"wrote {path} ({wall:.0f} s)", flush=True)
    return path


def final_valid(metrics: dict, run_dir: str) -> dict:
    """The validation loss per k of the final evaluation in a run's metrics (`read_metrics` of
    `run_dir`; the same tokens on every device)."""
    evals = metrics["eval"]
    if not evals:
        raise SystemExit(f"{run_dir}: no evaluation in metrics.jsonl")
    return evals[max(evals, key=lambda key: key[1])]["loss"]


def attach_final_valid(records_dir: str, runs_dir: str) -> None:
    """Add `final_valid` to records written without it, from <runs_dir>/<device>/<member>-s<seed>
    (a GPU machine's runs, brought back)."""
    from mmoe_megatron.training.metrics import read_metrics

    for name in sorted(os.listdir(records_dir)):
        path = os.path.join(records_dir, name)
        with open(path) as f:
            record = json.load(f)
        if "final_valid" in record:
            continue
        run_dir = os.path.join(runs_dir, record["device"], f"{record['member']}-s{record['seed']}")
        record["final_valid"] = final_valid(read_metrics(run_dir), run_dir)
        with open(path, "w") as f:
            json.dump(record, f)
        print(f"added the final validation losses to {path}")


def spec_tokens_per_step(overrides: list, base: str) -> int:
    from mmoe_megatron.config import load_config

    cfg = load_config(base, overrides)
    return cfg.train.global_batch_size * cfg.data.seq_length


def load_records(records_dir: str) -> dict:
    out = {}
    for name in sorted(os.listdir(records_dir)) if os.path.isdir(records_dir) else []:
        if name.endswith(".json"):
            with open(os.path.join(records_dir, name)) as f:
                r = json.load(f)
            out[(r["device"], r["member"], r["seed"])] = r
    return out


DIVERGED = 1e-4
"""A per-step loss gap above this marks where two runs of the same tokens stop being the same."""


def gaps(a: list[float], b: list[float]) -> dict:
    """How runs `a` and `b` of the same tokens differ: the first step whose losses differ by more
    than DIVERGED, |a - b| at steps 10, 50 and the last, and the difference of their mean losses
    over the last tenth of the steps (a smoothed loss, comparable with a difference of seeds)."""
    n = min(len(a), len(b))
    d = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    tail = max(1, n // 10)
    return {"first_diverged_step": next((i + 1 for i, x in enumerate(d) if x > DIVERGED), None),
            "at": {str(s): d[s - 1] for s in (10, 50, n) if s <= n},
            "tail_mean_diff": statistics.fmean(a[n - tail:n]) - statistics.fmean(b[n - tail:n])}


def steps_per_s(record: dict) -> float:
    rates = record["tokens_per_s"][SKIP_STEPS:] or record["tokens_per_s"]
    return statistics.median(rates) / record["tokens_per_step"]


def report(records_dir: str, results_dir: str = RESULTS) -> dict:
    records = load_records(records_dir)
    rows = []
    for (device, member, seed), cuda in sorted(records.items()):
        if device != "cuda" or ("cpu", member, seed) not in records:
            continue
        cpu = records[("cpu", member, seed)]
        other = next((r for (d, m, s), r in sorted(records.items()) if d == "cpu" and m == member and s != seed), None)
        rows.append({
            "member": member, "seed": seed, "steps": min(cuda["steps"], cpu["steps"]),
            "device_gap": gaps(cuda["loss"], cpu["loss"]),
            "seed_gap": gaps(other["loss"], cpu["loss"]) if other else None,
            "seed_gap_seeds": [seed, other["seed"]] if other else None,
            "cuda_steps_per_s": steps_per_s(cuda), "cpu_steps_per_s": steps_per_s(cpu),
            "cuda_device": cuda["device_name"], "cuda_torch": cuda["torch"], "cpu_torch": cpu["torch"],
            "code_versions": sorted({cuda["code_version"], cpu["code_version"]}
                                    | ({other["code_version"]} if other else set())),
            "final_loss": {"cuda": cuda["loss"][-1], "cpu": cpu["loss"][-1]},
            "final_valid": {"cuda": cuda["final_valid"], "cpu": cpu["final_valid"],
                            "other_seed": other["final_valid"] if other else None},
        })
    if not rows:
        raise SystemExit(f"no member has both a CUDA and a CPU record in {records_dir}")
    lines = ["The same run (suite member, seed, data order, k and width draws) trained on a GPU and on "
             "this project's CPU machine through `mmoe_megatron.train`, fp32, every step logged. The "
             "per-step losses agree until the devices' rounding has compounded into a different "
             f"trajectory (first step with a gap above {DIVERGED:g}); from then on, compare the mean loss of "
             "the last tenth of the steps with the difference between two seeds of the member on CPU.", "",
             "| member | seed | steps | first step apart | per-step gap at 10 / 50 / last | "
             "mean loss of the last tenth, CUDA - CPU | the same, another seed - this one (CPU) | steps/s CUDA / CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["device_gap"]
        seed_gap = f"{r['seed_gap']['tail_mean_diff']:+.4f}" if r["seed_gap"] else "-"
        lines.append(f"| {r['member']} | {r['seed']} | {r['steps']} | {g['first_diverged_step'] or 'none'} | "
                     f"{' / '.join(f'{v:.4f}' for v in g['at'].values())} | {g['tail_mean_diff']:+.4f} | "
                     f"{seed_gap} | {r['cuda_steps_per_s']:.2f} / {r['cpu_steps_per_s']:.2f} |")
    lines += ["", "Validation loss at the last step (the run's final evaluation, the same tokens on both devices):",
              "", "| member | seed | k | CUDA | CPU | CUDA - CPU | another seed - this one (CPU) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["final_valid"]
        for k in v["cpu"]:
            other = f"{v['other_seed'][k] - v['cpu'][k]:+.4f}" if v["other_seed"] else "-"
            lines.append(f"| {r['member']} | {r['seed']} | {k} | {v['cuda'][k]:.4f} | {v['cpu'][k]:.4f} | "
                         f"{v['cuda'][k] - v['cpu'][k]:+.4f} | {other} |")
    r0 = rows[0]
    lines += ["", f"CUDA: {r0['cuda_device']}, torch {r0['cuda_torch']}; CPU: torch {r0['cpu_torch']}; "
              f"code version(s) {', '.join(r0['code_versions'])}."]
    data = {"rows": rows}
    write_result("device_training", "A suite member's training on CUDA against CPU", "\n".join(lines) + "\n",
                 data, results_dir)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--suite", required=True)
    r.add_argument("--member", action="append", required=True)
    r.add_argument("--seed", type=int, action="append", default=None)
    r.add_argument("--steps", type=int, default=200)
    r.add_argument("--records-dir", default=RECORDS)
    r.add_argument("--code-version", default=None,
                   help="the commit trained, where the tree has no .git (a copy sent to a GPU machine)")
    att = sub.add_parser("final-valid", help="add the final validation losses to records written without them")
    att.add_argument("--records-dir", default=RECORDS)
    att.add_argument("--runs-dir", required=True, help="holds <device>/<member>-s<seed>/metrics.jsonl")
    rep = sub.add_parser("report")
    rep.add_argument("--records-dir", default=RECORDS)
    rep.add_argument("--results-dir", default=RESULTS)
    args = p.parse_args(argv)
    if args.command == "run":
        for member in args.member:
            for seed in args.seed or [1]:
                train(args.suite, member, seed, args.steps, args.records_dir, args.code_version)
        return 0
    if args.command == "final-valid":
        attach_final_valid(args.records_dir, args.runs_dir)
        return 0
    report(args.records_dir, args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
