"""Runs in the serving venv (vLLM): start offline engines one after another and record, for each,
the log-probability of every prompt token and a greedy continuation with its log-probabilities.

    .venv-serving/bin/python tests/vllm_worker.py SPEC.json OUT.json

SPEC: {"model": DIR, "prompts": [[token ids], ...], "max_tokens": N,
       "engines": [{"name": str, "hf_overrides": {...}, "expect_error": bool}, ...]}
OUT:  {name: {"prompt_logprobs": [[float per prompt token after the first]], "generated": [[ids]],
              "generated_logprobs": [[float]]}  or  {"error": "Type: message"}}
The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that an error raised while
it starts arrives here as the exception itself.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def run_engine(spec: dict, engine: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=spec.get("max_model_len"),
              enforce_eager=True, seed=0, hf_overrides=engine.get("hf_overrides") or None)
    ready = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], prompt_logprobs=0, logprobs=0,
                            ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]], params)
    result = {"prompt_logprobs": [], "generated": [], "generated_logprobs": [],
              "seconds": {"start": ready - start, "generate": time.perf_counter() - ready}}
    for ids, out in zip(spec["prompts"], outputs):
        # prompt_logprobs[i] maps token id -> Logprob for prompt position i (None for the first).
        result["prompt_logprobs"].append([out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(ids) if i > 0])
        completion = out.outputs[0]
        result["generated"].append(list(completion.token_ids))
        result["generated_logprobs"].append(
            [step[tok].logprob for step, tok in zip(completion.logprobs, completion.token_ids)])
    del llm
    gc.collect()
    return result


def main(spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    out = {}
    for engine in spec["engines"]:
        try:
            out[engine["name"]] = run_engine(spec, engine)
        except Exception as e:  # noqa: BLE001 - the test judges the error
            if not engine.get("expect_error"):
                raise
            out[engine["name"]] = {"error": f"{type(e).__name__}: {e}"}
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
