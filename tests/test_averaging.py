"""Checkpoint averaging (mmoe_megatron.training.averaging, tools.average_checkpoints) and the report
of bench.tail_average, against values worked out by hand."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from mmoe_megatron.training.averaging import average_weights, tail_checkpoints, write_average
from mmoe_megatron.training.checkpoint import CheckpointError, load_global_state_dict
from mmoe_megatron.training.checkpoint_names import MANIFEST, tag_for


def _checkpoint(root, step, weights, complete=True, shards=1):
    """A checkpoint directory as training writes its global weights: model/rank_*.safetensors
    (split over `shards` files), and the manifest if `complete`."""
    path = os.path.join(root, tag_for(step))
    os.makedirs(os.path.join(path, "model"), exist_ok=True)
    names = sorted(weights)
    for i in range(shards):
        part = {n: weights[n] for n in names[i::shards]}
        save_file(part, os.path.join(path, "model", f"rank_{i:05d}.safetensors"))
    if complete:
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump({"files": {}}, f)
    return path


def test_average_is_the_elementwise_mean_in_each_weights_dtype(tmp_path):
    a = _checkpoint(tmp_path, 100, {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.bfloat16),
                                    "idx": torch.tensor([3, 4])}, shards=2)
    b = _checkpoint(tmp_path, 200, {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([1.5], dtype=torch.bfloat16),
                                    "idx": torch.tensor([3, 4])})
    c = _checkpoint(tmp_path, 300, {"w": torch.tensor([5.0, 1.0]), "h": torch.tensor([1.0], dtype=torch.bfloat16),
                                    "idx": torch.tensor([3, 4])})
    out = average_weights([a, b, c])
    assert out["w"].tolist() == [3.0, 3.0]
    assert out["h"].dtype == torch.bfloat16 and out["h"].tolist() == [1.0]
    assert out["idx"].tolist() == [3, 4]
    assert average_weights([a])["w"].tolist() == [1.0, 2.0]


def test_float32_weights_are_summed_without_float32_rounding(tmp_path):
    # 2**24 + 1 is not a float32; summed in float32, 2**24 + 1 + 1 would round away the ones.
    big = float(2 ** 24)
    paths = [_checkpoint(tmp_path, s, {"w": torch.tensor([v], dtype=torch.float32)})
             for s, v in ((1, big), (2, 1.0), (3, 2.0))]
    # float32 steps are 0.5 here: the exact mean 5592406.33 rounds to 5592406.5, float32 sums give 5592406.0.
    assert average_weights(paths)["w"].item() == torch.tensor((big + 3.0) / 3, dtype=torch.float32).item() == 5592406.5


@pytest.mark.parametrize("other, words", [
    ({"w": torch.zeros(2), "extra": torch.zeros(1)}, "other weights"),
    ({"w": torch.zeros(3)}, "(3,)"),
    ({"w": torch.zeros(2, dtype=torch.float64)}, "float64"),
])
def test_checkpoints_of_other_models_are_refused(tmp_path, other, words):
    a = _checkpoint(tmp_path, 1, {"w": torch.zeros(2)})
    b = _checkpoint(tmp_path, 2, other)
    with pytest.raises(CheckpointError, match="one run only") as e:
        average_weights([a, b])
    assert words in str(e.value)


def test_integer_weights_that_differ_are_refused(tmp_path):
    a = _checkpoint(tmp_path, 1, {"idx": torch.tensor([1])})
    b = _checkpoint(tmp_path, 2, {"idx": torch.tensor([2])})
    with pytest.raises(CheckpointError, match="integer weights cannot be averaged"):
        average_weights([a, b])
    with pytest.raises(CheckpointError, match="at least one"):
        average_weights([])


def test_tail_checkpoints_picks_complete_ones_by_count_and_step(tmp_path):
    for step in (50, 100, 150, 200):
        _checkpoint(tmp_path, step, {"w": torch.zeros(1)})
    _checkpoint(tmp_path, 250, {"w": torch.zeros(1)}, complete=False)  # a save that died part-way
    names = lambda paths: [os.path.basename(p) for p in paths]  # noqa: E731
    assert names(tail_checkpoints(str(tmp_path), last=2)) == [tag_for(150), tag_for(200)]
    assert names(tail_checkpoints(str(tmp_path), since_step=100)) == [tag_for(100), tag_for(150), tag_for(200)]
    assert names(tail_checkpoints(str(tmp_path), last=1, since_step=100)) == [tag_for(200)]
    assert tail_checkpoints(str(tmp_path), since_step=300) == []
    assert tail_checkpoints(str(tmp_path / "none"), last=3) == []


def test_written_average_reads_as_a_checkpoint(tmp_path):
    a = _checkpoint(tmp_path, 1, {"w": torch.tensor([1.0]), "v": torch.tensor([[2.0, 4.0]])})
    b = _checkpoint(tmp_path, 2, {"w": torch.tensor([2.0]), "v": torch.tensor([[0.0, 0.0]])})
    out = write_average([a, b], str(tmp_path / "avg"))
    weights = load_global_state_dict(out)
    assert weights["w"].tolist() == [1.5] and weights["v"].tolist() == [[1.0, 2.0]]
    with open(os.path.join(out, "averaged.json")) as f:
        assert json.load(f)["checkpoints"] == [os.path.abspath(a), os.path.abspath(b)]


def test_tool_averages_given_checkpoints_and_explains_bad_input(tmp_path, capsys):
    from tools import average_checkpoints as tool

    a = _checkpoint(tmp_path, 1, {"w": torch.tensor([1.0])})
    b = _checkpoint(tmp_path, 2, {"w": torch.tensor([3.0])})
    assert tool.main(["--checkpoint", a, "--checkpoint", b, "--out", str(tmp_path / "avg")]) == 0
    assert load_global_state_dict(str(tmp_path / "avg"))["w"].tolist() == [2.0]
    c = _checkpoint(tmp_path, 3, {"w": torch.tensor([1.0, 2.0])})
    assert tool.main(["--checkpoint", a, "--checkpoint", c, "--out", str(tmp_path / "bad")]) == 1
    assert "one run only" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path / "x")])  # neither a run nor checkpoints
    with pytest.raises(SystemExit):
        tool.main(["--run", str(tmp_path), "--out", str(tmp_path / "x")])  # a run but no window


def _record(member, seed, finals, tail, averages, role="elastic"):
    """A kept record of bench.tail_average: one domain, k = 8; the final checkpoint at step 8,
    `tail` the losses of steps 6 and 7 (with 8 the last quarter), `averages` one per window."""
    from bench.tail_average import WINDOWS

    checkpoints = {"4": {"wiki": {"8": 9.0}}, "6": {"wiki": {"8": tail[0]}}, "7": {"wiki": {"8": tail[1]}},
                   "8": {"wiki": {"8": finals}}}
    steps = {"last quarter": [6, 7, 8], "last eighth": [7, 8], "second half": [4, 6, 7, 8]}
    return {"member": member, "role": role, "seed": seed, "train_iters": 8, "checkpoints": checkpoints,
            "averages": {n: {"steps": steps[n], "losses": {"wiki": {"8": v}}} for (n, _), v in zip(WINDOWS, averages)}}


def test_report_gives_each_runs_spread_and_the_gap_of_same_seed_runs():
    from bench import tail_average as ta

    spec = SimpleNamespace(name="x", eval=SimpleNamespace(curve_ks=[8]),
                           members=[SimpleNamespace(name=n, role="elastic", specialists=None, overrides={})
                                    for n in ("a", "b")])
    a = _record("a", 3, 6.90, (6.80, 6.85), (6.86, 6.87, 6.88))
    b = _record("b", 3, 6.86, (6.82, 6.83), (6.855, 6.86, 6.85))
    other_seed = _record("b", 4, 6.0, (6.0, 6.0), (6.0, 6.0, 6.0))
    markdown, data = ta.report(spec, [b, other_seed, a])
    # a's last quarter: 6.80, 6.85, 6.90 -> mean 6.85, sample std 0.05.
    assert "| a | 3 | wiki | 8 | 6.9000 | 6.8500 ± 0.0500 | 6.8600 | 6.8700 | 6.8800 |" in markdown
    assert data["pairs"] == [pytest.approx({"a": "a", "b": "b", "seed": 3, "domain": "wiki", "k": "8",
                                            "final": 0.04, "last quarter": 0.005, "last eighth": 0.01,
                                            "second half": 0.03})]
    assert "| a - b | 3 | wiki | 8 | +0.0400 | +0.0050 | +0.0100 | +0.0300 |" in markdown


def test_report_gives_the_tax_with_and_without_averaging():
    from bench import tail_average as ta

    members = [SimpleNamespace(name="e", role="elastic", specialists=["k8"], overrides={}),
               SimpleNamespace(name="k8", role="specialist", specialists=None,
                               overrides={"matryoshka.strategy": "fixed", "matryoshka.ks": [8]})]
    spec = SimpleNamespace(name="x", eval=SimpleNamespace(curve_ks=[8]), members=members)
    e = _record("e", 3, 6.95, (6.90, 6.92), (6.93, 6.94, 6.91))
    k8 = _record("k8", 3, 6.90, (6.90, 6.91), (6.92, 6.92, 6.92), role="specialist")
    unpaired = _record("k8", 4, 6.0, (6.0, 6.0), (6.0, 6.0, 6.0), role="specialist")
    markdown, data = ta.report(spec, [e, k8, unpaired])
    assert data["taxes"] == [pytest.approx({"elastic": "e", "specialist": "k8", "seed": 3, "domain": "wiki",
                                            "k": "8", "final": 0.05, "last quarter": 0.01, "last eighth": 0.02,
                                            "second half": -0.01})]
    assert "| e | k8 | 3 | wiki | 8 | +0.0500 | +0.0100 | +0.0200 | -0.0100 |" in markdown
    assert data["pairs"] == []  # an elastic run and a specialist are paired only as a tax


def test_report_spreads_the_tax_over_every_pairing_of_repeat_runs():
    from bench import tail_average as ta

    tail = {"matryoshka.shrink_fraction": 0.5, "checkpoint.save_interval": 50}
    fixed8 = {"matryoshka.strategy": "fixed", "matryoshka.ks": [8]}
    members = [SimpleNamespace(name="e2", role="elastic", specialists=["s2"], overrides=tail, equal_compute_to="k8"),
               SimpleNamespace(name="e1", role="elastic", specialists=["s1"], equal_compute_to="k8",
                               overrides={**tail, "checkpoint.save_interval": 100}),
               SimpleNamespace(name="e3", role="elastic", specialists=["s3"], overrides=tail, equal_compute_to="k8"),
               SimpleNamespace(name="other", role="elastic", specialists=["s1"], overrides={}, equal_compute_to="k8"),
               SimpleNamespace(name="s2", role="specialist", specialists=None, overrides=fixed8),
               SimpleNamespace(name="s1", role="specialist", specialists=None, overrides=fixed8),
               SimpleNamespace(name="s3", role="specialist", specialists=None, overrides=fixed8)]
    spec = SimpleNamespace(name="x", eval=SimpleNamespace(curve_ks=[8]), members=members)
    runs = [_record("e2", 3, 6.96, (6.9, 6.9), (6.93, 6.94, 6.95)), _record("e1", 3, 6.90, (6.9, 6.9), (6.92, 6.94, 6.90)),
            _record("s2", 3, 6.95, (6.9, 6.9), (6.92, 6.93, 6.90), role="specialist"),
            _record("s1", 3, 6.89, (6.9, 6.9), (6.91, 6.93, 6.92), role="specialist"),
            # another training on the same machine, and a repeat with its specialist on another machine:
            # each has one pairing there, and joins no group
            _record("other", 3, 5.0, (5.0, 5.0), (5.0, 5.0, 5.0)),
            _record("e3", 3, 1.0, (1.0, 1.0), (1.0, 1.0, 1.0)),
            _record("s3", 3, 2.0, (2.0, 2.0), (2.0, 2.0, 2.0), role="specialist")]
    for r in runs:
        r["trained_on"] = "cpu B" if r["member"] in ("e3", "s3") else "cpu A"
    markdown, data = ta.report(spec, runs)
    (row,) = [r for r in data["repeat_spans"] if r["elastic"] == ["e2", "e1"]]
    # taxes e2-s2 +0.01, e2-s1 +0.07, e1-s2 -0.05, e1-s1 +0.01 -> span 0.12; last quarter: +0.01, +0.02,
    # +0.00, +0.01 -> 0.02; last eighth: +0.01, +0.01, +0.01, +0.01 -> 0; second half: +0.05, +0.03, +0.00, -0.02.
    assert row["pairings"] == 4 and row["specialists"] == ["s2", "s1"] and row["machine"] == "cpu A"
    assert row["final"] == pytest.approx({"min": -0.05, "max": 0.07, "span": 0.12})
    assert row["last quarter"]["span"] == pytest.approx(0.02)
    assert row["last eighth"]["span"] == pytest.approx(0.0, abs=1e-12)
    assert row["second half"]["span"] == pytest.approx(0.07)
    assert "| e2 / e1 | 3 | cpu A | wiki | 8 | 4 | 0.1200 | 0.0200 | 0.0000 | 0.0700 |" in markdown
    assert len(data["repeat_spans"]) == 1


def test_machine_of_a_run_names_each_kind_it_trained_on():
    from bench.tail_average import machine_of

    assert machine_of([{"cpu": "Intel Xeon", "cpu_capability": "AVX512"}]) == "Intel Xeon (AVX512)"
    assert machine_of([{"cpu": "B", "cpu_capability": "AVX2"}, {"cpu": "A", "cpu_capability": "AVX512"},
                       {"cpu": "B", "cpu_capability": "AVX2"}]) == "A (AVX512) + B (AVX2)"
    assert machine_of([]) == "unknown"


def test_window_steps_start_at_the_fraction_of_training():
    from bench.tail_average import _window_steps

    assert _window_steps([1100, 1650, 1700, 2150, 2196], 2196, 0.75) == [1650, 1700, 2150, 2196]
    assert _window_steps([1100, 1650, 1700, 2150, 2196], 2196, 0.875) == [2150, 2196]
