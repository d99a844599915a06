"""vLLM worker: load a checkpoint in vLLM (CPU build or CUDA), greedy tokens, speed. See __init__.

Job keys: model, prompts (token id lists), new_tokens, dtype ("auto", "bfloat16", ...),
max_model_len, threads (None: vLLM's default), compile (vLLM's torch.compile or eager), speed (None or {batch, prompt_ids, new_tokens,
repeats}), windows / scored_from (token perplexity from vLLM's prompt log-probs on qtool's windows). Speed per batch size: one warm-up, then per repeat a 1-token run (time to first token,
prefill) and a new_tokens run with ignore_eos; prefix caching is off so every run prefills.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    if job.get("threads"):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{job['threads'] - 1}"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is sized for large models
    import vllm
    from _timing import speed_entry, timed
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    # compile: vLLM's default (torch.compile with inductor on CPU: minutes of warm-up, the deployed
    # speed); otherwise eager PyTorch, enough for tokens.
    compilation = {} if job.get("compile") else {"compilation_config": {"mode": 0}}
    llm = LLM(model=job["model"], dtype=job.get("dtype") or "auto", max_model_len=job["max_model_len"], seed=0,
              enable_prefix_caching=False, **compilation, max_num_seqs=max([8, *((job.get("speed") or {}).get("batch") or [])]))
    config = llm.llm_engine.model_config

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    result = {
        "engine": "vllm", "version": vllm.__version__, "device": current_platform.device_type,
        "dtype": str(config.dtype).removeprefix("torch."), "quantization": config.quantization,
        "threads": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "mode": "torch.compile (vLLM default)" if job.get("compile") else "eager (compilation off)",
        "tokens": generate(job["prompts"], job["new_tokens"]) if job["prompts"] else [], "speed": [],
    }
    if job.get("windows"):
        result["perplexity"] = perplexity(llm, job)
    speed = job.get("speed")
    if speed:
        ids, n = speed["prompt_ids"], speed["new_tokens"]
        for batch in speed["batch"]:
            generate([ids] * batch, n)  # warm-up
            first, total = [], []
            for _ in range(speed["repeats"]):
                prompts = [ids] * batch
                first.append(timed(lambda p=prompts: generate(p, 1))[0])
                total.append(timed(lambda p=prompts: generate(p, n))[0])
            result["speed"].append(speed_entry(batch, len(ids), n, first, total))
    with open(sys.argv[2], "w") as fh:
        json.dump(result, fh)
    # The result is written: leave now. An engine's teardown at interpreter exit can hang (vLLM's
    # once did, for minutes, after its workers had exited); qtool then stops what is left of the tree.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def perplexity(llm, job: dict) -> dict:
    """Summed next-token NLL (nats) over each window's scored positions, from vLLM's prompt log-probs
    (SamplingParams.prompt_logprobs=0: the log-prob of each prompt token given the ones before it).

    windows[i] is a token list evaluated from an empty cache (prefix caching is off); positions
    scored_from[i] .. end are scored, as qtool.evaluate.perplexity plans them.
    """
    import math

    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": w} for w in job["windows"]], params, use_tqdm=False)
    nll, count = 0.0, 0
    for out, window, first in zip(outs, job["windows"], job["scored_from"], strict=True):
        for position in range(max(first, 1), len(window)):
            nll -= out.prompt_logprobs[position][window[position]].logprob
            count += 1
    return {"nll": nll, "tokens_scored": count, "ppl": math.exp(nll / count),
            "ctx": max(len(w) for w in job["windows"])}


if __name__ == "__main__":  # vLLM spawns processes that re-import this file
    main()
