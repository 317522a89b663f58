"""The suite end to end through its command line (train every member, evaluate all at every k,
compare), then the evaluation and budget-search commands on its elastic member."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.data_fixtures import data_config, small_datasets, small_tokenizer  # noqa: F401
from tests.dist import run_distributed
from tests.helpers import ROOT

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
        "name": "t", "base": str(tmp / "base.yaml"), "runs_dir": str(tmp / "runs"),
        "eval": {"ks": KS, "layer_ks": [[1, 2, 3, 4]], "num_samples": 16},
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


def _eval_json(suite, member):
    with open(os.path.join(suite["runs"], member, "eval", "eval.json")) as f:
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
    # Training compute: 3 x forward FLOPs at the expected k x tokens; k=1 < elastic (mean 2.5)
    assert rows["k1"]["training_flops"] < rows["k2"]["training_flops"] < rows["elastic"]["training_flops"]
    with open(os.path.join(suite["runs"], "report", "comparison.md")) as f:
        table = f.read()
    for row in rows.values():
        assert all(f"{v:.4f}" in table for v in row["loss"].values())
    with open(os.path.join(suite["runs"], "report", "comparison.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _reference(rank, world_size, run):
    """The elastic member's checkpoint evaluated here, independently of the suite's commands."""
    from mmoe_megatron import distributed
    from mmoe_megatron.data import build_datasets, resolve_vocab_size
    from mmoe_megatron.evaluation.run import latest_checkpoint, load_model, run_config
    from tests.test_evaluation import _reference_losses

    cfg = run_config(run)
    distributed.init_distributed(cfg)
    model = load_model(cfg, latest_checkpoint(cfg), resolve_vocab_size(cfg))
    dataset = build_datasets(cfg, train_samples=1, valid_samples=16, test_samples=0)[1]
    return _reference_losses(model, dataset, list(range(16)), KS + [[1, 2, 3, 4]])


def test_evaluated_losses_are_those_of_the_trained_checkpoint(suite):
    run = os.path.join(suite["runs"], "elastic")
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
    run = os.path.join(suite["runs"], "elastic")
    proc = _run(["mmoe_megatron.evaluation.budget", "--run", run, "--mean-k", "2", "--ks", "1,2,3,4",
                 "--num-samples", "8"])
    with open(os.path.join(run, "budgets.json")) as f:
        budgets = json.load(f)
    with open(os.path.join(run, "budget_search.json")) as f:
        details = json.load(f)["searches"]["mean_k=2"]
    assert sum(budgets["mean_k=2"]) <= 8 and len(budgets["mean_k=2"]) == 4
    assert details["layer_ks"] == budgets["mean_k=2"]
    assert details["loss"] <= details["uniform_loss"] and details["uniform_k"] == 2
    assert "mean_k=2" in proc.stdout
