"""The GPU check run on CPU (its logic on a tiny local-spec model), and the wheels it travels with."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """`python -m bench.gpu_check` on CPU with deliberate faults: the bf16 candidate routes one k
    too many at k = 2 and runs every token one width narrower at the mixed (k, width) draw, and the
    stock-router run at k = 2 raises."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--mode", "cpu", "--steps", "3", "--warmup", "1",
         "--fault", "parity", "--fault", "train", "--results-dir", str(out), "--budget-s", "3600"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    path = out / "gpu_check_cpu.json"
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


@pytest.mark.slow
def test_every_failure_is_reported_and_the_other_checks_still_run(faulty_run):
    proc, record = faulty_run
    data = record["data"]
    status = {c["name"]: c["status"] for c in data["checks"]}
    assert proc.returncode == 1
    assert data["mode"] == "cpu" and data["passed"] is False

    # Parity: only the corrupted cases are outside the tolerance; the slimmable experts' cases
    # (one narrower width, a k and a width per token) are compared like the ks.
    assert status["parity:local bf16"] == "fail"
    within = {r["case"]: r["passed"] for r in data["parity"]}
    assert within == {"1": True, "2": False, "4": True, "8": True, "per-token": True,
                      "2 @ width 0.5": True, "per-token k and width": False}
    for case in ("2", "per-token k and width"):
        broken = next(r for r in data["parity"] if r["case"] == case)
        assert broken["token_loss_diff"] > data["tolerances"]["token_loss_rel"] * broken["token_loss_spread"]
    # Judged with every layer routed to the reference's experts (route replay), so an extra expert
    # is still caught; the candidate's own routing is reported beside, with the share of tokens it
    # ranks alike in each MoE layer. Where it ranked every token alike, replay changes nothing.
    for r in data["parity"]:
        assert len(r["routes_identical"]) == 2 and all(0 <= x <= 1 for x in r["routes_identical"])
        if all(x == 1.0 for x in r["routes_identical"]):
            assert r["token_loss_diff"] == r["own_routing"]["token_loss_diff"]
    assert not next(r for r in data["parity"] if r["case"] == "2")["own_routing"]["passed"]
    detail = next(c["detail"] for c in data["checks"] if c["name"] == "parity:local bf16")
    assert "k = 2 (" in detail and "per-token k and width (" in detail
    # The narrower widths change the model: their losses are not the full-width ones.
    loss = {r["case"]: r["reference_loss"] for r in data["parity"]}
    assert loss["2 @ width 0.5"] != loss["2"] and loss["per-token k and width"] != loss["per-token"]

    # The failing run is an error with its reason; every other run went on and was measured.
    assert status["train:stock k=2"] == "error"
    assert "deliberate fault" in next(c["detail"] for c in data["checks"] if c["name"] == "train:stock k=2")
    measured = {r["variant"]: r for r in data["training"]}
    assert set(measured) == {"matryoshka k=1", "stock k=1", "matryoshka k=2", "matryoshka k=4", "stock k=4",
                             "matryoshka k=8", "stock k=8", "elastic per-token k in [2, 4, 6]"}
    for name, row in measured.items():
        assert status[f"train:{name}"] == "pass"
        assert row["tokens_per_s"] > 0 and row["tokens_per_s"] * row["step_s_median"] == pytest.approx(row["tokens_per_step"])
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # not meaningful on CPU
    # More experts per token cost more FLOPs; the elastic run is priced at its mean k (4).
    assert measured["matryoshka k=8"]["train_flops_per_token"] > measured["matryoshka k=1"]["train_flops_per_token"]
    assert measured["elastic per-token k in [2, 4, 6]"]["train_flops_per_token"] == \
        measured["matryoshka k=4"]["train_flops_per_token"]

    # Verdicts: both routers start from the same loss where both ran; the missing pair fails it;
    # timings on CPU are reported, not judged.
    first = next(c for c in data["checks"] if c["name"].startswith("verdict:first-step"))
    assert first["status"] == "fail" and "no pair at k = [2]" in first["detail"]
    assert all(d <= data["tolerances"]["first_loss"] for d in first["data"]["diffs"].values())
    assert status["verdict:router overhead"] == "info" and status["verdict:elastic vs fixed k"] == "info"

    # Printed at the end, every one of them.
    tail = proc.stdout[proc.stdout.rindex("GPU check FAILED"):]
    for name in ("parity:local bf16", "train:stock k=2", "verdict:first-step loss"):
        assert f"FAILED {name}" in tail


@pytest.mark.slow
def test_the_report_says_what_was_measured(faulty_run):
    _, record = faulty_run
    md, env = record["markdown"], record["data"]["environment"]
    assert env["transformer_engine"] is False and env["grouped_gemm"] is False
    assert "Transformer Engine is not installed here" in md and "the local megatron-core layer spec" in md
    assert "| local bf16 | 2 |" in md and "**no**" in md
    assert "routed to the experts the reference chose (route replay)" in md and "own routing" in md
    assert "**Verdict: FAILED**" in md


def test_wheel_pins_follow_pyproject():
    from tools import gpu_wheels

    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert f'"{gpu_wheels.pinned("megatron-core", "3.12")}; python_version >= \'3.12\'"' in text
    assert f'"{gpu_wheels.pinned("megatron-core", "3.11")}; python_version < \'3.12\'"' in text
    assert gpu_wheels.pinned("megatron-core", "3.12") != gpu_wheels.pinned("megatron-core", "3.11")
    assert f'"{gpu_wheels.pinned("deepspeed")}"' in text


def _wheel(folder, name: str, module_text: str) -> str:
    path = os.path.join(folder, f"{name}-1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", module_text)
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return path


def test_carried_wheels_install_beside_the_machine_packages_and_damage_is_refused(tmp_path):
    from tools import gpu_wheels

    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    path = _wheel(str(wheels), "carried_pkg", "VALUE = 42\n")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    (wheels / "manifest.json").write_text(json.dumps(
        {"total_bytes": os.path.getsize(path), "files": {os.path.basename(path): {"bytes": 1, "sha256": digest}}}))
    assert gpu_wheels.install(str(wheels), str(target)) == 0
    out = subprocess.run([sys.executable, "-c", "import carried_pkg; print(carried_pkg.VALUE)"],
                         env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr

    with open(path, "ab") as f:
        f.write(b"x")
    assert gpu_wheels.install(str(wheels), str(tmp_path / "other")) == 1
    assert not (tmp_path / "other").exists()
    assert gpu_wheels.install(str(tmp_path / "nowhere"), str(target)) == 1


def test_a_spent_time_budget_skips_the_measurements_and_fails_the_check(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--mode", "cpu", "--budget-s", "0", "--results-dir", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_check_cpu.json").read_text())["data"]
    status = {c["name"]: c["status"] for c in data["checks"]}
    measurements = [n for n in status if n.startswith(("parity:", "train:"))]
    assert len(measurements) == 10 and all(status[n] == "skipped" for n in measurements)
    assert status["verdict:router overhead"] == "error" and data["training"] == []
    assert "FAILED train:elastic per-token k in [2, 4, 6]: time budget of 0 s spent" in proc.stdout


def test_a_group_is_timed_in_turns_and_a_failed_build_leaves_the_others_measured(monkeypatch):
    from bench import gpu_check_runs as runs

    setup = runs.Setup(mode="cpu", device=None, run_dir="unused", steps=12, warmup=2, peak_flops=None)
    variants = [runs.Variant("a", 1, {}), runs.Variant("b", 1, {}), runs.Variant("c", 1, {})]
    order = []

    def build(setup, variant, backend):
        if variant.name == "b":
            raise RuntimeError("b does not build")
        return runs._Run(variant, None, object(), 0.0, 0)

    def steps(setup, run, block, timed):
        order.append((run.variant.name, list(block), timed))
        run.times += [1.0] * len(block) if timed else []
        run.losses += [2.0] * len(block)

    monkeypatch.setattr(runs, "_build", build)
    monkeypatch.setattr(runs, "_steps", steps)
    monkeypatch.setattr(runs, "_row", lambda setup, run: {"times": list(run.times)})
    out = runs.train_group(setup, variants, {})
    assert isinstance(out["b"], RuntimeError) and out["a"] == out["c"] == {"times": [1.0] * 10}
    # Warm-up first, untimed; then blocks of 5 timed steps, the order rotating each round.
    assert order == [("a", [0, 1], False), ("c", [0, 1], False),
                     ("a", [2, 3, 4, 5, 6], True), ("c", [2, 3, 4, 5, 6], True),
                     ("c", [7, 8, 9, 10, 11], True), ("a", [7, 8, 9, 10, 11], True)]
    assert [[v.name for v in g] for g in runs.timing_groups(runs.training_variants())] == [
        ["matryoshka k=1", "stock k=1"], ["matryoshka k=2", "stock k=2"],
        ["matryoshka k=4", "stock k=4", "elastic per-token k in [2, 4, 6]"], ["matryoshka k=8", "stock k=8"]]
