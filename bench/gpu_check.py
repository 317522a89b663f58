"""The GPU check: one command on one GPU that says whether the project works there and how fast.

    python -m bench.gpu_check                  (or `make gpu-check`, which also updates RESULTS.md)

On CUDA (under 8 minutes on an H100/H200), a list of named checks, each run whatever the others
did, each failure printed:
  environment      versions; whether Transformer Engine and grouped GEMM are there
  parity:<spec>    the loss of every token at k = 1, 2, 4, 8 and with per-token ks, then with
                   slimmable experts at one narrower width and at a mixed draw of a k and a
                   width per token, in bf16, against the local layer spec in fp32, routed
                   to the experts the fp32 reference chose (free-routing differences reported)
                   (bench/gpu_check_runs.py); with Transformer Engine the candidates include its
                   grouped-GEMM experts, so this is the grouped slimmable path's parity check
  train:<variant>  ~30 bf16 steps of a model of 135-400 M active parameters at fixed k (the
                   Matryoshka router and megatron-core's stock router) and with per-token ks:
                   tokens/s, MFU (3 x the project's forward FLOPs per token, config/derive.py,
                   against --peak-tflops), peak memory. The runs a verdict compares (both
                   routers at one k; at k = 4 also per-token ks) are built together and timed
                   in turns of 5 steps, so that a slow spell of the host hits them alike
  verdict:*        router overhead (Matryoshka / stock step time at each k, goal <= 1.02),
                   elastic per-token ks against the fixed k at their mean (goal <= 1.05), and
                   the first-step loss of both routers at the same k
Without Transformer Engine the model is the local layer spec on CUDA, and the verdict says so.
Results: bench/results/gpu_check.json (bench.common.write_result); `python -m bench.make_results`
puts them in RESULTS.md. Exit status 1 when any check failed.

On CPU the same checks run on a tiny model so that the check itself is tested; its timings are
not judged, and it writes to runs/gpu_check/ rather than bench/results/ unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bench import gpu_check_runs as runs
from bench.common import RESULTS, ROOT, single_process, write_result

ROUTER_OVERHEAD_GOAL = 1.02
ELASTIC_GOAL = 1.05
H100_H200_BF16_PEAK_TFLOPS = 790.0
"""Measured dense bf16 matmul rate of an H200 (8192^3, 770-890 TFLOP/s); see --peak-tflops."""


@dataclass
class Check:
    """One named check. `run` returns (passed, detail, data); it may raise (an error)."""

    name: str
    run: Callable[[], tuple]
    judged: bool = True
    """False for checks whose outcome is reported but cannot fail (timings on CPU)."""


@dataclass
class Outcome:
    name: str
    status: str
    """pass, fail, error (it raised), info (not judged) or skipped (time budget)."""
    detail: str
    seconds: float
    data: Optional[dict] = None


class GpuCheck:
    def __init__(self, setup: runs.Setup, budget_s: float):
        self.setup = setup
        self.budget_s = budget_s
        self.start = time.time()
        self.env: dict = {}
        self.parity: list[dict] = []
        self._timed: dict = {}
        """Rows (or the exception) of the training runs timed so far, by variant name."""
        self.training: dict[str, dict] = {}
        self.outcomes: list[Outcome] = []

    @property
    def backend(self) -> dict:
        """Layer spec of the training runs: Transformer Engine (with grouped GEMM) when present."""
        if self.setup.mode == "gpu" and self.env.get("transformer_engine"):
            return {"model.backend": "transformer_engine", "moe.grouped_gemm": bool(self.env["grouped_gemm"])}
        return {"model.backend": "local"}

    # --- the list of checks -------------------------------------------------------------------

    def checks(self) -> list[Check]:
        """Every check, in order. Later checks read what earlier ones recorded."""
        out = [Check("environment", self.check_environment)]
        for name, overrides in runs.parity_candidates(self.setup, self.env):
            out.append(Check(f"parity:{name}", lambda n=name, o=overrides: self.check_parity(n, o)))
        for variant in runs.training_variants():
            out.append(Check(f"train:{variant.name}", lambda v=variant: self.check_training(v)))
        timed = self.setup.mode == "gpu"
        out += [Check("verdict:first-step loss, Matryoshka vs stock router", self.verdict_first_loss),
                Check("verdict:router overhead", self.verdict_router_overhead, judged=timed),
                Check("verdict:elastic vs fixed k", self.verdict_elastic, judged=timed)]
        return out

    def run(self) -> None:
        self.check_environment()  # the candidate list depends on it; recorded again below
        for check in self.checks():
            begin = time.time()
            measured = check.name.startswith("train:") and check.name[len("train:"):] in self._timed
            if begin - self.start > self.budget_s and not check.name.startswith("verdict:") and not measured:
                self._record(Outcome(check.name, "skipped", f"time budget of {self.budget_s:.0f} s spent", 0.0))
                continue
            try:
                passed, detail, data = check.run()
                status = ("pass" if passed else "fail") if check.judged else "info"
            except Exception as e:  # noqa: BLE001 - every check runs, whatever the others did
                status, detail, data = "error", f"{type(e).__name__}: {e}", {
                    "traceback": traceback.format_exc(limit=8)}
            self._record(Outcome(check.name, status, detail, time.time() - begin, data))

    def _record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        print(f"[{outcome.status:>7}] {outcome.name} ({outcome.seconds:.1f} s): {outcome.detail}", flush=True)
        if outcome.status == "error" and outcome.data:
            print(outcome.data["traceback"], flush=True)
        os.makedirs(self.setup.run_dir, exist_ok=True)
        with open(os.path.join(self.setup.run_dir, "progress.json"), "w") as f:
            json.dump(self.data(), f, indent=2)

    # --- checks -------------------------------------------------------------------------------

    def check_environment(self):
        self.env = runs.environment()
        te = "Transformer Engine present" if self.env["transformer_engine"] else (
            "Transformer Engine missing: the local layer spec is measured" + (" on CUDA" if self.setup.mode == "gpu" else ""))
        detail = (f"{self.env['device']}, torch {self.env['torch']}, megatron-core {self.env['megatron_core']}, "
                  f"DeepSpeed {self.env['deepspeed']}; {te}; grouped GEMM {self.env['grouped_gemm_note']}")
        return not str(self.env["deepspeed"]).startswith("missing"), detail, dict(self.env)

    def check_parity(self, name: str, overrides: dict):
        corrupt = (2, runs.MIXED_CASE) if "parity" in self.setup.fault else ()
        reference = runs.parity_losses(self.setup, {"model.backend": "local"}, torch.float32)
        candidate = runs.parity_losses(self.setup, overrides, torch.bfloat16, corrupt_cases=corrupt,
                                       routes=reference["routes"])
        rows = []
        for case, losses in reference["losses"].items():
            # Judged with the reference's experts: the layers' arithmetic. With its own routing a
            # bf16 model flips near-tied rankings, and the flips compound over the layers and
            # through attention (reported, not judged: `own_routing`, `routes_identical`).
            replayed = runs.compare_losses(losses, candidate["replayed"][case])
            own = runs.compare_losses(losses, candidate["losses"][case])
            row = {"candidate": name, "case": case, **replayed,
                   "own_routing": {k: own[k] for k in ("candidate_loss", "mean_loss_diff", "token_loss_diff",
                                                       "mean_rel", "token_rel", "passed")},
                   "routes_identical": runs.routes_identical(reference["routes"][case], candidate["routes"][case])}
            rows.append(row)
            self.parity.append(row)
        bad = [f"{'k = ' if r['case'].isdigit() else ''}{r['case']} (mean {r['mean_rel']:.1%}, per token {r['token_rel']:.1%} of the spread)"
               for r in rows if not r["passed"]]
        detail = (f"all {len(rows)} cases within tolerance" if not bad
                  else "outside tolerance at " + ", ".join(bad))
        return not bad, detail, {"rows": rows}

    def check_training(self, variant: runs.Variant):
        if variant.name not in self._timed:  # its group is timed together, at its first check
            group = next(g for g in runs.timing_groups(runs.training_variants()) if variant in g)
            self._timed.update(runs.train_group(self.setup, [v for v in group if v.name not in self._timed],
                                                self.backend))
        row = self._timed[variant.name]
        if isinstance(row, Exception):
            raise row
        self.training[variant.name] = row
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        memory = f", peak {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else ""
        detail = (f"{row['tokens_per_s']:,.0f} tokens/s{mfu}{memory}, step {row['step_s_median'] * 1e3:.1f} ms, "
                  f"loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}")
        return row["finite"], detail if row["finite"] else "non-finite loss; " + detail, row

    def _pairs(self, a: str, b: str, ks) -> list[tuple]:
        return [(k, self.training[a.format(k=k)], self.training[b.format(k=k)]) for k in ks
                if a.format(k=k) in self.training and b.format(k=k) in self.training]

    def verdict_first_loss(self):
        pairs = self._pairs("matryoshka k={k}", "stock k={k}", runs.FIXED_KS)
        if not pairs:
            raise RuntimeError("no pair of Matryoshka and stock runs finished")
        diffs = {k: abs(m["first_loss"] - s["first_loss"]) for k, m, s in pairs}
        bad = {k: d for k, d in diffs.items() if d > runs.FIRST_LOSS_TOL}
        missing = sorted(set(runs.FIXED_KS) - set(diffs))
        detail = ", ".join(f"k={k}: {d:.1e}" for k, d in diffs.items()) + f" (tolerance {runs.FIRST_LOSS_TOL})"
        if missing:
            detail += f"; no pair at k = {missing}"
        return not bad and not missing, detail, {"diffs": diffs}

    def verdict_router_overhead(self):
        pairs = self._pairs("matryoshka k={k}", "stock k={k}", runs.FIXED_KS)
        if not pairs:
            raise RuntimeError("no pair of Matryoshka and stock runs finished")
        ratios = {k: m["step_s_median"] / s["step_s_median"] for k, m, s in pairs}
        worst = max(ratios.values())
        detail = ", ".join(f"k={k}: {r:.3f}" for k, r in ratios.items()) + \
            f"; goal <= {ROUTER_OVERHEAD_GOAL} ({'met' if worst <= ROUTER_OVERHEAD_GOAL else 'missed'})"
        return worst <= ROUTER_OVERHEAD_GOAL and len(pairs) == len(runs.FIXED_KS), detail, {"ratios": ratios}

    def verdict_elastic(self):
        elastic = next((v for name, v in self.training.items() if name.startswith("elastic")), None)
        mean_k = int(sum(runs.ELASTIC_KS) / len(runs.ELASTIC_KS))
        fixed = self.training.get(f"matryoshka k={mean_k}")
        if elastic is None or fixed is None:
            raise RuntimeError(f"the elastic run or the fixed k={mean_k} run did not finish")
        ratio = elastic["step_s_median"] / fixed["step_s_median"]
        detail = (f"per-token ks {runs.ELASTIC_KS} vs fixed k={mean_k}: step time ratio {ratio:.3f}; "
                  f"goal <= {ELASTIC_GOAL} ({'met' if ratio <= ELASTIC_GOAL else 'missed'})")
        return ratio <= ELASTIC_GOAL, detail, {"ratio": ratio}

    # --- report -------------------------------------------------------------------------------

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("fail", "error", "skipped")]

    def data(self) -> dict:
        return {
            "mode": self.setup.mode, "environment": self.env, "steps": self.setup.steps,
            "warmup": self.setup.warmup, "peak_tflops": self.setup.peak_flops / 1e12 if self.setup.peak_flops else None,
            "tolerances": {"mean_loss_rel": runs.MEAN_LOSS_TOL, "token_loss_rel": runs.TOKEN_LOSS_TOL,
                           "first_loss": runs.FIRST_LOSS_TOL},
            "goals": {"router_overhead": ROUTER_OVERHEAD_GOAL, "elastic_vs_fixed": ELASTIC_GOAL},
            "checks": [o.__dict__ for o in self.outcomes],
            "parity": self.parity, "training": list(self.training.values()),
            "passed": not self.failures(), "elapsed_s": time.time() - self.start,
        }

    def markdown(self) -> str:
        from bench.gpu_check_report import markdown

        return markdown(self)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--mode", choices=["auto", "gpu", "cpu"], default="auto",
                   help="gpu needs CUDA; auto picks gpu when CUDA is present")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant (30 on GPU, 4 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (5 on GPU, 2 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=H100_H200_BF16_PEAK_TFLOPS,
                   help="dense bf16 peak of the GPU for MFU (default: H100/H200, 790)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="after this many seconds the remaining measurements are skipped (reported)")
    p.add_argument("--results-dir", default=None,
                   help="where gpu_check.json goes (default: bench/results on GPU, runs/gpu_check on CPU)")
    p.add_argument("--fault", action="append", default=[], choices=["parity", "train"],
                   help="make a check fail on purpose, to test the report (parity at k=2 and at the "
                        "mixed k and width draw; the stock k=2 run)")
    args = p.parse_args(argv)

    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if mode == "gpu" and not torch.cuda.is_available():
        p.error("--mode gpu needs a CUDA device; torch sees none")
    on_gpu = mode == "gpu"
    run_dir = os.path.join(ROOT, "runs", "gpu_check")
    setup = runs.Setup(
        mode=mode, device=torch.device("cuda" if on_gpu else "cpu"), run_dir=run_dir,
        steps=args.steps or (30 if on_gpu else 4), warmup=args.warmup if args.warmup is not None else (5 if on_gpu else 2),
        peak_flops=args.peak_tflops * 1e12 if on_gpu else None, fault=set(args.fault),
    )
    if setup.steps <= setup.warmup:
        p.error(f"--steps ({setup.steps}) must exceed --warmup ({setup.warmup})")
    single_process(setup.config("init", {}))
    check = GpuCheck(setup, args.budget_s)
    check.run()
    name = "gpu_check" if on_gpu else "gpu_check_cpu"
    title = "GPU check" if on_gpu else "GPU check, run on CPU (the check's own test; timings not judged)"
    write_result(name, title, check.markdown(), check.data(),
                 results_dir=args.results_dir or (RESULTS if on_gpu else run_dir))
    failures = check.failures()
    print(f"\nGPU check {'PASSED' if not failures else 'FAILED'}: {len(check.outcomes)} checks, "
          f"{len(failures)} failed, {time.time() - check.start:.0f} s")
    for o in failures:
        print(f"  FAILED {o.name}: {o.detail}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
