"""bench/device_training.py: how two runs of the same tokens are compared, and which records pair."""

from __future__ import annotations

import json

import pytest

from bench.device_training import gaps, report


def test_gaps_find_where_two_runs_part_and_compare_their_smoothed_losses():
    a = [5.0] * 30 + [4.0] * 10 + [3.0] * 60  # 100 steps
    b = list(a)
    b[24] += 5e-5  # under the threshold: still the same run
    b[36] += 0.5  # step 37: apart
    b[90:] = [x + 0.02 for x in b[90:]]  # the last tenth, 0.02 higher
    g = gaps(a, b)
    assert g["first_diverged_step"] == 37
    assert g["at"] == {"10": 0.0, "50": 0.0, "100": pytest.approx(0.02)}
    assert g["tail_mean_diff"] == pytest.approx(-0.02)
    assert gaps(a, list(a))["first_diverged_step"] is None


def _record(device, member, seed, loss, valid):
    return {"device": device, "member": member, "seed": seed, "steps": len(loss), "loss": loss,
            "tokens_per_s": [1000.0 * (2 if device == "cuda" else 1)] * len(loss), "tokens_per_step": 100,
            "device_name": "GPU X" if device == "cuda" else None, "torch": "t", "code_version": "abc",
            "final_valid": {"4": valid}}


def test_the_report_pairs_each_cuda_run_with_the_same_cpu_run_and_another_seed(tmp_path):
    records, results = tmp_path / "records", tmp_path / "results"
    records.mkdir()
    loss = [5.0 - 0.01 * i for i in range(40)]
    for device, member, seed, shift, valid in [("cuda", "e", 1, 0.0, 4.50), ("cpu", "e", 1, 0.0, 4.48),
                                               ("cpu", "e", 2, 0.1, 4.40), ("cpu", "k4", 1, 0.0, 4.3)]:
        r = _record(device, member, seed, [x + shift for x in loss], valid)
        (records / f"{device}-{member}-s{seed}.json").write_text(json.dumps(r))
    data = report(str(records), str(results))
    (row,) = data["rows"]  # k4 has no CUDA run
    assert (row["member"], row["seed"], row["seed_gap_seeds"]) == ("e", 1, [1, 2])
    assert row["device_gap"]["first_diverged_step"] is None
    assert row["seed_gap"]["tail_mean_diff"] == pytest.approx(0.1)
    assert (row["cuda_steps_per_s"], row["cpu_steps_per_s"]) == (20.0, 10.0)
    assert row["final_valid"]["cuda"]["4"] - row["final_valid"]["cpu"]["4"] == pytest.approx(0.02)
    markdown = json.loads((results / "device_training.json").read_text())["markdown"]
    assert "| e | 1 | 4 | 4.5000 | 4.4800 | +0.0200 | -0.0800 |" in markdown
