"""Shared by the benchmarks: machine description, result files, single-process start-up.

Every benchmark writes `bench/results/<name>.json` (command, machine, date, data, and the
Markdown section that RESULTS.md shows); `python -m bench.make_results` assembles RESULTS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        from megatron.core import package_info

        # __version__ of megatron-core 0.19 carries the current directory's git commit.
        info["megatron_core"] = package_info.__shortversion__
    except Exception:
        pass
    return info


def command_line() -> str:
    module = sys.modules["__main__"].__spec__
    head = f"python -m {module.name}" if module is not None else f"python {sys.argv[0]}"
    return " ".join([head] + [shlex.quote(a) for a in sys.argv[1:]])


def write_result(name: str, title: str, markdown: str, data: dict, results_dir: str = RESULTS,
                 recorded: Optional[dict] = None) -> str:
    """Write a benchmark's record. `recorded`: the earlier record of the run whose numbers a rebuilt
    report shows; its command, date and machine are kept (they produced the numbers)."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    record = {
        "name": name, "title": title, "command": command_line(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(), "markdown": markdown, "data": data,
    }
    if recorded is not None:
        record.update({key: recorded[key] for key in ("command", "date", "machine") if key in recorded})
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(markdown)
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return path


def spread(values) -> dict:
    """Median and the 10th-90th percentile range of a sample."""
    values = sorted(values)
    q = statistics.quantiles(values, n=10) if len(values) >= 2 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1],
            "mean": statistics.fmean(values), "n": len(values)}


def mean_std_cell(values, signed: bool = True) -> str:
    """A table cell: the mean of `values` to 4 decimals (signed unless asked not to), ± the sample
    std when there are two or more."""
    mean = statistics.fmean(values)
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def single_process(cfg) -> None:
    """torch.distributed (world of one, on a free local port) and megatron's parallel state for
    `cfg`. The port is not exported: a subprocess a benchmark starts (an engine, a launcher) must
    not inherit a rendezvous address this process holds."""
    from mmoe_megatron import distributed

    distributed.init_distributed(cfg)


def measure_kept_runs(spec, kept: str, measure, members=None, seeds=None) -> int:
    """`measure(run)` of every evaluated run of suite `spec` under the current directory (only
    `members` and `seeds` when given), in this one process; each record, with the seconds it took,
    is kept as `kept/<run>.json`. Returns how many runs it measured."""
    import time

    from mmoe_megatron import distributed
    from mmoe_megatron.evaluation.run import run_config as saved_config
    from mmoe_megatron.evaluation.suite import result_file_name, run_dir, runs

    chosen = [r for r in runs(spec) if (not members or r.member.name in members) and (not seeds or r.seed in seeds)
              and os.path.isfile(os.path.join(run_dir(spec, r), "eval", "results.json"))]
    if not chosen:
        return 0
    os.makedirs(kept, exist_ok=True)
    single_process(saved_config(run_dir(spec, chosen[0])))
    try:
        for run in chosen:
            start = time.time()
            record = measure(run)
            record["seconds"] = time.time() - start
            with open(os.path.join(kept, result_file_name(run)), "w") as f:
                json.dump(record, f, indent=2)
    finally:
        distributed.shutdown()
    return len(chosen)


def final_model(spec, run):
    """(run directory, config as the run saved it for the validation domain, final checkpoint, the
    model loaded from it) of a suite run, in this process (`measure_kept_runs` set it up)."""
    from mmoe_megatron.data import resolve_vocab_size
    from mmoe_megatron.evaluation.run import load_model, run_config as saved_config
    from mmoe_megatron.evaluation.suite import domains, run_dir
    from mmoe_megatron.training.checkpoint import tag_for

    out = run_dir(spec, run)
    cfg = saved_config(out, domains(spec)[0][1])
    checkpoint = os.path.join(cfg.checkpoint_dir, tag_for(cfg.train.train_iters))
    return out, cfg, checkpoint, load_model(cfg, checkpoint, resolve_vocab_size(cfg))


def suite_samples(spec, out: str):
    """(domain name, dataset, indices) of every evaluation domain of suite `spec` (the validation
    split first) on the samples its evaluation scored, for the run in `out`."""
    from mmoe_megatron.data import build_datasets
    from mmoe_megatron.evaluation.core import eval_indices
    from mmoe_megatron.evaluation.run import run_config as saved_config
    from mmoe_megatron.evaluation.suite import domains

    for name, overrides in domains(spec):
        dataset = build_datasets(saved_config(out, overrides), train_samples=1, valid_samples=spec.eval.num_samples,
                                 test_samples=0)[1]
        yield name, dataset, eval_indices(min(spec.eval.num_samples, len(dataset)), 0, 1)


def check_kept(run, recorded: dict, domain: str, k, loss: float, what: str, agree: float) -> None:
    """Refuse a loss re-measured on a suite's own samples (`what` says how) that is more than
    `agree` nats from the run's kept result `recorded[domain][k]`."""
    kept = recorded[domain][str(k)]
    if abs(loss - kept) > agree:
        raise RuntimeError(f"{run.label} {domain} k={k}: {what} {loss:.4f}, the suite's kept result is "
                           f"{kept:.4f}; the samples or weights differ")


def suite_slug(spec) -> str:
    """The suite's name as its files in bench/results/ spell it (kept runs, reports)."""
    return spec.name.replace("-", "_")


def kept_records(spec, kept: str) -> list[dict]:
    """The records kept in `kept` (one JSON file per run) whose member suite `spec` still has,
    with the runs members share (`same_runs_as`: the other member's record under this name)."""
    from mmoe_megatron.evaluation.suite import with_shared_runs

    names = {m.name for m in spec.members}
    records = []
    for name in sorted(os.listdir(kept)) if os.path.isdir(kept) else []:
        if not name.endswith(".json"):
            continue
        with open(os.path.join(kept, name)) as f:
            record = json.load(f)
        if record["member"] in names:
            records.append(record)
    return with_shared_runs(spec, records)


def kept_runs_parser(doc: str):
    """Command line of a benchmark that measures a suite's kept runs (`run_kept_benchmark`)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True)
    p.add_argument("--root", default=ROOT, help="directory holding the suite's runs directory")
    p.add_argument("--member", action="append", help="only these members (repeatable)")
    p.add_argument("--seed", type=int, action="append", help="only these seeds (repeatable)")
    p.add_argument("--report-only", action="store_true")
    return p


def run_kept_benchmark(args, name: str, title: str, measure, report, check=None) -> int:
    """Measure the kept runs of `args.suite` under `args.root` (`measure(spec, run)` -> record, kept
    in bench/results/<name>_<suite>/), then write the report of every kept record
    (`report(spec, records)` -> markdown, data) as bench/results/<name>_<suite>.json.
    `check(spec)` may return why the suite does not fit the benchmark. Returns the exit status."""
    from mmoe_megatron.evaluation.suite import load_suite

    suite = os.path.abspath(args.suite)
    os.chdir(args.root)
    spec = load_suite(suite)
    problem = check(spec) if check is not None else None
    if problem:
        print(problem, file=sys.stderr)
        return 1
    slug = f"{name}_{suite_slug(spec)}"
    kept = os.path.join(RESULTS, slug)
    if not args.report_only and not measure_kept_runs(spec, kept, lambda run: measure(spec, run),
                                                      args.member, args.seed):
        print(f"no evaluated run of {spec.name} under {args.root}", file=sys.stderr)
        return 1
    records = kept_records(spec, kept)
    if not records:
        print(f"no kept result in {kept}", file=sys.stderr)
        return 1
    try:
        markdown, data = report(spec, records)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    os.chdir(ROOT)
    write_result(slug, f"{title}: {spec.name}", markdown,
                 {**data, "suite": os.path.relpath(suite, ROOT), "runs": len(records)})
    return 0
