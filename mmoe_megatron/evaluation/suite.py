"""A suite: one elastic model, fixed-k specialists and a standard top-k model (and optionally
baselines and other elastic variants), trained by the same code on the same data and token
budget, on one or several seeds, then all evaluated at every k (at several points of training,
on the validation split and on held-out text) and compared.

Suite file (YAML):
    name: demo-suite
    base: configs/tiny.yaml            # shared model, data, training budget
    overrides: {train.train_iters: 300} # applied to every member
    seeds: [1, 2, 3]                   # optional: every member trained once per train.seed
    eval:
      ks: [1, 2, 3, 4, 6, 8]
      layer_ks: [[1, 2, 3, 4]]
      num_samples: 256
      fractions: [0.25, 0.5, 1.0]      # checkpoints evaluated, as fractions of training
      data_seed: 1234                  # every run is evaluated on the same validation samples
      heldout: [{name: docs, prefix: data/heldout/docs_text_document}]   # text never trained on
    members:
      - {name: elastic, role: elastic}                       # the base config as is
      - {name: k1, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [1],
                                                 matryoshka.normalization: softmax_topk}}
      - {name: distill, role: elastic, overrides: {matryoshka.distill_coeff: 0.5},
         equal_compute_to: elastic}       # as many steps as give the elastic member's compute
      - {name: elastic_data1, role: elastic, overrides: {data.seed: 1},
         same_runs_as: elastic}           # its seed 1 trains exactly elastic's seed 1: reused
      - {name: k1_shared, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [1],
                                                        moe.shared_expert_ffn_hidden_size: 64}}
      - {name: shared, role: elastic, overrides: {moe.shared_expert_ffn_hidden_size: 64},
         specialists: [k1_shared]}        # its tax against these (its own architecture's) only;
                                          # the other elastic members' against k1

A run is one (member, seed). Runs go to runs/<suite>/<member> (no seeds) or
runs/<suite>/<member>/seed<S>; the report to runs/<suite>/report.

Commands (each runs the same entry points a user would):
    python -m mmoe_megatron.evaluation.suite train  --suite S.yaml [--member NAME|INDEX] [--seed S]
    python -m mmoe_megatron.evaluation.suite evaluate --suite S.yaml [--member NAME] [--force]
    python -m mmoe_megatron.evaluation.suite report --suite S.yaml
    python -m mmoe_megatron.evaluation.suite run --suite S.yaml      # all three, in turn
An INDEX counts runs (member-major, then seed), as Slurm array tasks do. Evaluation skips runs
already evaluated with the same evaluation settings, so a suite can be completed in parts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import yaml

from mmoe_megatron.config import ConfigError, ExperimentConfig, load_config, override_args
from mmoe_megatron.config.base import from_dict
from mmoe_megatron.train import EXIT_PREEMPTED

ROLES = ("elastic", "specialist", "standard", "baseline")
VALID = "valid"


@dataclass
class MemberSpec:
    name: str
    role: str = "elastic"
    overrides: dict[str, Any] = field(default_factory=dict)
    equal_compute_to: Optional[str] = None
    """Another member's name: train for as many steps as give that member's training compute
    (forward and backward FLOPs, teacher forwards of self-distillation counted)."""
    same_runs_as: Optional[str] = None
    """Another member's name: at a seed where this member's run would train exactly what that
    member's run trains (the same config once the run's name and directory and the seeds that
    default to train.seed are resolved; checked), that run is this member's too: it is not
    trained again, and its result stands in reports for both."""
    specialists: Optional[list[str]] = None
    """An elastic member's own specialists (member names, one per k): its tax is measured against
    these, e.g. specialists of its own architecture. Without it, against every specialist that no
    member names here."""
    variant_of: Optional[str] = None
    """An elastic member's reference in the report's comparison of elastic variants: the elastic
    member whose setting it changes, compared with it seed by seed at every k (with one seed's
    data order and k draws fixed in both, the pair differs only in that setting). Without it,
    the suite's first elastic member."""


@dataclass
class HeldoutSpec:
    name: str
    """Label of the domain in reports (e.g. docs)."""
    prefix: str
    """Indexed dataset of text no member trained on, tokenized with the suite's tokenizer."""


@dataclass
class EvalSpec:
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    layer_ks: list[list[int]] = field(default_factory=list)
    num_samples: Optional[int] = None
    fractions: list[float] = field(default_factory=lambda: [1.0])
    """Points of training whose checkpoints are kept and evaluated (1.0 = the end)."""
    curve_ks: Optional[list[int]] = None
    """ks evaluated at the fractions before the end (the learning curve); null: all of `ks` and
    `layer_ks`. The end of training is always evaluated at all of them."""
    data_seed: Optional[int] = None
    """Shuffle seed of the evaluation samples; set it so that runs of every seed are evaluated on
    the same samples (null: each run's own data seed)."""
    heldout: list[HeldoutSpec] = field(default_factory=list)
    widths: list[float] = field(default_factory=list)
    """Expert widths at which every k of `ks` is evaluated too (the (k, width) grid of slimmable
    experts; any model can be evaluated there). Empty: full width only."""
    points: list[str] = field(default_factory=list)
    """More points as labels: per-layer k and width vectors, e.g. "[1,2,4,8]@[1,0.5,0.5,0.25]"."""
    budgets: list[float] = field(default_factory=list)
    """Forward FLOPs-per-token budgets at which benchmarks (bench/frontier.py) search each run of
    `budget_members` for the per-layer (k, width) vector over `budget_ks` x (`widths` and 1) with
    the lowest loss (budget_grid.py), on `budget_samples` validation samples. Checked at load."""
    budget_ks: Optional[list[int]] = None
    """ks of the budget search; null: `ks`."""
    budget_samples: int = 64
    budget_members: list[str] = field(default_factory=list)
    """Members whose runs are searched; empty: every elastic member."""

    def specs(self) -> list:
        """Every spec evaluated at the end of training, in column order."""
        from mmoe_megatron.evaluation.core import grid_spec, parse_spec

        out = list(self.ks) + [list(v) for v in self.layer_ks]
        out += [grid_spec(k, w) for w in self.widths if w != 1.0 for k in self.ks]
        return out + [parse_spec(p) for p in self.points]


@dataclass
class SuiteSpec:
    name: str
    base: str
    members: list[MemberSpec]
    overrides: dict[str, Any] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    runs_dir: str = "runs"
    seeds: list[int] = field(default_factory=list)
    """train.seed of each run of every member (initial weights, k draws and data order, unless
    model.init_seed, matryoshka.seed or data.seed fix them); empty: one run per member with the
    base config's seed."""


@dataclass(frozen=True)
class Run:
    member: MemberSpec
    seed: Optional[int]

    @property
    def label(self) -> str:
        return self.member.name if self.seed is None else f"{self.member.name}/seed{self.seed}"


def load_suite(path: str) -> SuiteSpec:
    with open(path) as f:
        data = yaml.safe_load(f)
    spec = from_dict(SuiteSpec, data)
    base = spec.base if os.path.isabs(spec.base) else os.path.join(_repo_root(path), spec.base)
    spec.base = base
    names = [m.name for m in spec.members]
    if len(set(names)) != len(names):
        raise ConfigError("members", f"member names must be unique, got {names}")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError("seeds", f"seeds must be distinct, got {spec.seeds}")
    for i, f in enumerate(spec.eval.fractions):
        if not 0 < f <= 1:
            raise ConfigError(f"eval.fractions[{i}]", f"got {f}; a fraction of training in (0, 1]")
    from mmoe_megatron.evaluation.core import parse_spec

    for i, text in enumerate(spec.eval.points):
        try:
            parse_spec(text)
        except ValueError as e:
            raise ConfigError(f"eval.points[{i}]", f"{text!r} is not a point label: {e}") from None
    for i, name in enumerate(spec.eval.budget_members):
        if name not in names:
            raise ConfigError(f"eval.budget_members[{i}]", f"no member {name!r}; members: {names}")
    for i, m in enumerate(spec.members):
        if m.role not in ROLES:
            raise ConfigError(f"members[{i}].role", f"got {m.role!r}; allowed: {', '.join(ROLES)}")
        if m.equal_compute_to is not None and m.equal_compute_to not in names:
            raise ConfigError(f"members[{i}].equal_compute_to", f"no member {m.equal_compute_to!r}")
        if m.variant_of is not None:
            elastic = [e.name for e in spec.members if e.role == "elastic" and e.name != m.name]
            if m.role != "elastic" or m.variant_of not in elastic:
                raise ConfigError(f"members[{i}].variant_of",
                                  f"{m.name!r} ({m.role}) cannot be a variant of {m.variant_of!r}: both must be "
                                  f"elastic members, and not the same; elastic members: {elastic}")
        if m.same_runs_as is not None and m.same_runs_as not in names[:i]:
            raise ConfigError(f"members[{i}].same_runs_as",
                              f"no member {m.same_runs_as!r} listed before {m.name!r}; members: {names}")
    if not any(m.role == "elastic" for m in spec.members):
        raise ConfigError("members", "a suite needs one member with role: elastic")
    _check_specialists(spec.members)
    for run in runs(spec):
        cfg = run_config(spec, run)  # fail now, not after hours of training the previous members
        _check_eval_points(spec, cfg)
    return spec


def _check_specialists(members: list[MemberSpec]) -> None:
    """Each elastic member's specialists are specialists of the suite, one per k."""
    known = sorted(m.name for m in members if m.role == "specialist" and specialist_k(m) is not None)
    for i, m in enumerate(members):
        if m.specialists is None:
            continue
        if m.role != "elastic":
            raise ConfigError(f"members[{i}].specialists", f"{m.name!r} has role {m.role}; only an elastic "
                              "member names the specialists its tax is measured against")
        for j, name in enumerate(m.specialists):
            if name not in known:
                raise ConfigError(f"members[{i}].specialists[{j}]", f"{name!r} is not a specialist of this "
                                  f"suite (role: specialist, strategy fixed, one k); specialists: {known}")
    for i, m in enumerate(members):
        if m.role == "elastic":
            ks = sorted(specialists_of(members, m).values())
            twice = sorted({k for k in ks if ks.count(k) > 1})
            if twice:
                where = f"members[{i}].specialists" if m.specialists is not None else "members"
                raise ConfigError(where, f"{m.name!r} would be measured against two specialists at k = "
                                  f"{twice}; name its own (specialists: [...]) so that each k has one")


def specialists_of(members: list[MemberSpec], elastic: MemberSpec) -> dict[str, int]:
    """The specialists an elastic member's tax is measured against (name -> the k it trains at):
    those it names, else every specialist that no member names, in suite order."""
    claimed = {name for m in members for name in (m.specialists or [])}
    names = elastic.specialists if elastic.specialists is not None else [
        m.name for m in members if m.role == "specialist" and m.name not in claimed]
    by_name = {m.name: m for m in members}
    return {name: specialist_k(by_name[name]) for name in names
            if name in by_name and specialist_k(by_name[name]) is not None}


def _check_eval_points(spec: SuiteSpec, cfg: ExperimentConfig) -> None:
    """Widths and per-layer vectors that the members' experts cannot run fail at load."""
    from mmoe_megatron.config.derive import expert_columns
    from mmoe_megatron.evaluation.core import parse_spec, split_spec

    for i, w in enumerate(spec.eval.widths):
        try:
            expert_columns(cfg, w)
        except ValueError as e:
            raise ConfigError(f"eval.widths[{i}]", str(e)) from None
    if spec.eval.budgets:
        from mmoe_megatron.evaluation.budget_grid import check_budget

        grid = budget_grid_of(spec, cfg)
        for i, flops in enumerate(spec.eval.budgets):
            try:
                check_budget(cfg, _vocab_size(cfg), flops, grid, f"{flops:.6g}")
            except ValueError as e:
                raise ConfigError(f"eval.budgets[{i}]", str(e)) from None
    for i, text in enumerate(spec.eval.points):
        k, width = split_spec(parse_spec(text))
        for what, value in (("k", k), ("width", width)):
            if isinstance(value, list) and len(value) != cfg.num_moe_layers:
                raise ConfigError(f"eval.points[{i}]", f"{text!r}: a per-layer {what} vector needs "
                                                      f"{cfg.num_moe_layers} entries (one per MoE layer)")
        try:
            expert_columns(cfg, width)
        except ValueError as e:
            raise ConfigError(f"eval.points[{i}]", str(e)) from None


def budget_grid_of(spec: SuiteSpec, cfg: ExperimentConfig):
    from mmoe_megatron.evaluation.budget_grid import Grid

    return Grid(spec.eval.budget_ks or spec.eval.ks, sorted(set(spec.eval.widths) | {1.0}),
                cfg.moe.expert_ffn_hidden_size)


def _repo_root(suite_path: str) -> str:
    """Relative `base` paths are relative to the working directory if they exist there, else to
    the directory holding the suite's configs/ folder."""
    here = os.path.dirname(os.path.abspath(suite_path))
    while here != os.path.dirname(here):
        if os.path.isdir(os.path.join(here, "configs")):
            return here
        here = os.path.dirname(here)
    return os.getcwd()


def runs(spec: SuiteSpec, member: Optional[MemberSpec] = None) -> list[Run]:
    members = [member] if member is not None else spec.members
    return [Run(m, s) for m in members for s in (spec.seeds or [None])]


def member_dir(spec: SuiteSpec, member: MemberSpec, seed: Optional[int] = None) -> str:
    path = os.path.join(spec.runs_dir, spec.name, member.name)
    return path if seed is None else os.path.join(path, f"seed{seed}")


def run_dir(spec: SuiteSpec, run: Run) -> str:
    return member_dir(spec, run.member, run.seed)


def _base_overrides(spec: SuiteSpec, member: MemberSpec, seed: Optional[int]) -> list[tuple[str, object]]:
    out = list(spec.overrides.items()) + list(member.overrides.items())
    if seed is not None:
        out.append(("train.seed", seed))
    return out + [("name", f"{spec.name}-{member.name}" + ("" if seed is None else f"-s{seed}")),
                  ("logging.dir", member_dir(spec, member, seed))]


def member_overrides(spec: SuiteSpec, member: MemberSpec, seed: Optional[int] = None) -> list[tuple[str, object]]:
    """Everything a run sets on top of the base config: the suite's and the member's overrides,
    the seed, the steps that give equal compute, and the checkpoints kept for evaluation."""
    out = _base_overrides(spec, member, seed)
    if member.equal_compute_to is not None:
        reference = next(m for m in spec.members if m.name == member.equal_compute_to)
        ref_cfg = load_config(spec.base, _base_overrides(spec, reference, seed))
        cfg = load_config(spec.base, out)
        vocab = _vocab_size(cfg)
        per_step = training_flops(cfg, vocab) / cfg.train.train_iters
        out.append(("train.train_iters", max(1, int(training_flops(ref_cfg, vocab) // per_step))))
    iters = load_config(spec.base, out).train.train_iters
    keep = sorted({max(1, round(f * iters)) for f in spec.eval.fractions if f < 1})
    if keep:
        out.append(("checkpoint.keep_steps", keep))
    return out


def member_config(spec: SuiteSpec, member: MemberSpec, seed: Optional[int] = None) -> ExperimentConfig:
    return load_config(spec.base, member_overrides(spec, member, seed))


def run_config(spec: SuiteSpec, run: Run) -> ExperimentConfig:
    return member_config(spec, run.member, run.seed)


def _what_trains(cfg: ExperimentConfig) -> dict:
    """The config as training sees it: without the run's name and directory, with the seeds that
    default to train.seed resolved."""
    from mmoe_megatron.config.base import to_dict

    out = to_dict(cfg)
    out.pop("name", None)
    out["logging"].pop("dir", None)
    out["data"]["seed"] = cfg.data_seed
    out["matryoshka"]["seed"] = cfg.k_seed
    out["model"]["init_seed"] = cfg.init_seed
    return out


def shared_run(spec: SuiteSpec, run: Run) -> Optional[Run]:
    """The run of `run.member.same_runs_as` at the same seed when it trains exactly what `run`
    would (`_what_trains`), else None."""
    name = run.member.same_runs_as
    if name is None:
        return None
    other = Run(next(m for m in spec.members if m.name == name), run.seed)
    return other if _what_trains(run_config(spec, run)) == _what_trains(run_config(spec, other)) else None


def is_second_name(member: MemberSpec, members) -> bool:
    """Whether `member` is another member under a second name: it shares that member's runs
    (`same_runs_as`) and sets what it sets, so that member's run is its run at every seed (e.g.
    one model read against another set of specialists)."""
    other = next((m for m in members if m.name == getattr(member, "same_runs_as", None)), None)
    return other is not None and other.overrides == member.overrides and \
        getattr(other, "equal_compute_to", None) == getattr(member, "equal_compute_to", None)


def with_shared_runs(spec: SuiteSpec, records: list[dict]) -> list[dict]:
    """`records` plus, for each run missing from them whose training another member's run shares
    (`shared_run`), that run's record under this member's name, marked `same_run_as` (the run that
    trained it). A member shares with one listed before it, so a chain of them (c's run is b's,
    which is a's) resolves in the members' order."""
    by_run = {(r["member"], r.get("seed")): r for r in records}
    out = list(records)
    for run in runs(spec):
        if (run.member.name, run.seed) in by_run:
            continue
        other = shared_run(spec, run)
        if other is not None and (other.member.name, other.seed) in by_run:
            source = by_run[(other.member.name, other.seed)]
            record = {**source, "member": run.member.name, "role": run.member.role,
                      "same_run_as": source.get("same_run_as", other.label)}
            by_run[(run.member.name, run.seed)] = record
            out.append(record)
    return out


def own_runs(spec: SuiteSpec, chosen: list[Run]) -> list[Run]:
    """`chosen` without the runs another member's run stands for (`shared_run`), each named."""
    out = []
    for run in chosen:
        other = shared_run(spec, run)
        if other is None:
            out.append(run)
        else:
            print(f"{run.label} trains exactly what {other.label} trains (same_runs_as): that run is "
                  "used, not trained again", flush=True)
    return out


def select(spec: SuiteSpec, which: Optional[str], seed: Optional[int] = None) -> list[Run]:
    """The runs named by `--member` (a name, or an index into all runs) and `--seed`."""
    all_runs = runs(spec)
    if which is not None and which.isdigit():
        index = int(which)
        if index >= len(all_runs):
            raise ConfigError("member", f"index {index} out of range (suite has {len(all_runs)} runs)")
        chosen = [all_runs[index]]
    elif which is not None:
        chosen = [r for r in all_runs if r.member.name == which]
        if not chosen:
            raise ConfigError("member", f"no member {which!r}; members: {[m.name for m in spec.members]}")
    else:
        chosen = all_runs
    if seed is not None:
        chosen = [r for r in chosen if r.seed == seed]
        if not chosen:
            raise ConfigError("seed", f"no run with seed {seed}; the suite's seeds are {spec.seeds}")
    return chosen


def _vocab_size(cfg: ExperimentConfig) -> int:
    from mmoe_megatron.data import resolve_vocab_size

    return resolve_vocab_size(cfg)


def training_flops(cfg: ExperimentConfig, vocab_size: int) -> float:
    """Training FLOPs of a run: 3 x forward FLOPs at its expected (k, width) (sample plan
    included), plus one forward at k_max and full width per token for a self-distillation teacher,
    times tokens trained."""
    from mmoe_megatron.config.derive import flops_per_token
    from mmoe_megatron.schedule import KSchedule, WidthSchedule, grid_probs

    gbs = cfg.train.global_batch_size
    schedule = KSchedule.from_config(cfg.matryoshka, cfg.k_seed, gbs, cfg.train.train_iters)
    widths = WidthSchedule.from_config(cfg.matryoshka, cfg.k_seed, gbs)
    per_token = 3.0 * sum(p * flops_per_token(cfg, vocab_size, k, None if w == 1.0 else w)
                          for (k, w), p in grid_probs(schedule, widths).items())
    if cfg.matryoshka.distill_coeff > 0:
        per_token += flops_per_token(cfg, vocab_size, schedule.k_max)
    tokens = cfg.train.train_iters * cfg.train.global_batch_size * cfg.data.seq_length
    return per_token * tokens


RESULT_PATHS = ("bench/results", "RESULTS.md")
"""Tracked files that benchmarks rewrite: changes to them do not make the code version dirty."""


def code_version(root: str) -> str:
    """The commit checked out at `root` (any directory of the checkout; 12 hex digits), with
    "+dirty" when a tracked file other than the results (`RESULT_PATHS`) differs from it; "unknown"
    outside a git checkout."""
    git = ["git", "-C", root]
    try:
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", ":(top)"]
                                 + [f":(top,exclude){p}" for p in RESULT_PATHS],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit[:12] + ("+dirty" if changed else "")


MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile")
"""CPU flags a launch records: the units the math libraries may pick kernels (and blockings) by."""


def _cpuinfo() -> dict:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def provenance() -> dict:
    """The code version and machine of a launch (results of different ones are told apart): the
    GPU where there is one, and the CPU. The CPU's model name can be the same on machines whose
    vector units differ, and torch's kernels (hence a run's rounding, and after many steps its
    losses) differ with them: `cpu_capability` is the instruction set torch dispatches to (e.g.
    AVX2, AVX512). Two launches on machines named "Intel(R) Xeon(R) Processor" with AVX512 have
    trained the same run to different weights, so the CPU's family, model and stepping (`cpu_id`)
    and its matmul units (`cpu_flags`) are kept too, and the thread count the training processes
    inherit (`omp_num_threads`; absent: torchrun's default, one per process when it starts several,
    else all cores), which changes a run's numbers as well (bench/run_numerics.py)."""
    import torch

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    info = _cpuinfo()
    out = {"code_version": code_version(root), "cpu": info.get("model name") or platform.processor(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if "model" in info:
        out["cpu_id"] = f"family {info.get('cpu family', '?')} model {info['model']} stepping {info.get('stepping', '?')}"
        out["cpu_flags"] = [f for f in MATMUL_FLAGS if f in info.get("flags", "").split()]
    if os.environ.get("OMP_NUM_THREADS"):
        out["omp_num_threads"] = os.environ["OMP_NUM_THREADS"]
    if torch.cuda.is_available():  # runs train there: the GPU is what tells their rounding apart
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def train_run(spec: SuiteSpec, run: Run, launcher: str) -> int:
    """Train one run with the user-facing entry point (resumes if it was interrupted)."""
    out = run_dir(spec, run)
    os.makedirs(out, exist_ok=True)
    launches = os.path.join(out, "launches.jsonl")
    with open(launches, "a") as f:
        f.write(json.dumps(provenance()) + "\n")
    args = override_args(member_overrides(spec, run.member, run.seed))
    cmd = shlex.split(launcher) + ["-m", "mmoe_megatron.train", "--config", spec.base] + args
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.call(cmd)


# --- evaluation ---------------------------------------------------------------------------------


def eval_settings(spec: SuiteSpec) -> dict:
    """What an evaluation depends on besides the weights (a changed value re-evaluates)."""
    settings = {"ks": spec.eval.ks, "layer_ks": spec.eval.layer_ks, "num_samples": spec.eval.num_samples,
                "fractions": spec.eval.fractions, "curve_ks": spec.eval.curve_ks, "data_seed": spec.eval.data_seed,
                "heldout": [asdict(h) for h in spec.eval.heldout]}
    # Only when used, so that suites without widths keep their evaluations.
    settings.update({name: getattr(spec.eval, name) for name in ("widths", "points") if getattr(spec.eval, name)})
    return settings


def domains(spec: SuiteSpec) -> list[tuple[str, list[tuple[str, object]]]]:
    """(name, config overrides) of every evaluation domain: the validation split, then held-out."""
    seed = [] if spec.eval.data_seed is None else [("data.seed", spec.eval.data_seed)]
    out = [(VALID, seed)]
    for h in spec.eval.heldout:
        out.append((h.name, seed + [("data.valid_blend", [{"prefix": h.prefix, "weight": 1.0}])]))
    return out


def _evaluated(path: str, settings: dict) -> bool:
    try:
        with open(path) as f:
            return json.load(f).get("eval_settings") == settings
    except (OSError, ValueError):
        return False


def evaluate_runs(spec: SuiteSpec, chosen: list[Run], force: bool = False) -> None:
    """Evaluate runs at every k, at each kept checkpoint, on every domain (collective under a
    launcher). Writes <run>/eval/results.json (everything) and eval.{json,md,png} (the last
    checkpoint on the validation split, with the expert-ranking analysis)."""
    import torch.distributed as dist

    from mmoe_megatron import distributed
    from mmoe_megatron.evaluation.report import write_report
    from mmoe_megatron.evaluation.run import evaluate_checkpoint, run_config as saved_config
    from mmoe_megatron.export.qwen3_moe import gate_gains, gate_temperatures, rank_gates
    from mmoe_megatron.training.checkpoint import complete_checkpoints, load_global_state_dict, tag_for

    ks = spec.eval.specs()
    settings = eval_settings(spec)
    todo = [r for r in chosen if force or not _evaluated(os.path.join(run_dir(spec, r), "eval", "results.json"), settings)]
    if not todo:
        return
    distributed.init_distributed(saved_config(run_dir(spec, todo[0])))
    try:
        for run in todo:
            out = run_dir(spec, run)
            cfg = saved_config(out)
            iters = cfg.train.train_iters
            steps = sorted({max(1, round(f * iters)) for f in spec.eval.fractions})
            available = set(complete_checkpoints(cfg.checkpoint_dir))
            missing = [s for s in steps if tag_for(s) not in available]
            if missing:
                raise FileNotFoundError(
                    f"{run.label}: no complete checkpoint for step(s) {missing} in {cfg.checkpoint_dir}; "
                    "train the run (suite train) before evaluating it")
            results: dict[str, dict[str, dict[str, float]]] = {}
            final_points = analysis = None
            for step in steps:
                checkpoint = os.path.join(cfg.checkpoint_dir, tag_for(step))
                results[str(step)] = {}
                for domain, overrides in domains(spec):
                    dcfg = saved_config(out, overrides)
                    last = step == steps[-1] and domain == VALID
                    at = ks if step == steps[-1] or spec.eval.curve_ks is None else list(spec.eval.curve_ks)
                    points, summary = evaluate_checkpoint(dcfg, checkpoint, at, spec.eval.num_samples,
                                                          analysis=last)
                    results[str(step)][domain] = {p.label: p.loss for p in points}
                    if last:
                        final_points, analysis = points, summary
            if dist.get_rank() == 0:
                meta = {"checkpoint": os.path.join(cfg.checkpoint_dir, tag_for(steps[-1])),
                        "role": run.member.role, "seed": run.seed,
                        "training_flops": training_flops(cfg, _vocab_size(cfg))}
                write_report(final_points, os.path.join(out, "eval"), run.member.name, meta, analysis)
                record = {
                    "suite": spec.name, "member": run.member.name, "role": run.member.role,
                    "seed": run.seed, "trained_k": specialist_k(run.member),
                    "trained_ks": list(cfg.matryoshka.ks),
                    "train_iters": iters, "training_flops": meta["training_flops"],
                    "trained_widths": list(cfg.matryoshka.widths),
                    "flops_per_token": {p.label: p.flops_per_token for p in final_points},
                    "active_params": {p.label: p.active_params for p in final_points},
                    "losses": results, "eval_settings": settings, "launches": launches(out),
                    "evaluated": provenance(),
                }
                mat = cfg.matryoshka
                if mat.gate_temperature == "learned" or mat.gate_gain != "none" or mat.rank_gate != "none":
                    weights = load_global_state_dict(meta["checkpoint"])
                    if mat.gate_temperature == "learned":
                        record["learned_temperatures"] = gate_temperatures(cfg, weights)
                    if mat.gate_gain != "none":
                        record["learned_gains"] = gate_gains(cfg, weights)
                    if mat.rank_gate != "none":
                        record["learned_rank_gates"] = rank_gates(cfg, weights)
                with open(os.path.join(out, "eval", "results.json"), "w") as f:
                    json.dump(record, f, indent=2)
                print(f"evaluated {run.label}", flush=True)
    finally:
        distributed.shutdown()


def launches(out: str) -> list[dict]:
    """The provenance of each launch of the run in `out` (`provenance`), oldest first."""
    path = os.path.join(out, "launches.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def specialist_k(member: MemberSpec) -> Optional[int]:
    """The k a specialist or standard member trains at (one k in its overrides), else None."""
    ks = member.overrides.get("matryoshka.ks")
    fixed = member.overrides.get("matryoshka.strategy") == "fixed"
    return ks[0] if fixed and isinstance(ks, list) and len(ks) == 1 else None


def load_results(spec: SuiteSpec, results_dir: Optional[str] = None) -> list[dict]:
    """results.json of every evaluated run, from the runs directory or from `results_dir` (where
    `bench.suite_bench` keeps a copy per run), with the runs members share (`with_shared_runs`);
    runs not evaluated yet are left out."""
    found = []
    for run in runs(spec):
        if results_dir is not None:
            path = os.path.join(results_dir, result_file_name(run))
        else:
            path = os.path.join(run_dir(spec, run), "eval", "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                found.append(json.load(f))
    return with_shared_runs(spec, found)


def result_file_name(run: Run) -> str:
    return f"{run.member.name}.json" if run.seed is None else f"{run.member.name}-s{run.seed}.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train, evaluate and compare a suite of models.")
    parser.add_argument("command", choices=["train", "evaluate", "report", "run"])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--member", default=None, help="only this member (name), or run (index)")
    parser.add_argument("--seed", type=int, default=None, help="only the runs of this seed")
    parser.add_argument("--force", action="store_true", help="evaluate again runs already evaluated")
    parser.add_argument("--launcher", default=f"{sys.executable} -m torch.distributed.run --nproc-per-node 1",
                        help="command that starts the training processes")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    spec = load_suite(args.suite)
    chosen = own_runs(spec, select(spec, args.member, args.seed))
    if args.command in ("train", "run"):
        for run in chosen:
            code = train_run(spec, run, args.launcher)
            if code == EXIT_PREEMPTED:
                print(f"training {run.label} stopped on a signal after a checkpoint (exit code "
                      f"{code}); run the same command again to resume it", file=sys.stderr)
                return code
            if code != 0:
                print(f"training {run.label} failed with exit code {code}", file=sys.stderr)
                return code
    if args.command in ("evaluate", "run"):
        evaluate_runs(spec, chosen, force=args.force)
    if args.command in ("report", "run"):
        from mmoe_megatron.evaluation.compare import write_comparison

        paths = write_comparison(spec)
        print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
