"""The suite end to end through its command line (train every member, evaluate all at every k,
compare), then the evaluation and budget-search commands on its elastic member."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.data_fixtures import data_config, small_datasets, small_tokenizer  # noqa: F401
from tests.dist import run_distributed
from tests.helpers import ROOT, tiny_config

KS = [1, 2, 4, 8]


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def suite(tmp_path_factory, small_tokenizer, small_datasets):
    from mmoe_megatron.config import save_config

    tmp = tmp_path_factory.mktemp("suite")
    base = data_config(tmp, small_tokenizer, [(small_datasets["sonnets"][0], 1.0)], **{
        "data.seq_length": 32, "data.split": "80,20,0", "train.micro_batch_size": 4,
        "train.global_batch_size": 8, "train.train_iters": 6, "train.eval_interval": 0,
        "train.eval_iters": 2, "optimizer.warmup_iters": 2, "checkpoint.save_interval": 0,
        "logging.tensorboard": False, "train.log_interval": 3,
    })
    save_config(base, str(tmp / "base.yaml"))
    spec = {
        "name": "t", "base": str(tmp / "base.yaml"), "runs_dir": str(tmp / "runs"), "seeds": [5],
        "eval": {"ks": KS, "layer_ks": [[1, 2, 3, 4]], "num_samples": 16, "fractions": [0.5, 1.0],
                 "data_seed": 11, "heldout": [{"name": "verses", "prefix": small_datasets["verses"][0]}]},
        "members": [
            {"name": "elastic", "role": "elastic"},
            {"name": "k1", "role": "specialist",
             "overrides": {"matryoshka.strategy": "fixed", "matryoshka.ks": [1],
                           "matryoshka.normalization": "softmax_topk"}},
            {"name": "k2", "role": "specialist",
             "overrides": {"matryoshka.strategy": "fixed", "matryoshka.ks": [2]}},
        ],
    }
    path = tmp / "suite.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = _run(["mmoe_megatron.evaluation.suite", "run", "--suite", str(path)])
    return {"path": str(path), "runs": str(tmp / "runs" / "t"), "stdout": proc.stdout}


def _eval_json(suite, member, name="eval.json"):
    with open(os.path.join(suite["runs"], member, "seed5", "eval", name)) as f:
        return json.load(f)


def test_comparison_report_carries_every_members_evaluation(suite):
    with open(os.path.join(suite["runs"], "report", "comparison.json")) as f:
        comparison = json.load(f)
    labels = [str(k) for k in KS] + ["[1,2,3,4]"]
    assert comparison["columns"] == labels
    rows = {r["name"]: r for r in comparison["rows"]}
    assert set(rows) == {"elastic", "k1", "k2"}
    for name, row in rows.items():
        evaluated = {r["label"]: r["loss"] for r in _eval_json(suite, name)["results"]}
        assert row["loss"] == evaluated
    assert rows["k1"]["trained_k"] == 1 and rows["k2"]["trained_k"] == 2
    for k in ("1", "2"):
        gap = comparison["elastic_gap_to_specialist"][k]
        assert gap == pytest.approx(rows["elastic"]["loss"][k] - rows[f"k{k}"]["loss"][k])
    # Training compute: 3 x forward FLOPs at the expected (k, width) x tokens. The elastic model
    # draws k in 1..4 (mean 2.5) and widths 0.25..1 (mean 0.625), so its experts cost 2.5 x 0.625
    # = 1.56 full-width experts per token: between the k = 1 and k = 2 specialists.
    assert rows["k1"]["training_flops"] < rows["elastic"]["training_flops"] < rows["k2"]["training_flops"]
    with open(os.path.join(suite["runs"], "report", "comparison.md")) as f:
        table = f.read()
    for row in rows.values():
        assert all(f"{v:.4f}" in table for v in row["loss"].values())
    with open(os.path.join(suite["runs"], "report", "comparison.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(suite["runs"], "report", "comparison_verses.png"))


def test_every_kept_checkpoint_is_evaluated_on_every_domain(suite):
    results = _eval_json(suite, "elastic", "results.json")
    assert results["seed"] == 5 and set(results["losses"]) == {"3", "6"}
    labels = [str(k) for k in KS] + ["[1,2,3,4]"]
    for step in ("3", "6"):
        assert set(results["losses"][step]) == {"valid", "verses"}
        valid, verses = results["losses"][step]["valid"], results["losses"][step]["verses"]
        assert list(valid) == labels and list(verses) == labels
        assert all(valid[c] != verses[c] for c in labels)
    # The final validation numbers are those of eval.json; the half-way checkpoint was kept.
    assert results["losses"]["6"]["valid"] == {r["label"]: r["loss"] for r in _eval_json(suite, "elastic")["results"]}
    assert os.path.isdir(os.path.join(suite["runs"], "elastic", "seed5", "checkpoints", "step_00000003"))
    assert results["launches"] and results["launches"][0]["code_version"]
    with open(os.path.join(suite["runs"], "elastic", "seed5", "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["train"]["seed"] == 5 and saved["checkpoint"]["keep_steps"] == [3]


def _reference(rank, world_size, run):
    """The elastic member's checkpoint evaluated here, independently of the suite's commands."""
    from mmoe_megatron import distributed
    from mmoe_megatron.data import build_datasets, resolve_vocab_size
    from mmoe_megatron.evaluation.run import latest_checkpoint, load_model, run_config
    from tests.test_evaluation import _reference_losses

    cfg = run_config(run)
    distributed.init_distributed(cfg)
    model = load_model(cfg, latest_checkpoint(cfg), resolve_vocab_size(cfg))
    cfg = run_config(run, [("data.seed", 11)])
    dataset = build_datasets(cfg, train_samples=1, valid_samples=16, test_samples=0)[1]
    return _reference_losses(model, dataset, list(range(16)), KS + [[1, 2, 3, 4]])


def test_evaluated_losses_are_those_of_the_trained_checkpoint(suite):
    run = os.path.join(suite["runs"], "elastic", "seed5")
    (reference,) = run_distributed(_reference, world_size=1, run=run)
    evaluated = [r["loss"] for r in _eval_json(suite, "elastic")["results"]]
    assert evaluated == pytest.approx(reference, rel=1e-6)
    with open(os.path.join(run, "eval", "eval.md")) as f:
        table = f.read()
    assert all(f"{v:.4f}" in table for v in evaluated)
    assert "Expert ranking across k" in table
    # Training improved the model: every k beats the untrained loss of ln(vocab) by a margin.
    assert max(evaluated) < torch.log(torch.tensor(512.0)).item() - 0.3


def test_budget_search_command_writes_a_vector_within_budget(suite):
    run = os.path.join(suite["runs"], "elastic", "seed5")
    proc = _run(["mmoe_megatron.evaluation.budget", "--run", run, "--mean-k", "2", "--ks", "1,2,3,4",
                 "--widths", "1", "--num-samples", "8"])
    with open(os.path.join(run, "budgets.json")) as f:
        budgets = json.load(f)
    with open(os.path.join(run, "budget_search.json")) as f:
        details = json.load(f)["searches"]["mean_k=2"]
    assert sum(budgets["mean_k=2"]) <= 8 and len(budgets["mean_k=2"]) == 4
    assert details["layer_ks"] == budgets["mean_k=2"]
    assert details["loss"] <= details["uniform_loss"] and details["uniform_k"] == 2
    assert "mean_k=2" in proc.stdout


# --- seeds, learning-curve checkpoints, held-out text, equal compute --------------------------------


def _record(member, seed, role, trained_k, losses_by_fraction, iters=8, trained_ks=(1, 2, 4)):
    """A results.json as `suite evaluate` writes it, with hand-chosen losses."""
    steps = {str(max(1, round(f * iters))): {d: dict(v) for d, v in by_domain.items()}
             for f, by_domain in losses_by_fraction.items()}
    labels = list(next(iter(next(iter(steps.values())).values())))
    return {"member": member, "seed": seed, "role": role, "trained_k": trained_k, "train_iters": iters,
            "training_flops": 1e12, "trained_ks": list(trained_ks), "losses": steps,
            "flops_per_token": {c: 1.0 for c in labels}, "active_params": {c: 1 for c in labels}}


def test_comparison_aggregates_seeds_and_pairs_the_tax():
    from mmoe_megatron.evaluation.compare import comparison, markdown
    from mmoe_megatron.evaluation.suite import EvalSpec, HeldoutSpec, MemberSpec, SuiteSpec

    spec = SuiteSpec(name="s", base="b", seeds=[1, 2], eval=EvalSpec(fractions=[0.5, 1.0],
                     heldout=[HeldoutSpec("docs", "p")]), members=[
        MemberSpec("elastic", "elastic"),
        MemberSpec("k1", "specialist", {"matryoshka.strategy": "fixed", "matryoshka.ks": [1]}),
        MemberSpec("k4", "specialist", {"matryoshka.strategy": "fixed", "matryoshka.ks": [4]})])

    def L(a, b, c):  # losses at k = 1, 2, 4 on both domains (held-out 1.0 higher)
        return {"valid": {"1": a, "2": b, "4": c}, "docs": {"1": a + 1, "2": b + 1, "4": c + 1}}

    records = [
        _record("elastic", 1, "elastic", None, {0.5: L(6.0, 5.9, 5.8), 1.0: L(5.0, 4.9, 4.80)}),
        _record("elastic", 2, "elastic", None, {0.5: L(6.0, 5.9, 5.8), 1.0: L(5.2, 4.9, 4.92)}),
        _record("k1", 1, "specialist", 1, {0.5: L(6.1, 6.2, 6.3), 1.0: L(5.1, 5.2, 5.3)}),
        _record("k1", 2, "specialist", 1, {0.5: L(6.1, 6.2, 6.3), 1.0: L(5.1, 5.2, 5.3)}),
        _record("k4", 1, "specialist", 4, {0.5: L(6.5, 6.0, 5.7), 1.0: L(5.6, 5.0, 4.70)}),
        _record("k4", 2, "specialist", 4, {0.5: L(6.5, 6.0, 5.7), 1.0: L(5.6, 5.0, 4.74)}),
    ]
    data = comparison(spec, records)
    elastic = next(r for r in data["rows"] if r["name"] == "elastic")
    assert elastic["loss"]["1"] == pytest.approx(5.1) and elastic["std"]["1"] == pytest.approx(0.1414214, rel=1e-5)
    tax = data["tax"]["elastic"]
    # k=4: gaps 4.80-4.70=0.10 and 4.92-4.74=0.18 -> mean 0.14, std 0.0565685; the k4 specialist's
    # gain over the k1 specialist's own k: (5.1-4.70, 5.1-4.74) -> 0.38; 0.14/0.38 of it.
    k4 = tax["valid"]["1"]["by_k"]["4"]
    assert k4["mean"] == pytest.approx(0.14) and k4["std"] == pytest.approx(0.0565685, rel=1e-5)
    assert k4["fraction_of_gain"] == pytest.approx(0.14 / 0.38)
    assert tax["valid"]["1"]["by_k"]["1"]["mean"] == pytest.approx(0.0)  # (5.0-5.1 + 5.2-5.1) / 2
    assert tax["docs"]["1"]["by_k"]["4"]["mean"] == pytest.approx(0.14)
    assert tax["valid"]["0.5"]["by_k"]["4"]["mean"] == pytest.approx(0.1)
    # Elastic means over k=1,2,4 at the end: 5.1, 4.9, 4.86: monotone; at half: 6.0, 5.9, 5.8 too.
    assert tax["valid"]["1"]["monotone"] is True
    assert data["largest_seed_std"]["valid"] == {"std": pytest.approx(0.1414214, rel=1e-5),
                                                 "member": "elastic", "k": "1"}
    text = markdown(data)
    assert "+0.1400 ± 0.0566 (37%)" in text and "held-out loss (docs" in text
    assert data["variants"] == {}  # one elastic model: nothing to compare it with
    assert "Learning curve of the tax" in text


def test_the_report_says_what_keeps_an_elastic_model_from_matching_its_specialists():
    """Per domain: met when the tax is at most 0.01 at every trained k, every seed std (the elastic
    model's at each k, each specialist's at its k) below 0.01 over 3 seeds, and the loss never rises
    with k; otherwise the ks without a specialist, the taxes above, the spreads and the rise."""
    from mmoe_megatron.evaluation.compare import comparison, markdown
    from mmoe_megatron.evaluation.suite import EvalSpec, HeldoutSpec, MemberSpec, SuiteSpec

    fixed = lambda k: {"matryoshka.strategy": "fixed", "matryoshka.ks": [k]}  # noqa: E731
    members = [MemberSpec("elastic", "elastic"), MemberSpec("k1", "specialist", fixed(1)),
               MemberSpec("k2", "specialist", fixed(2)), MemberSpec("k4", "specialist", fixed(4))]

    def rec(member, seed, role, k, valid, docs):
        return _record(member, seed, role, k, {1.0: {"valid": dict(zip("124", valid)),
                                                     "docs": dict(zip("124", docs))}})

    d = 0.005  # valid: the elastic model 0, d, 2d above the specialists on seeds 1-3 (std d)
    records = [rec("elastic", s, "elastic", None, (5.0 + i * d, 4.9 + i * d, 4.8 + i * d),
                   (6.0, 5.90 + 0.02 * i, 5.93)) for i, s in enumerate((1, 2, 3))]
    for s in (1, 2, 3):  # docs: the k = 4 specialist is 0.03 better; the elastic loss rises 2 -> 4
        records += [rec("k1", s, "specialist", 1, (5.0, 5.5, 5.6), (6.0, 6.5, 6.6)),
                    rec("k2", s, "specialist", 2, (5.2, 4.9, 5.0), (6.2, 5.92, 6.0)),
                    rec("k4", s, "specialist", 4, (5.4, 5.0, 4.8), (6.4, 6.0, 5.90))]
    spec = SuiteSpec(name="s", base="b", seeds=[1, 2, 3], members=members,
                     eval=EvalSpec(fractions=[1.0], heldout=[HeldoutSpec("docs", "p")]))
    data = comparison(spec, records)
    valid, docs = data["resolution"]["elastic"]["valid"], data["resolution"]["elastic"]["docs"]
    assert valid == {"met": True, "unmeasured_ks": [], "tax_over": {}, "spread": [], "rise": None}
    assert docs["met"] is False and docs["unmeasured_ks"] == []
    assert docs["tax_over"] == {"4": pytest.approx(0.03)}
    assert docs["spread"] == [{"model": "elastic", "k": 2, "std": pytest.approx(0.02), "seeds": 3}]
    assert docs["rise"] == {"rise": pytest.approx(0.01), "from_k": 2, "to_k": 4}
    assert data["tax"]["elastic"]["docs"]["1"]["largest_rise"] == docs["rise"]
    text = markdown(data)
    assert "| elastic | valid | yes |  |  |  |  |" in text
    assert "| elastic | docs | no |  | k=4: +0.0300 | itself at k=2 (0.0200) | +0.0100, k=2 to 4 |" in text
    assert "| no (+0.0100, k=2 to 4) |" in text

    # Without the k = 4 specialist that k is unmeasured; on two seeds no spread is resolved.
    two = [r for r in records if r["member"] != "k4" and r["seed"] != 3]
    spec = SuiteSpec(name="s", base="b", seeds=[1, 2], members=members[:3], eval=EvalSpec(fractions=[1.0]))
    valid = comparison(spec, two)["resolution"]["elastic"]["valid"]
    assert valid["met"] is False and valid["unmeasured_ks"] == [4] and valid["tax_over"] == {}
    assert [(e["model"], e["k"], e["seeds"]) for e in valid["spread"]] == [
        ("elastic", 1, 2), ("elastic", 2, 2), ("elastic", 4, 2), ("k1", 1, 2), ("k2", 2, 2)]
    assert "itself at k=1, 2, 4 (up to 0.0035), 2 seed(s); k1 at k=1 (0.0000), 2 seed(s)" in markdown(
        comparison(spec, two))


def test_an_elastic_member_that_names_its_specialists_is_taxed_against_those_only():
    """Two architectures in one suite: each elastic model against the specialists of its own (the
    named ones, or the unnamed ones), at every k, never against the other's at the same k."""
    from mmoe_megatron.evaluation.compare import comparison
    from mmoe_megatron.evaluation.suite import EvalSpec, MemberSpec, SuiteSpec

    fixed = lambda k, **o: {"matryoshka.strategy": "fixed", "matryoshka.ks": [k], **o}  # noqa: E731
    spec = SuiteSpec(name="s", base="b", seeds=[1], eval=EvalSpec(fractions=[1.0]), members=[
        MemberSpec("elastic", "elastic"),
        MemberSpec("k1", "specialist", fixed(1)), MemberSpec("k4", "specialist", fixed(4)),
        MemberSpec("shared", "elastic", {"moe.shared_expert_ffn_hidden_size": 8},
                   specialists=["k1_shared", "k4_shared"]),
        MemberSpec("k1_shared", "specialist", fixed(1, **{"moe.shared_expert_ffn_hidden_size": 8})),
        MemberSpec("k4_shared", "specialist", fixed(4, **{"moe.shared_expert_ffn_hidden_size": 8}))])

    def rec(member, role, k, a, b):  # losses a at k = 1 and b at k = 4
        return _record(member, 1, role, k, {1.0: {"valid": {"1": a, "4": b}}}, trained_ks=(1, 4))

    records = [rec("elastic", "elastic", None, 5.0, 4.8), rec("k1", "specialist", 1, 5.1, 5.3),
               rec("k4", "specialist", 4, 5.5, 4.7), rec("shared", "elastic", None, 4.9, 4.5),
               rec("k1_shared", "specialist", 1, 4.6, 5.0), rec("k4_shared", "specialist", 4, 5.2, 4.4)]
    tax = comparison(spec, records)["tax"]
    by_k = {m: {k: v["mean"] for k, v in tax[m]["valid"]["1"]["by_k"].items()} for m in tax}
    assert by_k["elastic"] == {"1": pytest.approx(-0.1), "4": pytest.approx(0.1)}
    assert by_k["shared"] == {"1": pytest.approx(0.3), "4": pytest.approx(0.1)}
    # The share of the specialists' gain uses the member's own k = 1 specialist: 4.6 - 4.4.
    assert tax["shared"]["valid"]["1"]["by_k"]["4"]["fraction_of_gain"] == pytest.approx(0.1 / 0.2)


def test_named_specialists_must_be_specialists_one_per_k(tmp_path):
    from mmoe_megatron.config import ConfigError
    from mmoe_megatron.evaluation.suite import load_suite

    def suite(**shared):
        path = tmp_path / "suite.yaml"
        fixed = lambda k: {"matryoshka.strategy": "fixed", "matryoshka.ks": [k]}  # noqa: E731
        path.write_text(yaml.safe_dump({
            "name": "sp", "base": os.path.join(ROOT, "configs", "tiny.yaml"),
            "overrides": {"model.vocab_size": 512, "data.mock": True},
            "members": [{"name": "elastic", "role": "elastic"},
                        {"name": "k2", "role": "specialist", "overrides": fixed(2)},
                        {"name": "k2_other", "role": "specialist", "overrides": fixed(2)},
                        {"name": "other", "role": "elastic", **shared}]}))
        return str(path)

    assert load_suite(suite(specialists=["k2_other"])).members[3].specialists == ["k2_other"]
    with pytest.raises(ConfigError, match=r"members\[3\]\.specialists\[0\].*'elastic' is not a specialist"):
        load_suite(suite(specialists=["elastic"]))
    with pytest.raises(ConfigError, match=r"members\[3\]\.specialists.*two specialists at k = \[2\]"):
        load_suite(suite(specialists=["k2", "k2_other"]))
    # Unnamed, both k = 2 specialists would be every elastic member's: refused, with the fix.
    with pytest.raises(ConfigError, match=r"'elastic' would be measured against two specialists at k = \[2\]; "
                                          r"name its own"):
        load_suite(suite())


def test_elastic_variants_are_compared_with_the_first_elastic_model_seed_by_seed():
    from mmoe_megatron.evaluation.compare import comparison, markdown
    from mmoe_megatron.evaluation.suite import EvalSpec, MemberSpec, SuiteSpec

    spec = SuiteSpec(name="s", base="b", seeds=[1, 2], eval=EvalSpec(), members=[
        MemberSpec("elastic", "elastic"), MemberSpec("sandwich", "elastic"), MemberSpec("distill", "elastic")])

    def L(a, b, c):
        return {1.0: {"valid": {"1": a, "2": b, "4": c}}}

    records = [_record("elastic", 1, "elastic", None, L(5.0, 4.9, 4.8)),
               _record("elastic", 2, "elastic", None, L(5.1, 5.0, 4.9)),
               _record("sandwich", 1, "elastic", None, L(4.9, 4.9, 4.8)),   # -0.1/3 and -0.3/3
               _record("sandwich", 2, "elastic", None, L(5.0, 4.9, 4.8)),
               _record("distill", 1, "elastic", None, L(4.9, 4.9, 4.8)),    # -0.1/3 and +0.3/3
               _record("distill", 2, "elastic", None, L(5.2, 5.1, 5.0))]
    v = comparison(spec, records)["variants"]
    assert v["reference"] == "elastic" and v["ks"] == ["1", "2", "4"]
    sandwich, distill = v["by_variant"]["sandwich"]["valid"], v["by_variant"]["distill"]["valid"]
    assert sandwich["per_seed"] == {"1": pytest.approx(-0.1 / 3), "2": pytest.approx(-0.1)}
    assert sandwich["better_on_every_seed"] is True and distill["better_on_every_seed"] is False
    assert sandwich["decides"] is False  # two seeds are too few to change a default
    assert distill["mean"] == pytest.approx((-0.1 / 3 + 0.1) / 2)
    assert ("| sandwich | valid | -0.0667 ± 0.0471 | -0.0333, -0.1000 | yes (2 of the 3 seeds needed to decide) |"
            in markdown(comparison(spec, records)))
    spec.seeds.append(3)
    records += [_record("elastic", 3, "elastic", None, L(5.0, 5.0, 5.0)),
                _record("sandwich", 3, "elastic", None, L(5.0, 5.0, 4.9))]
    assert comparison(spec, records)["variants"]["by_variant"]["sandwich"]["valid"]["decides"] is True
    # A variant's run that is the reference's own run (suite same_runs_as) is not a pair.
    shared = {**records[0], "member": "distill", "same_run_as": "elastic/seed1"}
    records = [r for r in records if not (r["member"] == "distill" and r["seed"] == 1)] + [shared]
    assert comparison(spec, records)["variants"]["by_variant"]["distill"]["valid"]["per_seed"] == \
        {"2": pytest.approx(0.1)}
    # A member whose every run is another's (the same model read against other specialists) is
    # not that model listed again.
    spec.members.append(MemberSpec("sandwich_again", "elastic", same_runs_as="sandwich"))
    records += [{**r, "member": "sandwich_again", "same_run_as": f"sandwich/seed{r['seed']}"}
                for r in records if r["member"] == "sandwich"]
    assert set(comparison(spec, records)["variants"]["by_variant"]) == {"sandwich", "distill"}


def test_a_variant_naming_the_member_it_changes_is_paired_with_that_member_at_every_k():
    from mmoe_megatron.evaluation.compare import comparison, markdown
    from mmoe_megatron.evaluation.suite import EvalSpec, MemberSpec, SuiteSpec

    spec = SuiteSpec(name="s", base="b", seeds=[1, 2], eval=EvalSpec(), members=[
        MemberSpec("elastic", "elastic"), MemberSpec("fixed_data", "elastic"),
        MemberSpec("fixed_data_low_k", "elastic", variant_of="fixed_data")])

    def L(a, b, c):
        return {1.0: {"valid": {"1": a, "2": b, "4": c}}}

    records = [_record("elastic", 1, "elastic", None, L(5.0, 4.0, 3.0)),
               _record("elastic", 2, "elastic", None, L(5.0, 4.0, 3.0)),
               _record("fixed_data", 1, "elastic", None, L(5.2, 4.2, 3.2)),
               _record("fixed_data", 2, "elastic", None, L(5.4, 4.4, 3.4)),
               _record("fixed_data_low_k", 1, "elastic", None, L(5.1, 4.1, 3.3)),   # -0.1, -0.1, +0.1
               _record("fixed_data_low_k", 2, "elastic", None, L(5.1, 4.6, 3.2))]   # -0.3, +0.2, -0.2
    v = comparison(spec, records)["variants"]
    assert v["against"] == {"fixed_data": "elastic", "fixed_data_low_k": "fixed_data"}
    low = v["by_variant"]["fixed_data_low_k"]["valid"]
    # Against fixed_data, not against the first elastic model (which it would beat on seed 1 by 0.1).
    assert low["per_seed"] == {"1": pytest.approx(-0.1 / 3), "2": pytest.approx(-0.1)}
    assert low["by_k"]["1"]["per_seed"] == {"1": pytest.approx(-0.1), "2": pytest.approx(-0.3)}
    assert low["by_k"]["1"]["better_on_every_seed"] is True
    assert low["by_k"]["2"]["better_on_every_seed"] is False and low["by_k"]["4"]["better_on_every_seed"] is False
    assert low["by_k"]["2"]["mean"] == pytest.approx(0.05) and low["by_k"]["4"]["mean"] == pytest.approx(-0.05)
    text = markdown(comparison(spec, records))
    assert ("| fixed_data_low_k | fixed_data | valid | 2 | -0.2000 ± 0.1414 | +0.0500 ± 0.2121 | -0.0500 ± 0.2121 "
            "| k=1 |") in text
    # It is not listed again among the variants read against the first elastic model.
    first_table = text.split("Elastic variants against elastic")[1].split("against the member they change")[0]
    assert "| fixed_data | valid |" in first_table and "fixed_data_low_k" not in first_table
    # Its reference without an evaluated run: no comparison yet, and no error.
    records = [r for r in records if r["member"] != "fixed_data"]
    assert "fixed_data_low_k" not in comparison(spec, records)["variants"]["by_variant"]


def test_variants_over_other_ks_share_one_table_in_the_order_of_k():
    from mmoe_megatron.evaluation.compare import comparison, markdown
    from mmoe_megatron.evaluation.suite import EvalSpec, MemberSpec, SuiteSpec

    spec = SuiteSpec(name="s", base="b", seeds=[1], eval=EvalSpec(), members=[
        MemberSpec("elastic", "elastic"), MemberSpec("base", "elastic"),
        MemberSpec("low_k", "elastic", variant_of="base"),
        MemberSpec("ks3", "elastic"), MemberSpec("ks3_low_k", "elastic", variant_of="ks3")])
    four = {"1": 5.0, "2": 4.0, "3": 3.5, "4": 3.0}
    records = [_record("elastic", 1, "elastic", None, {1.0: {"valid": four}}),
               _record("base", 1, "elastic", None, {1.0: {"valid": four}}),
               _record("low_k", 1, "elastic", None, {1.0: {"valid": {k: v - 0.1 for k, v in four.items()}}}),
               _record("ks3", 1, "elastic", None, {1.0: {"valid": four}}, trained_ks=(1, 2, 3, 4)),
               _record("ks3_low_k", 1, "elastic", None, {1.0: {"valid": {k: v + 0.1 for k, v in four.items()}}},
                       trained_ks=(1, 2, 3, 4))]
    text = markdown(comparison(spec, records))
    table = text.split("against the member they change")[1]
    # k = 3, trained by the second pair only, takes its place between 2 and 4, not after 4.
    assert "| variant | against | domain | seeds | k=1 | k=2 | k=3 | k=4 |" in table
    assert "| low_k | base | valid | 1 | -0.1000 | -0.1000 |  | -0.1000 |" in table
    assert "| ks3_low_k | ks3 | valid | 1 | +0.1000 | +0.1000 | +0.1000 | +0.1000 |" in table

def test_variant_of_must_name_another_elastic_member(tmp_path):
    from mmoe_megatron.config import ConfigError
    from mmoe_megatron.evaluation.suite import load_suite

    def suite(role, variant_of):
        path = tmp_path / "suite.yaml"
        path.write_text(yaml.safe_dump({
            "name": "v", "base": os.path.join(ROOT, "configs", "tiny.yaml"),
            "overrides": {"model.vocab_size": 512, "data.mock": True},
            "members": [{"name": "elastic", "role": "elastic"},
                        {"name": "k2", "role": "specialist",
                         "overrides": {"matryoshka.strategy": "fixed", "matryoshka.ks": [2]}},
                        {"name": "other", "role": role, "variant_of": variant_of,
                         **({"overrides": {"matryoshka.strategy": "fixed", "matryoshka.ks": [4]}}
                            if role == "specialist" else {})}]}))
        return str(path)

    assert load_suite(suite("elastic", "elastic")).members[2].variant_of == "elastic"
    for role, target in (("elastic", "k2"), ("elastic", "nope"), ("elastic", "other"), ("specialist", "elastic")):
        with pytest.raises(ConfigError, match=r"members\[2\]\.variant_of.*elastic members: \['elastic'"):
            load_suite(suite(role, target))


def test_learned_temperatures_are_read_from_weights_and_reported_per_k():
    from mmoe_megatron.evaluation.compare import comparison, markdown
    from mmoe_megatron.evaluation.suite import EvalSpec, MemberSpec, SuiteSpec
    from mmoe_megatron.export.qwen3_moe import ExportError, gate_gains, gate_temperatures

    # MoE layers 0 and 1 of two (given in reverse order), trained ks 1, 2, 4.
    cfg = tiny_config(**{"model.num_layers": 2, "matryoshka.ks": [1, 2, 4],
                         "matryoshka.gate_temperature": "learned"})
    sd = {"decoder.layers.1.mlp.router.log_temperature": torch.log(torch.tensor([1.0, 0.5, 0.25])),
          "decoder.layers.0.mlp.router.log_temperature": torch.log(torch.tensor([1.0, 0.8, 0.4])),
          "decoder.layers.0.mlp.router.weight": torch.zeros(4, 8)}
    temps = gate_temperatures(cfg, sd)
    assert temps.keys() == {"1", "2", "4"}
    assert temps["2"] == pytest.approx([0.8, 0.5]) and temps["4"] == pytest.approx([0.4, 0.25])
    gained = tiny_config(**{"model.num_layers": 2, "matryoshka.ks": [1, 2, 4], "matryoshka.gate_gain": "learned"})
    gains = {"decoder.layers.0.mlp.router.log_gain": torch.log(torch.tensor([1.0, 1.5, 2.0])),
             "decoder.layers.1.mlp.router.log_gain": torch.log(torch.tensor([1.0, 1.2, 3.0]))}
    by_k = gate_gains(gained, gains)
    assert by_k.keys() == {"1", "2", "4"}
    assert by_k["1"] == pytest.approx([1.0, 1.0]) and by_k["2"] == pytest.approx([1.5, 1.2])
    assert by_k["4"] == pytest.approx([2.0, 3.0])
    assert gate_gains(cfg, sd) == {}
    with pytest.raises(ExportError, match="decoder.layers.1.mlp.router.log_gain"):
        gate_gains(gained, {k: v for k, v in gains.items() if ".1." not in k})
    # A model trained with a floor reports (and exports) the temperatures its routers applied.
    floored = tiny_config(**{"model.num_layers": 2, "matryoshka.ks": [1, 2, 4],
                             "matryoshka.gate_temperature": "learned", "matryoshka.gate_temperature_floor": 0.3})
    assert gate_temperatures(floored, sd)["4"] == pytest.approx([0.4, 0.3])
    plain = tiny_config(**{"model.num_layers": 2, "matryoshka.ks": [1, 2, 4], "matryoshka.gate_temperature": "none"})
    assert gate_temperatures(plain, {"decoder.layers.0.mlp.router.weight": torch.zeros(4, 8)}) == {}
    with pytest.raises(ExportError, match="decoder.layers.1.mlp.router.log_temperature"):
        gate_temperatures(cfg, {k: v for k, v in sd.items() if not k.startswith("decoder.layers.1.")})

    spec = SuiteSpec(name="s", base="b", seeds=[1, 2], eval=EvalSpec(), members=[
        MemberSpec("elastic", "elastic"), MemberSpec("temperature", "elastic")])
    losses = {1.0: {"valid": {"1": 5.0, "2": 4.9, "4": 4.8}}}
    records = [_record("elastic", s, "elastic", None, losses) for s in (1, 2)]
    records += [dict(_record("temperature", 1, "elastic", None, losses), learned_temperatures=temps),
                dict(_record("temperature", 2, "elastic", None, losses),
                     learned_temperatures={"1": [1.0, 1.0], "2": [0.7, 0.6], "4": [0.3, 0.35]})]
    data = comparison(spec, records)
    assert list(data["temperatures"]) == ["temperature"]
    k4 = data["temperatures"]["temperature"]["4"]
    # Layer means per seed: 0.325 and 0.325; layers range from 0.25 to 0.4.
    assert k4["mean"] == pytest.approx(0.325) and k4["std"] == pytest.approx(0.0, abs=1e-6)
    assert (k4["lowest"], k4["highest"]) == (pytest.approx(0.25), pytest.approx(0.4))
    assert "| temperature | 2 | 1.000 ± 0.000 (1.00-1.00) | 0.650 ± 0.000 (0.50-0.80) | 0.325 ± 0.000 (0.25-0.40) |" \
        in markdown(data)
    assert data["gains"] == {} and "Learned gate gains" not in markdown(data)
    # Gains are summarised the same way, in their own table (seed layer means 1.75 and 2.25 at k = 4).
    records[2]["learned_gains"] = by_k
    records[3]["learned_gains"] = {"1": [1.0, 1.0], "2": [1.0, 1.0], "4": [2.0, 2.5]}
    data = comparison(spec, records)
    assert list(data["gains"]) == ["temperature"]
    assert data["gains"]["temperature"]["4"]["mean"] == pytest.approx(2.375)
    assert "| temperature | 2 | 1.000 ± 0.000 (1.00-1.00) | 1.175 ± 0.247 (1.00-1.50) | 2.375 ± 0.177 (2.00-3.00) |" \
        in markdown(data).split("Learned gate gains")[1]


def test_equal_compute_member_trains_for_the_reference_flops(tmp_path):
    from mmoe_megatron.config.derive import flops_per_token
    from mmoe_megatron.evaluation.suite import load_suite, member_config

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ec", "base": os.path.join(ROOT, "configs", "tiny.yaml"), "seeds": [3],
        "overrides": {"model.vocab_size": 512, "data.mock": True, "train.train_iters": 400, "optimizer.warmup_iters": 10,
                      "matryoshka.ks": [1, 2, 4, 8], "matryoshka.widths": [1.0]},  # every k at full width
        "eval": {"fractions": [0.25, 1.0]},
        "members": [{"name": "elastic", "role": "elastic"},
                    {"name": "distill", "role": "elastic", "equal_compute_to": "elastic",
                     "overrides": {"matryoshka.distill_coeff": 0.5}}]}))
    spec = load_suite(str(path))
    base = member_config(spec, spec.members[0], 3)
    distill = member_config(spec, spec.members[1], 3)
    f = {k: flops_per_token(base, 512, k) for k in (1, 2, 4, 8)}
    student = 3 * sum(f.values()) / 4
    assert distill.train.train_iters == int(400 * student // (student + f[8]))
    assert distill.train.seed == base.train.seed == 3
    assert base.checkpoint.keep_steps == [100]
    assert distill.checkpoint.keep_steps == [round(0.25 * distill.train.train_iters)]


def _shared_suite(tmp_path, **elastic_init):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({
        "name": "sh", "base": os.path.join(ROOT, "configs", "tiny.yaml"), "seeds": [1, 2],
        "overrides": {"model.vocab_size": 512, "data.mock": True},
        "members": [{"name": "elastic", "role": "elastic"},
                    {"name": "k2", "role": "specialist",
                     "overrides": {"matryoshka.strategy": "fixed", "matryoshka.ks": [2]}},
                    {"name": "elastic_init", "role": "elastic", "same_runs_as": "elastic",
                     "overrides": {"data.seed": 1, "matryoshka.seed": 1}, **elastic_init}]}))
    return str(path)


def test_a_member_sharing_with_a_sharing_member_gets_the_run_that_trained(tmp_path):
    """c shares b's runs and b seed 1 shares a's: c's seed 1 is a's run, its seed 2 b's own."""
    from mmoe_megatron.evaluation.suite import load_suite, with_shared_runs

    path = tmp_path / "chain.yaml"
    init = {"data.seed": 1, "matryoshka.seed": 1}
    path.write_text(yaml.safe_dump({
        "name": "chain", "base": os.path.join(ROOT, "configs", "tiny.yaml"), "seeds": [1, 2],
        "overrides": {"model.vocab_size": 512, "data.mock": True},
        "members": [{"name": "elastic", "role": "elastic"},
                    {"name": "elastic_init", "role": "elastic", "same_runs_as": "elastic", "overrides": init},
                    {"name": "elastic_init_again", "role": "elastic", "same_runs_as": "elastic_init",
                     "overrides": init}]}))
    spec = load_suite(str(path))
    records = [_record("elastic", s, "elastic", None, {1.0: {"valid": {"1": 5.0 + s}}}) for s in (1, 2)]
    records.append(_record("elastic_init", 2, "elastic", None, {1.0: {"valid": {"1": 9.0}}}))
    out = {(r["member"], r["seed"]): r for r in with_shared_runs(spec, records)}
    assert sorted(out) == sorted((m, s) for m in ("elastic", "elastic_init", "elastic_init_again") for s in (1, 2))
    assert out[("elastic_init_again", 1)]["losses"] == records[0]["losses"]
    assert out[("elastic_init_again", 1)]["same_run_as"] == "elastic/seed1"
    assert out[("elastic_init_again", 2)]["losses"] == records[2]["losses"]
    assert out[("elastic_init_again", 2)]["same_run_as"] == "elastic_init/seed2"


def test_a_member_shares_exactly_the_runs_that_train_the_same(tmp_path, capsys):
    from mmoe_megatron.evaluation.suite import Run, load_suite, own_runs, runs, shared_run, with_shared_runs

    spec = load_suite(_shared_suite(tmp_path))
    elastic, _, init = spec.members
    # Seed 1 resolves data.seed and matryoshka.seed to 1 either way; seed 2 trains other tokens.
    assert shared_run(spec, Run(init, 1)) == Run(elastic, 1)
    assert shared_run(spec, Run(init, 2)) is None
    assert shared_run(spec, Run(elastic, 1)) is None
    assert own_runs(spec, runs(spec)) == [r for r in runs(spec) if r != Run(init, 1)]
    assert "elastic_init/seed1 trains exactly what elastic/seed1 trains" in capsys.readouterr().out
    records = [_record("elastic", s, "elastic", None, {1.0: {"valid": {"1": 5.0 + s}}}) for s in (1, 2)]
    out = with_shared_runs(spec, records)
    assert len(out) == 3 and out[:2] == records
    assert out[2]["member"] == "elastic_init" and out[2]["seed"] == 1 and out[2]["same_run_as"] == "elastic/seed1"
    assert out[2]["losses"] == records[0]["losses"]
    # The member's own result, once it exists, is used instead.
    own = _record("elastic_init", 1, "elastic", None, {1.0: {"valid": {"1": 9.0}}})
    assert with_shared_runs(spec, records + [own])[2:] == [own]
    # Any other difference in what trains (here the number of steps) means no sharing.
    other = load_suite(_shared_suite(tmp_path, overrides={"data.seed": 1, "matryoshka.seed": 1,
                                                          "train.train_iters": 70}))
    assert shared_run(other, Run(other.members[2], 1)) is None
    assert len(with_shared_runs(other, records)) == 2
    # A fixed init seed equal to the run's train.seed trains the same weights: shared too.
    init = load_suite(_shared_suite(tmp_path, overrides={"data.seed": 1, "model.init_seed": 1}))
    assert shared_run(init, Run(init.members[2], 1)) == Run(init.members[0], 1)
    assert shared_run(init, Run(init.members[2], 2)) is None


def test_same_runs_as_names_a_member_listed_before(tmp_path):
    from mmoe_megatron.config import ConfigError
    from mmoe_megatron.evaluation.suite import load_suite

    for name in ("nope", "elastic_init"):
        with pytest.raises(ConfigError, match=rf"members\[2\]\.same_runs_as.*no member '{name}' listed before"):
            load_suite(_shared_suite(tmp_path, same_runs_as=name))


def test_data_seed_fixes_the_samples_whatever_the_train_seed(single_process_mcore, small_tokenizer, small_datasets,
                                                             tmp_path):
    from mmoe_megatron.data import build_datasets

    def first_valid(train_seed, data_seed):
        cfg = data_config(tmp_path / f"{train_seed}-{data_seed}", small_tokenizer,
                          [(small_datasets["sonnets"][0], 1.0)], **{
                              "data.seq_length": 32, "data.split": "80,20,0", "train.seed": train_seed,
                              "data.seed": data_seed})
        return torch.as_tensor(build_datasets(cfg, 4, 8, 0)[1][0]["tokens"])

    assert torch.equal(first_valid(1, 7), first_valid(2, 7))
    assert not torch.equal(first_valid(1, None), first_valid(2, None))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "bench", "suites", "*.yaml"))),
                         ids=os.path.basename)
def test_every_shipped_suite_loads_with_valid_member_configs(path, monkeypatch):
    # A suite is read when its benchmark starts, and each run's config only when that run trains:
    # a typo in the last member of a ladder would surface hours in. load_suite builds every run's
    # config, so one that does not validate fails here. Equal-compute members and FLOPs budgets
    # need the vocabulary size, which comes from the demo tokenizer that a fresh checkout has not
    # built yet: its size is taken from the setting that builds it.
    from mmoe_megatron.data.demo import DEMO_VOCAB_SIZE
    from mmoe_megatron.evaluation import suite
    from mmoe_megatron.evaluation.suite import load_suite, runs

    monkeypatch.setattr(suite, "_vocab_size", lambda cfg: DEMO_VOCAB_SIZE)

    spec = load_suite(path)
    assert any(m.role == "elastic" for m in spec.members)
    assert len(runs(spec)) >= len(spec.members)


def test_code_version_is_dirty_for_code_changes_not_for_rewritten_results(tmp_path):
    from mmoe_megatron.evaluation.suite import code_version

    repo = str(tmp_path)
    git = ["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t"]
    os.makedirs(tmp_path / "bench" / "results")
    for name in ("model.py", "RESULTS.md", "bench/results/run.json"):
        (tmp_path / name).write_text("v1\n")
    subprocess.run(["git", "init", "-q", repo], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "v1"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert code_version(repo) == head[:12]
    # A benchmark rewrites its results: the code is what it was.
    (tmp_path / "RESULTS.md").write_text("v2\n")
    (tmp_path / "bench" / "results" / "run.json").write_text("v2\n")
    (tmp_path / "untracked.py").write_text("x\n")
    assert code_version(repo) == head[:12]
    assert code_version(str(tmp_path / "bench")) == head[:12]  # from inside the checkout too
    (tmp_path / "model.py").write_text("v2\n")
    assert code_version(repo) == head[:12] + "+dirty"
    assert code_version(str(tmp_path / "bench")) == head[:12] + "+dirty"
    assert code_version(str(tmp_path / "nowhere")) == "unknown"


def test_provenance_names_the_instruction_set_torch_runs_on():
    from mmoe_megatron.evaluation.compare import machine_label
    from mmoe_megatron.evaluation.suite import provenance

    launch = provenance()
    assert launch["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine_label({"cpu": "AMD EPYC", "cpu_capability": "AVX512"}) == "AMD EPYC (AVX512)"
    assert machine_label({"cpu": "AMD EPYC"}) == "AMD EPYC"  # records from before it was kept
    assert machine_label({"cpu": "Intel Xeon", "cpu_capability": "AVX512",
                          "cpu_id": "family 6 model 143 stepping 8"}) == "Intel Xeon (AVX512, family 6 model 143 stepping 8)"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":")[1].strip() for line in f if line.startswith("model\t"))
        assert launch["cpu_id"].startswith("family ") and f" model {model} " in launch["cpu_id"]
        assert set(launch["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile"}
        if launch["cpu_capability"] == "AVX512":
            assert "avx512f" in launch["cpu_flags"]
    # A run on a GPU is told apart by its GPU (its host CPU hardly touches the arithmetic).
    assert machine_label({"cpu": "Intel Xeon", "cpu_capability": "AVX512", "gpu": "NVIDIA H200"}) == "NVIDIA H200 (GPU)"


def test_a_launch_records_the_thread_count_its_processes_inherit(monkeypatch):
    from bench.suite_bench import threads_per_process
    from mmoe_megatron.evaluation.suite import provenance

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert provenance()["omp_num_threads"] == "3"
    assert threads_per_process(2) == 3  # the caller's setting wins over sharing out the cores
    assert threads_per_process(2, threads=5) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert "omp_num_threads" not in provenance()
    # Unset, the cores are shared out, at least one thread each (torchrun alone would give a single
    # process every core and each of several processes one thread).
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert (threads_per_process(1), threads_per_process(2), threads_per_process(16)) == (8, 4, 1)


def test_a_report_figure_tells_every_model_apart_and_lists_it_below_the_panels(tmp_path, monkeypatch):
    """21 models (a rung's members): no two share a colour and line style, and the legend holds
    every model and lies below both panels, where it covers no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmoe_megatron.evaluation.report import plot, series_style

    styles = [series_style(i, 21) for i in range(21)]
    assert len({(tuple(s["color"]), s["linestyle"]) for s in styles}) == 21
    assert series_style(3, 4)["color"] == matplotlib.colormaps["tab10"](3)  # few models: the usual colours

    from mmoe_megatron.evaluation.core import EvalPoint

    series = {f"member_{i}": [EvalPoint(k=k, loss=4.0 - 0.01 * i - 0.001 * k, tokens=100, active_params=1000 * k,
                                        flops_per_token=1e6 * k) for k in (1, 2, 4)] for i in range(21)}
    captured = {}
    real_savefig = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        captured["legend"] = [t.get_text() for t in fig.legends[0].get_texts()]
        captured["legend_top"] = fig.legends[0].get_window_extent().y1
        captured["axes_bottom"] = min(ax.get_window_extent().y0 for ax in fig.axes)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    plot(series, str(tmp_path / "fig.png"))
    assert captured["legend"] == list(series)
    assert captured["legend_top"] < captured["axes_bottom"]
    assert (tmp_path / "fig.png").stat().st_size > 0
