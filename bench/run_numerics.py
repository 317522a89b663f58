"""What moves a run's numbers when nothing a user chose has changed: processes, threads, clipping.

A run repeats to the last digit on one machine, yet the same seed trained with another number of
threads, or on 1 or 2 data-parallel processes with DeepSpeed's own gradient norm
(`optimizer.grad_norm: deepspeed`), can end 0.02 nats apart on held-out text. This says
where the first bit differs. Each member's configuration (its suite's overrides and seed) trains for
`--steps` steps, logging every step, under each setting below, and is compared with a reference
setting: the first step whose gradient norm differs in any bit, the first whose loss does, the first
step where the reference clipped its gradients, and the loss difference at the last step.

    python -m bench.run_numerics --suite bench/suites/elasticity_ladder2x_cpu.yaml \
        --member k8_rerun --member temperature_shrink_k8compute --seed 3

The warmup is shortened to a quarter of the steps, so the short runs meet gradient clipping (the
suite's runs train with the same clipping, `optimizer.clip_grad`). Runs go to `--root`/runs/numerics/.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from bench.common import ROOT, suite_slug, write_result
from bench.suite_bench import bench_env


@dataclass(frozen=True)
class Setting:
    label: str
    processes: int
    threads: int
    clip: bool = True
    reference: Optional[str] = None
    """The setting it is compared with (None: it is a reference)."""
    overrides: tuple[str, ...] = ()


SETTINGS = (
    Setting("1 process, 1 thread", 1, 1),
    Setting("2 processes, 1 thread each", 2, 1, reference="1 process, 1 thread"),
    Setting("2 processes, 1 thread each, DeepSpeed's norm", 2, 1, reference="1 process, 1 thread",
            overrides=("--optimizer.grad_norm=deepspeed",)),
    Setting("1 process, 2 threads", 1, 2, reference="1 process, 1 thread"),
    Setting("1 process, 1 thread, no clipping", 1, 1, clip=False),
    Setting("2 processes, 1 thread each, no clipping", 2, 1, clip=False,
            reference="1 process, 1 thread, no clipping"),
)


def first_difference(reference: list[dict], other: list[dict], key: str) -> Optional[int]:
    """The first logged step at which `key` differs in any bit between two runs' train records
    (None: equal at every step both logged)."""
    theirs = {r["step"]: r[key] for r in other}
    for record in reference:
        step = record["step"]
        if step in theirs and theirs[step] != record[key]:
            return step
    return None


def first_clipped(records: list[dict], clip_grad: float) -> Optional[int]:
    """The first step whose gradient norm exceeded the clipping threshold (None: never)."""
    if clip_grad <= 0:
        return None
    return next((r["step"] for r in records if r["grad_norm"] > clip_grad), None)


def warmup(steps: int) -> int:
    """The short runs' warmup: a quarter of their steps, so that clipping fires within them."""
    return max(1, steps // 4)


def train(spec, label: str, overrides: list, setting: Setting, steps: int, out: str) -> list[dict]:
    """Train a member (`overrides`: its suite overrides and seed) for `steps` steps under `setting`;
    its train records, one per step."""
    from mmoe_megatron.evaluation.suite import override_args
    from mmoe_megatron.training.metrics import read_records

    args = override_args(overrides) + [
        f"--train.train_iters={steps}", f"--optimizer.warmup_iters={warmup(steps)}",
        "--train.log_interval=1", "--train.eval_interval=0", "--checkpoint.save_interval=0",
        "--checkpoint.keep_steps=[]", f"--logging.dir={out}", f"--name={os.path.basename(out)}"]
    if not setting.clip:
        args.append("--optimizer.clip_grad=0")
    args += setting.overrides
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        os.remove(os.path.join(out, "metrics.jsonl"))  # a rerun starts over, it does not resume
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(setting.processes),
           "-m", "mmoe_megatron.train", "--config", spec.base, "--checkpoint.load=null"] + args
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.log"), "w") as log:
        code = subprocess.call(cmd, env={**bench_env(), "OMP_NUM_THREADS": str(setting.threads)},
                               stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{label} ({setting.label}) failed with exit code {code}: see {out}/train.log")
    return [r for r in read_records(out) if r.get("kind") == "train"]


def compare(records: dict[str, list[dict]], clip_grad: float) -> list[dict]:
    """One row per compared setting: where it first differs from its reference."""
    rows = []
    for setting in SETTINGS:
        if setting.reference is None or setting.label not in records:
            continue
        ref, own = records[setting.reference], records[setting.label]
        rows.append({
            "setting": setting.label, "reference": setting.reference,
            "first_grad_norm_difference": first_difference(ref, own, "grad_norm"),
            "first_loss_difference": first_difference(ref, own, "loss"),
            "reference_first_clipped": first_clipped(ref, clip_grad if setting.clip else 0.0),
            "last_step": ref[-1]["step"], "last_loss_difference": own[-1]["loss"] - ref[-1]["loss"],
        })
    return rows


def markdown(rows_by_member: dict[str, list[dict]], steps: int, seed: int) -> str:
    step = lambda s: "never" if s is None else str(s)
    lines = [f"Each member's configuration trained for {steps} steps (warmup {warmup(steps)}, seed {seed}) "
             "under each setting, against the reference setting: the first step whose gradient norm or loss "
             "differs in any bit, the first step where the reference's gradient norm exceeded the "
             "clipping threshold, and the loss difference at the last step.", "",
             "| member | setting | against | first grad-norm difference | first loss difference | "
             "reference first clipped | loss difference at the end |", "|---|---|---|---|---|---|---|"]
    for member, rows in rows_by_member.items():
        for r in rows:
            lines.append(f"| {member} | {r['setting']} | {r['reference']} | {step(r['first_grad_norm_difference'])} "
                         f"| {step(r['first_loss_difference'])} | {step(r['reference_first_clipped'])} "
                         f"| {r['last_loss_difference']:+.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from mmoe_megatron.evaluation.suite import load_suite, member_overrides
    from mmoe_megatron.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True)
    p.add_argument("--member", action="append", required=True, help="members to train (repeatable)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--root", default=ROOT, help="directory the runs go under (runs/numerics/)")
    args = p.parse_args(argv)

    spec = load_suite(os.path.abspath(args.suite))
    members = {m.name: m for m in spec.members}
    unknown = [m for m in args.member if m not in members]
    if unknown:
        print(f"{spec.name} has no member {', '.join(unknown)}; its members: {', '.join(members)}", file=sys.stderr)
        return 1
    os.chdir(ROOT)
    rows_by_member = {}
    for name in args.member:
        overrides = member_overrides(spec, members[name], args.seed)
        clip_grad = load_config(spec.base, overrides).optimizer.clip_grad
        records = {}
        for setting in SETTINGS:
            slug = re.sub(r"[^a-z0-9]+", "_", setting.label.lower()).strip("_")
            out = os.path.join(args.root, "runs", "numerics", spec.name, name, f"seed{args.seed}", slug)
            records[setting.label] = train(spec, name, overrides, setting, args.steps, out)
            print(f"{name}: {setting.label} done", flush=True)
        rows_by_member[name] = compare(records, clip_grad)
    suite = suite_slug(spec)
    write_result(f"run_numerics_{suite}", f"What moves a run's numbers: processes, threads, clipping ({spec.name})",
                 markdown(rows_by_member, args.steps, args.seed),
                 {"suite": spec.name, "seed": args.seed, "steps": args.steps, "rows": rows_by_member})
    return 0


if __name__ == "__main__":
    sys.exit(main())
