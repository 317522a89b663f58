"""Runs in the serving venv (vLLM): time one offline engine per routing setting on a fixed batch.

    .venv-serving/bin/python bench/serving_worker.py SPEC.json OUT.json

SPEC: {"model": DIR, "dtype": str, "prompts": [[ids], ...], "new_tokens": N, "repeats": R,
       "engines": [{"name": str, "hf_overrides": {...}}, ...]}
For each engine: start it, warm it up on a few prompts, then R times submit the whole batch at once
(greedy, exactly N new tokens per prompt) and record the wall time, output tokens/s and each
request's time to first token (vLLM's own per-request measurement, from arrival to first token).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def time_engine(spec: dict, engine: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], skip_tokenizer_init=True, enforce_eager=True, seed=0,
              max_num_seqs=len(spec["prompts"]), disable_log_stats=False,
              hf_overrides=engine.get("hf_overrides") or None)
    start_s = time.perf_counter() - started
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], min_tokens=spec["new_tokens"],
                            ignore_eos=True, detokenize=False)
    # Warm-up on the whole batch (2 new tokens): the kernels meet every shape the timed runs use.
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, detokenize=False)
    llm.generate(prompts, warm, use_tqdm=False)
    runs = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        ttft = [o.metrics.first_token_latency for o in outputs if o.metrics is not None]
        runs.append({"seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
                     "ttft_median_s": statistics.median(ttft) if ttft else None,
                     "ttft_max_s": max(ttft) if ttft else None})
    del llm
    gc.collect()
    return {"engine_start_s": start_s, "runs": runs}


def main(spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    out = {}
    for engine in spec["engines"]:
        out[engine["name"]] = time_engine(spec, engine)
        print(engine["name"], json.dumps(out[engine["name"]]), flush=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
