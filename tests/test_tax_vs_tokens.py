"""bench.tax_vs_tokens: the tax per rung and checkpoint, paired on the seeds every rung has, with
the tokens of each point, from kept results written here by hand."""

import json
import re

import pytest

from bench import tax_vs_tokens as tvt
from mmoe_megatron.data.indexed import read_documents
from tests.data_fixtures import small_datasets, small_tokenizer  # noqa: F401
from tests.helpers import TINY


def _suite(tmp_path, name, iters, seeds, data="", fraction=1.0):
    """`data`: the (tokenizer, prefix) the runs train on, split 60,20,20; none: the demo corpus."""
    data = (f", data.tokenizer: {data[0]}, data.blend: [{{prefix: {data[1]}, weight: 1.0}}], "
            f"data.split: '60,20,20', data.train_fraction: {fraction}") if data else ""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nbase: {TINY}\nseeds: {seeds}\n"
        f"overrides: {{train.train_iters: {iters}, train.global_batch_size: 8, train.micro_batch_size: 4, "
        f"data.seq_length: 64{data}}}\n"
        "eval: {fractions: [0.5, 1.0]}\n"
        "members:\n"
        "  - {name: el, role: elastic}\n"
        "  - {name: k2, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [2]}}\n")
    return str(path)


def _keep(results, suite, member, seed, iters, losses):
    """losses: {step: (valid at k = 2, wiki at k = 2)}."""
    kept = results / suite.replace("-", "_")
    kept.mkdir(parents=True, exist_ok=True)
    record = {"member": member, "seed": seed, "train_iters": iters,
              "losses": {str(step): {"valid": {"2": v}, "wiki": {"2": w}} for step, (v, w) in losses.items()}}
    (kept / f"{member}-s{seed}.json").write_text(json.dumps(record))


@pytest.fixture
def rungs(tmp_path, small_tokenizer, small_datasets):
    results = tmp_path / "results"
    data = (small_tokenizer, small_datasets["sonnets"][0])
    short = _suite(tmp_path, "rung-a", 100, [1, 2], data)
    long = _suite(tmp_path, "rung-b", 200, [1], data, fraction=0.5)
    _keep(results, "rung-a", "el", 1, 100, {50: (5.0, 6.0), 100: (4.5, 5.5)})
    _keep(results, "rung-a", "k2", 1, 100, {50: (5.1, 6.0), 100: (4.4, 5.6)})
    _keep(results, "rung-a", "el", 2, 100, {50: (5.2, 6.2), 100: (4.6, 5.7)})
    _keep(results, "rung-a", "k2", 2, 100, {50: (5.0, 6.1), 100: (4.4, 5.5)})
    _keep(results, "rung-b", "el", 1, 200, {100: (4.6, 5.6), 200: (4.2, 5.2)})
    _keep(results, "rung-b", "k2", 1, 200, {100: (4.5, 5.6), 200: (4.0, 5.1)})
    return [short, long], str(results)


def test_tax_is_paired_on_the_shared_seeds_with_each_points_tokens(rungs, small_datasets):
    paths, results = rungs
    markdown, data = tvt.report([tvt.rung(p, "el", [2], results) for p in paths], "el", [2])
    assert data["shared_seeds"] == [1]
    end = {(s["suite"], s["domain"]): s for s in data["end_of_training"]}
    # Seed 1 only (rung-b has no seed 2): 4.5 - 4.4 and 4.2 - 4.0 on valid.
    assert end[("rung-a", "valid")]["tax_shared_seeds"] == pytest.approx(0.1)
    assert end[("rung-b", "valid")]["tax_shared_seeds"] == pytest.approx(0.2)
    assert end[("rung-b", "wiki")]["tax_shared_seeds"] == pytest.approx(0.1)
    # Every seed of rung-a: (0.1 + 0.2) / 2 on valid.
    assert end[("rung-a", "valid")]["tax_all_seeds"] == pytest.approx(0.15)
    assert end[("rung-a", "valid")]["n"] == 2
    # 100 steps of 8 x 64 tokens, 200 on the longer rung.
    assert end[("rung-a", "valid")]["tokens"] == 51200
    assert end[("rung-b", "valid")]["tokens"] == 102400
    # Epochs: the tokens over those of the train split's documents, the first 72 of the 120 of the
    # dataset (split 60,20,20), rung-b's the first 36 of them (train_fraction 0.5).
    lengths = [len(doc) for doc in read_documents(small_datasets["sonnets"][0])]
    epochs_a, epochs_b = 51200 / sum(lengths[:72]), 102400 / sum(lengths[:36])
    assert end[("rung-a", "valid")]["epochs"] == pytest.approx(epochs_a)
    assert end[("rung-b", "valid")]["epochs"] == pytest.approx(epochs_b)
    assert epochs_b > 3 * epochs_a  # twice the tokens on half of the documents
    # Half of rung-b (step 100) is a row with its own losses: 4.6 - 4.5.
    assert (f"| rung-b | 0.5 | 0.05 / 0.05 | {epochs_b / 2:.2f} / {epochs_b / 2:.2f} | valid | 2 | 4.6000 | "
            "4.5000 | +0.1000 (+0.1000) | +0.1000 (1) |" in markdown)
    assert f"rung-b (0.1 M tokens, {epochs_b:.1f} epochs) valid k = 2: +0.2000" in markdown


def test_epochs_are_left_out_where_the_training_data_is_not_here(tmp_path):
    results = tmp_path / "results"
    gone = _suite(tmp_path, "rung-gone", 100, [1], ("no/tokenizer.model", str(tmp_path / "no_text_document")))
    _keep(results, "rung-gone", "el", 1, 100, {50: (5.0, 6.0), 100: (4.5, 5.5)})
    _keep(results, "rung-gone", "k2", 1, 100, {50: (5.1, 6.0), 100: (4.4, 5.6)})
    markdown, data = tvt.report([tvt.rung(gone, "el", [2], str(results))], "el", [2])
    assert "| rung-gone | 1 | 0.05 / 0.05 | - / - | valid | 2 | 4.5000 | 4.4000 |" in markdown
    assert data["end_of_training"][0]["epochs"] is None


def test_a_k_without_a_specialist_and_rungs_without_a_shared_seed_are_refused(rungs, tmp_path):
    paths, results = rungs
    with pytest.raises(ValueError, match=r"no specialist at k = \[4\]"):
        tvt.rung(paths[0], "el", [4], results)
    with pytest.raises(ValueError, match="no member 'nope'"):
        tvt.rung(paths[0], "nope", [2], results)
    other = _suite(tmp_path, "rung-c", 100, [3])
    _keep(tmp_path / "results", "rung-c", "el", 3, 100, {50: (5.0, 6.0), 100: (4.5, 5.5)})
    _keep(tmp_path / "results", "rung-c", "k2", 3, 100, {50: (5.0, 6.0), 100: (4.5, 5.5)})
    with pytest.raises(ValueError, match="share no seed"):
        tvt.report([tvt.rung(p, "el", [2], results) for p in (paths[1], other)], "el", [2])


def test_a_checkpoint_the_shared_seed_lacks_shows_only_the_rungs_own_seeds(rungs, tmp_path):
    paths, results = rungs
    # rung-a's seed 1 (the seed both rungs have) without its half-way evaluation.
    _keep(tmp_path / "results", "rung-a", "el", 1, 100, {100: (4.5, 5.5)})
    markdown, data = tvt.report([tvt.rung(p, "el", [2], results) for p in paths], "el", [2])
    # Seed 2 alone at 0.5: 5.2 - 5.0.
    epochs = r"\d+\.\d\d / \d+\.\d\d"
    assert re.search(rf"\| rung-a \| 0.5 \| 0.03 / 0.03 \| {epochs} \| valid \| 2 \| - \| - \| - \| "
                     r"\+0.2000 \(1\) \|", markdown)
    assert re.search(rf"\| rung-a \| 1 \| 0.05 / 0.05 \| {epochs} \| valid \| 2 \| 4.5000 \| 4.4000 \| "
                     r"\+0.1000 \(\+0.1000\) \|", markdown)


def test_a_rung_without_runs_of_a_specialist_lists_the_other_ks(rungs, tmp_path, small_tokenizer, small_datasets):
    paths, results = rungs
    # rung-d defines a k = 4 specialist but has run only the k = 2 one.
    path = tmp_path / "rung-d.yaml"
    path.write_text(open(paths[0]).read().replace("rung-a", "rung-d") + (
        "  - {name: k4, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [4]}}\n"))
    _keep(tmp_path / "results", "rung-d", "el", 1, 100, {50: (5.0, 6.0), 100: (4.5, 5.5)})
    _keep(tmp_path / "results", "rung-d", "k2", 1, 100, {50: (5.1, 6.0), 100: (4.4, 5.6)})
    d = tvt.rung(str(path), "el", [2, 4], results)
    assert d["ks"] == [2] and d["seeds"] == [1] and {p["k"] for p in d["points"]} == {2}
    markdown, data = tvt.report([d], "el", [2, 4])
    assert "The rung rung-d has no run of the specialist at k = 4." in markdown
    assert [(s["k"], s["domain"]) for s in data["end_of_training"]] == [(2, "valid"), (2, "wiki")]


def test_an_elastic_member_is_paired_with_the_specialists_it_names(tmp_path, small_tokenizer, small_datasets):
    data = (small_tokenizer, small_datasets["sonnets"][0])
    path = _suite(tmp_path, "rung-s", 100, [1], data)
    with open(path, "a") as f:
        f.write("  - {name: sh, role: elastic, specialists: [k2_sh], overrides: {moe.shared_expert_ffn_hidden_size: 16}}\n"
                "  - {name: k2_sh, role: specialist, overrides: {matryoshka.strategy: fixed, matryoshka.ks: [2], "
                "moe.shared_expert_ffn_hidden_size: 16}}\n")
    results = tmp_path / "results"
    for member, (v, w) in {"el": (4.5, 5.5), "k2": (4.4, 5.6), "sh": (4.3, 5.3), "k2_sh": (4.0, 5.2)}.items():
        _keep(results, "rung-s", member, 1, 100, {50: (v + 0.5, w + 0.5), 100: (v, w)})
    end = {}
    for elastic in ("el", "sh"):
        _, data = tvt.report([tvt.rung(path, elastic, [2], str(results))], elastic, [2])
        end[elastic] = {s["domain"]: s["tax_all_seeds"] for s in data["end_of_training"]}
    assert end["el"] == {"valid": pytest.approx(0.1), "wiki": pytest.approx(-0.1)}  # against k2
    assert end["sh"] == {"valid": pytest.approx(0.3), "wiki": pytest.approx(0.1)}  # against k2_sh
