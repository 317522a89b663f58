"""bench.specialist_finetune's report: the fine-tune's points beside the kept results of the start,
of the members compared and of each specialist at its own k (kept results written here by hand)."""

import json

import pytest

from bench import specialist_finetune
from bench.specialist_finetune import report
from tests.helpers import TINY


def _keep(kept, member, seed, iters, trained_k, losses, flops):
    record = {"member": member, "seed": seed, "train_iters": iters, "trained_k": trained_k,
              "training_flops": flops, "losses": {str(iters): {"valid": losses}}}
    (kept / f"{member}-s{seed}.json").write_text(json.dumps(record))


def test_the_report_sets_the_fine_tune_beside_its_start_and_the_members_trained_from_scratch(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: s-x\nbase: {TINY}\nseeds: [1, 2]\nmembers:\n  - {{name: el, role: elastic}}\n"
                     "  - {name: k2, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [2]}}\n"
                     "  - {name: k4, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [4]}}\n")
    kept = tmp_path / "results" / "s_x"
    kept.mkdir(parents=True)
    _keep(kept, "k4", 1, 100, 4, {"1": 5.0, "2": 4.5, "4": 4.0}, 4e12)
    _keep(kept, "k2", 1, 100, 2, {"1": 4.6, "2": 4.2, "4": 4.4}, 3e12)
    _keep(kept, "el", 1, 100, None, {"1": 4.4, "2": 4.3, "4": 4.25}, 3e12)
    _keep(kept, "k4", 2, 100, 4, {"1": 9.0, "2": 9.0, "4": 9.0}, 4e12)  # another seed: not shown
    run = {"losses": {"10": {"valid": {"1": 4.7, "2": 4.4, "4": 4.1}}, "40": {"valid": {"1": 4.5, "2": 4.3, "4": 4.15}}},
           "training_flops": 1e12, "lr": 3e-4, "start": "unused"}
    markdown, data = report(str(suite), "k4", "el", ["el"], 1, run, results_dir=str(tmp_path / "results"))
    lines = markdown.splitlines()
    assert "| `k4` (the start), 100 steps | 5.0000 | 4.5000 | - | 4.0000 | - | - | 4e+12 |" in lines
    # FLOPs: the start's plus the fine-tune's share up to that point.
    assert "| + 10 steps of `el` routing | 4.7000 | 4.4000 | - | 4.1000 | - | - | 4.25e+12 |" in lines
    assert "| + 40 steps of `el` routing | 4.5000 | 4.3000 | - | 4.1500 | - | - | 5e+12 |" in lines
    assert "| `el` from scratch, 100 steps | 4.4000 | 4.3000 | - | 4.2500 | - | - | 3e+12 |" in lines
    assert "| each specialist at its k | - | 4.2000 | - | 4.0000 | - | - | - |" in lines
    assert data["start"]["valid"]["4"] == 4.0 and data["compare"]["el"]["valid"]["1"] == 4.4


def test_a_fine_tune_of_some_parameters_says_which_trained(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: s-x\nbase: {TINY}\nseeds: [1]\nmembers:\n  - {{name: el, role: elastic}}\n"
                     "  - {name: k4, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [4]}}\n")
    kept = tmp_path / "results" / "s_x"
    kept.mkdir(parents=True)
    _keep(kept, "k4", 1, 100, 4, {"1": 5.0, "4": 4.0}, 4e12)
    run = {"losses": {"10": {"valid": {"1": 4.7, "4": 4.1}}}, "training_flops": 1e12, "lr": 3e-4,
           "start": "unused", "train_only": ["*.mlp.router.*"]}
    markdown, _ = report(str(suite), "k4", "el", [], 1, run, results_dir=str(tmp_path / "results"))
    assert "| + 10 steps of `el` routing, only `*.mlp.router.*` training | 4.7000 | - | - | 4.1000 | - | - | 5e+12 |" \
        in markdown.splitlines()


def test_report_only_sets_the_recorded_run_beside_the_kept_results_of_now_and_keeps_its_command(
        tmp_path, monkeypatch):
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: s-x\nbase: {TINY}\nseeds: [1]\nmembers:\n  - {{name: el, role: elastic}}\n"
                     "  - {name: k4, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [4]}}\n")
    results = tmp_path / "results"
    (results / "s_x").mkdir(parents=True)
    monkeypatch.setattr(specialist_finetune, "RESULTS", str(results))
    argv = ["--suite", str(suite), "--specialist", "k4", "--elastic", "el", "--label", "x", "--report-only"]
    with pytest.raises(SystemExit, match="no .*specialist_finetune_s_x_x.json; run the fine-tune first"):
        specialist_finetune.main(argv)
    run = {"losses": {"10": {"valid": {"1": 4.7, "4": 4.1}}}, "training_flops": 1e12, "lr": 3e-4, "start": "unused"}
    path = results / "specialist_finetune_s_x_x.json"
    path.write_text(json.dumps({"command": "python -m bench.specialist_finetune --the-run", "date": "then",
                                "machine": {"cpu": "the run's"}, "data": {"run": run}}))
    _keep(results / "s_x", "k4", 1, 100, 4, {"1": 5.5, "4": 3.9}, 4e12)  # the start, retrained since
    assert specialist_finetune.main(argv) == 0
    record = json.loads(path.read_text())
    assert record["command"] == "python -m bench.specialist_finetune --the-run"
    assert record["date"] == "then" and record["machine"] == {"cpu": "the run's"}
    assert record["data"]["run"] == run
    lines = record["markdown"].splitlines()
    assert "| `k4` (the start), 100 steps | 5.5000 | - | - | 3.9000 | - | - | 4e+12 |" in lines
    assert "| + 10 steps of `el` routing | 4.7000 | - | - | 4.1000 | - | - | 5e+12 |" in lines


def test_a_start_record_replaces_the_kept_start_and_must_be_that_specialist(tmp_path, monkeypatch):
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: s-x\nbase: {TINY}\nseeds: [1]\nmembers:\n  - {{name: el, role: elastic}}\n"
                     "  - {name: k4, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [4]}}\n")
    results = tmp_path / "results"
    (results / "s_x").mkdir(parents=True)
    _keep(results / "s_x", "k4", 1, 100, 4, {"1": 5.5, "4": 3.9}, 4e12)  # the suite's kept k4
    retrained = tmp_path / "retrained"
    retrained.mkdir()
    _keep(retrained, "k4", 1, 100, 4, {"1": 5.4, "4": 3.8}, 4e12)  # the retrain it started from
    _keep(retrained, "k2", 1, 100, 2, {"1": 5.4, "4": 3.8}, 4e12)
    monkeypatch.setattr(specialist_finetune, "RESULTS", str(results))
    run = {"losses": {"10": {"valid": {"1": 4.7, "4": 4.1}}}, "training_flops": 1e12, "lr": 3e-4, "start": "unused"}
    path = results / "specialist_finetune_s_x.json"
    path.write_text(json.dumps({"command": "python -m bench.specialist_finetune --the-run", "data": {"run": run}}))
    argv = ["--suite", str(suite), "--specialist", "k4", "--elastic", "el", "--report-only"]
    with pytest.raises(SystemExit, match="is 'k2' seed 1, not 'k4' seed 1"):
        specialist_finetune.main(argv + ["--start-record", str(retrained / "k2-s1.json")])
    assert specialist_finetune.main(argv + ["--start-record", str(retrained / "k4-s1.json")]) == 0
    record = json.loads(path.read_text())
    assert "| `k4` (the start), 100 steps | 5.4000 | - | - | 3.8000 | - | - | 4e+12 |" in record["markdown"].splitlines()
    assert record["data"]["start"]["valid"]["4"] == 3.8 and "--start-record" in record["data"]["report_command"]
