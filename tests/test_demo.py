"""The README's main command, `python -m tools.demo`, end to end on small local data: train with
expert parallelism 2 through the torchrun launcher, evaluate at several k, search budgets, export.
(The corpus preparation step it skips here is tested offline in test_data_corpus.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.data_fixtures import small_datasets, small_run_config, small_tokenizer  # noqa: F401
from tests.dist import free_port
from tests.helpers import ROOT


@pytest.mark.slow
def test_demo_trains_evaluates_searches_budgets_and_exports(tmp_path, small_run_config):
    config = small_run_config
    run, out = str(tmp_path / "run"), str(tmp_path / "export")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    env.pop("PYTHON", None)  # the demo must hand its own interpreter to the launcher
    proc = subprocess.run([sys.executable, "-m", "tools.demo", "--skip-data", "--config", config,
                           "--iters", "4", "--run", run, "--out", out], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(os.path.join(run, "eval", "eval.json")) as f:
        results = json.load(f)["results"]
    labels = [r["label"] for r in results]
    assert labels[:6] == ["1", "2", "3", "4", "6", "8"] and "[1,2,3,4]" in labels
    for r in results:  # what the demo printed is what the evaluation computed
        assert f"loss {r['loss']:.4f}" in proc.stdout
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    assert hf["architectures"] == ["Qwen3MoeForCausalLM"] and hf["num_experts_per_tok"] == 2
    # The demo's model is one vLLM's CPU attention runs (the tiny shape is served in test_serving_engines.py).
    from mmoe_megatron.export.engines import VLLM_CPU_HEAD_SIZES

    assert hf["head_dim"] in VLLM_CPU_HEAD_SIZES
    with open(os.path.join(run, "budgets.json")) as f:
        assert json.load(f)
