"""What elastic training does to a specialist: fine-tune a suite's trained fixed-k specialist with the
suite's elastic routing and evaluate it as it goes.

    python -m bench.specialist_finetune --suite bench/suites/elasticity_ladder2x_wide_cpu.yaml \
        --specialist k8 --elastic elastic --seed 1 --steps 250 --eval-at 25 --eval-at 50 --eval-at 100 \
        --compare temperature_widths

The fine-tune starts from the specialist's final weights (`checkpoint.init_weights`, a fresh
optimizer), trains the `--elastic` member's configuration (its per-token ks) on the seed's data
order for `--steps` steps at the suite's final learning rate (`optimizer.min_lr`, constant after 10
warm-up steps), and is evaluated at each `--eval-at` step and the last with the suite's evaluation
settings (ks, samples, data seed, held-out domains), so its losses sit beside the suite's kept
results: the specialist it started from, the `--compare` member trained elastic from scratch, and
the specialists at their own k. It says whether the elastic objective undoes what the specialist's
wider routing learned, how fast, and what a specialist-first schedule would buy. Not at equal
compute: the start cost a whole specialist run; the table gives both runs' training FLOPs.
The specialist's run directory must still hold its final checkpoint.

`--train-only '*.mlp.router.*' --label routers` trains the routers and their temperatures alone
over the specialist's frozen experts and attention (optimizer.train_only), into its own results
file: whether the elastic objective needs to change the experts, or only how they are chosen.

`--report-only` (with the same options) trains nothing: it sets the run recorded in the results
file beside the kept results as they are now and keeps the command that ran it. `--start-record`
names the evaluated result of the checkpoint it started from when that is not the suite's kept
result (a specialist retrained since, on another machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import Optional

from bench.common import RESULTS, ROOT, kept_records, suite_slug, write_result

KS_SHOWN = ("1", "2", "3", "4", "6", "8")


def finetune(suite: str, specialist: str, elastic: str, seed: int, steps: int, eval_at: list[int],
             out_root: str, train_only: Optional[list[str]] = None, label: str = "") -> dict:
    """Train and evaluate; {step: {domain: {k label: loss}}} and the run's training FLOPs.
    `train_only`: patterns of the parameters that train (optimizer.train_only), e.g. the routers."""
    from mmoe_megatron import distributed
    from mmoe_megatron.config import override_args
    from mmoe_megatron.evaluation.run import evaluate_checkpoint, run_config as saved_config
    from mmoe_megatron.evaluation.suite import (
        Run, _vocab_size, domains, load_suite, member_config, member_overrides, run_dir, training_flops,
    )
    from mmoe_megatron.training.checkpoint import complete_checkpoints, tag_for

    spec = load_suite(suite)
    members = {m.name: m for m in spec.members}
    for name in (specialist, elastic):
        if name not in members:
            raise SystemExit(f"{spec.name} has no member {name!r}; members: {sorted(members)}")
    start_cfg = member_config(spec, members[specialist], seed)
    start = os.path.join(run_dir(spec, Run(members[specialist], seed)), "checkpoints",
                         tag_for(start_cfg.train.train_iters))
    if tag_for(start_cfg.train.train_iters) not in complete_checkpoints(os.path.dirname(start)):
        raise SystemExit(f"no complete final checkpoint of {specialist} seed {seed} at {start}: train it first "
                         f"(python -m bench.suite_bench --suite {suite} --member {specialist} --seed {seed})")
    name = f"{spec.name}-{specialist}-to-{elastic}{'-' + label if label else ''}-s{seed}"
    out = os.path.join(out_root, name)
    shutil.rmtree(out, ignore_errors=True)
    lr = start_cfg.optimizer.min_lr
    overrides = [(k, v) for k, v in member_overrides(spec, members[elastic], seed)
                 if k not in ("checkpoint.keep_steps", "logging.dir", "name", "train.train_iters")]
    overrides += [("train.train_iters", steps), ("optimizer.lr", lr), ("optimizer.min_lr", lr),
                  ("optimizer.warmup_iters", min(10, steps)), ("checkpoint.save_interval", steps),
                  ("checkpoint.keep_steps", sorted(s for s in set(eval_at) if s < steps)),
                  ("checkpoint.init_weights", start), ("checkpoint.load", None),
                  ("name", name), ("logging.dir", out)]
    if train_only:
        overrides.append(("optimizer.train_only", train_only))
    cmd = [sys.executable, "-m", "mmoe_megatron.train", "--config", spec.base] + override_args(overrides)
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.call(cmd, cwd=ROOT) != 0:
        raise SystemExit(f"the fine-tune failed (log in {out})")

    cfg = saved_config(out)
    losses = {}
    distributed.init_distributed(cfg)
    try:
        for step in sorted(set(eval_at) | {steps}):
            checkpoint = os.path.join(cfg.checkpoint_dir, tag_for(step))
            losses[str(step)] = {}
            for domain, domain_overrides in domains(spec):
                points, _ = evaluate_checkpoint(saved_config(out, domain_overrides), checkpoint, spec.eval.specs(),
                                                spec.eval.num_samples, analysis=False)
                losses[str(step)][domain] = {p.label: p.loss for p in points}
            print(f"evaluated step {step}", flush=True)
    finally:
        distributed.shutdown()
    return {"losses": losses, "training_flops": training_flops(cfg, _vocab_size(cfg)), "lr": lr,
            "start": start, "train_only": train_only}


def report(suite: str, specialist: str, elastic: str, compare: list[str], seed: int, run: dict,
           results_dir: str = RESULTS, start_record: Optional[dict] = None) -> tuple[str, dict]:
    """The table; `start_record`: the evaluated result of the checkpoint the fine-tune started from
    when it is not the suite's kept one (a specialist retrained since), else the kept one."""
    from mmoe_megatron.evaluation.suite import load_suite

    spec = load_suite(suite)
    kept = {(r["member"], r["seed"]): r for r in
            kept_records(spec, os.path.join(results_dir, suite_slug(spec)))}

    def final(record):
        return record["losses"][str(record["train_iters"])]

    if start_record is not None:
        kept[(specialist, seed)] = start_record
    missing = [m for m in [specialist] + compare if (m, seed) not in kept]
    if missing:
        raise SystemExit(f"no kept result of {missing} seed {seed} in bench/results/{suite_slug(spec)}")
    start = kept[(specialist, seed)]
    rows = [(f"`{specialist}` (the start), {start['train_iters']} steps", final(start), start["training_flops"])]
    steps = sorted(run["losses"], key=int)
    trained = f", only {', '.join(f'`{p}`' for p in run['train_only'])} training" if run.get("train_only") else ""
    for step in steps:
        rows.append((f"+ {step} steps of `{elastic}` routing{trained}", run["losses"][step],
                     start["training_flops"] + run["training_flops"] * int(step) / int(steps[-1])))
    for name in compare:
        r = kept[(name, seed)]
        rows.append((f"`{name}` from scratch, {r['train_iters']} steps", final(r), r["training_flops"]))
    # Each specialist at its own k: the target at that k.
    at_k = {str(r["trained_k"]): final(r) for (m, s), r in kept.items() if s == seed and r.get("trained_k")}
    lines = [f"Suite `{spec.name}`, seed {seed}: the `{specialist}` specialist fine-tuned with `{elastic}`'s "
             f"routing at lr {run['lr']:g} (constant), evaluated with the suite's settings. Training FLOPs "
             "count the start's run; the specialists' row gives each at its own k."]
    for domain in next(iter(run["losses"].values())):
        lines += ["", f"{domain}:", "", "| model | " + " | ".join(f"k = {k}" for k in KS_SHOWN) + " | training FLOPs |",
                  "|---|" + "---:|" * (len(KS_SHOWN) + 1)]
        for label, losses, flops in rows:
            cells = [f"{losses[domain][k]:.4f}" if k in losses.get(domain, {}) else "-" for k in KS_SHOWN]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {flops:.3g} |")
        cells = [f"{at_k[k][domain][k]:.4f}" if k in at_k and k in at_k[k].get(domain, {}) else "-" for k in KS_SHOWN]
        lines.append("| each specialist at its k | " + " | ".join(cells) + " | - |")
    data = {"suite": spec.name, "specialist": specialist, "elastic": elastic, "seed": seed, "run": run,
            "compare": {name: final(kept[(name, seed)]) for name in compare}, "start": final(start)}
    return "\n".join(lines) + "\n", data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--specialist", required=True, help="the fixed-k member to start from")
    p.add_argument("--elastic", required=True, help="the member whose routing the fine-tune trains with")
    p.add_argument("--compare", action="append", default=[], help="members shown beside it (repeatable)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--eval-at", type=int, action="append", default=[])
    p.add_argument("--train-only", action="append", default=None, metavar="PATTERN",
                   help="train only the parameters matching these global-name patterns (repeatable), "
                        "e.g. '*.mlp.router.*' for the routers and their temperatures over frozen experts")
    p.add_argument("--label", default="", help="a name for this variant: its run folder and results file end in it")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "specialist_finetune"))
    p.add_argument("--start-record", metavar="JSON",
                   help="the evaluated result (a suite member's results file) of the checkpoint the fine-tune "
                        "starts from, when it is not the suite's kept one, e.g. a specialist retrained since")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the run its results file recorded; train nothing")
    args = p.parse_args(argv)
    from mmoe_megatron.evaluation.suite import load_suite

    spec = load_suite(args.suite)
    name = f"specialist_finetune_{suite_slug(spec)}{'_' + args.label if args.label else ''}"
    # Checked before a fine-tune runs, not after.
    start_record = None
    if args.start_record:
        with open(args.start_record) as f:
            start_record = json.load(f)
        if (start_record.get("member"), start_record.get("seed")) != (args.specialist, args.seed):
            raise SystemExit(f"--start-record {args.start_record} is {start_record.get('member')!r} seed "
                             f"{start_record.get('seed')}, not {args.specialist!r} seed {args.seed}")
    record = None
    if args.report_only:
        path = os.path.join(RESULTS, f"{name}.json")
        if not os.path.exists(path):
            raise SystemExit(f"--report-only: no {path}; run the fine-tune first (without --report-only)")
        with open(path) as f:
            record = json.load(f)
        run = record["data"]["run"]
    else:
        run = finetune(args.suite, args.specialist, args.elastic, args.seed, args.steps, args.eval_at,
                       args.runs_dir, args.train_only, args.label)
    markdown, data = report(args.suite, args.specialist, args.elastic, args.compare, args.seed, run,
                            results_dir=RESULTS, start_record=start_record)
    if args.start_record:
        data["start_record"] = os.path.relpath(os.path.abspath(args.start_record), ROOT)
    if args.report_only:
        data["report_command"] = " ".join(["python -m bench.specialist_finetune"]
                                          + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    what = " (only the parameters matching " + ", ".join(args.train_only) + " trained)" if args.train_only else ""
    write_result(name, f"A specialist fine-tuned with elastic routing{what} ({spec.name})", markdown, data,
                 results_dir=RESULTS, recorded=record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
