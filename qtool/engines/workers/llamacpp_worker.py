"""llama.cpp worker (llama-cpp-python): load a GGUF, greedy tokens, speed. See __init__.

Job keys as in vllm_worker, plus windows / scored_from (token perplexity from llama.cpp's logits,
qtool's windows). llama-cpp-python's Llama decodes one sequence, so batch sizes above 1
are reported as not measured (batched decode is llama.cpp's server, not this API). Each timed run
starts from an empty KV cache (reset), so the prompt is prefilled every time.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    import llama_cpp
    from _timing import speed_entry

    threads = job.get("threads") or max(1, (os.cpu_count() or 2) - 1)  # like vLLM: leave a core to the host
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=job["max_model_len"], n_threads=threads,
                          n_threads_batch=threads, n_batch=512, seed=0, verbose=False)

    def greedy(prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """Tokens, seconds to the first new token, seconds to all of them."""
        llm.reset()
        start = time.perf_counter()
        tokens, first = [], 0.0
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if len(tokens) == 1:
                first = time.perf_counter() - start
            if len(tokens) == new_tokens:
                break
        return tokens, first, time.perf_counter() - start

    info = llama_cpp.llama_print_system_info()
    features = [f.split("=")[0].replace("CPU :", "").strip() for f in (info.decode() if isinstance(info, bytes) else info).split("|")
                if f.strip().endswith("= 1")]
    result = {
        "engine": "llamacpp", "version": llama_cpp.__version__, "device": "cpu", "dtype": "gguf",
        "quantization": "gguf", "threads": threads, "mode": "llama.cpp graph", "kernel": "ggml-cpu (" + ", ".join(features) + ")",
        "tokens": [greedy(p, job["new_tokens"])[0] for p in job["prompts"]], "speed": [],
    }
    if job.get("windows"):
        result["perplexity"] = perplexity(job, threads)
    speed = job.get("speed")
    if speed:
        ids, n = speed["prompt_ids"], speed["new_tokens"]
        for batch in speed["batch"]:
            if batch != 1:
                result["speed"].append({"batch": batch, "not_measured": "llama-cpp-python decodes one sequence; "
                                        "batched decode is llama.cpp's server"})
                continue
            greedy(ids, n)  # warm-up
            runs = [greedy(ids, n)[1:] for _ in range(speed["repeats"])]
            result["speed"].append(speed_entry(1, len(ids), n, [f for f, _ in runs], [t for _, t in runs]))
    with open(sys.argv[2], "w") as fh:
        json.dump(result, fh)
    # The result is written: leave now. An engine's teardown at interpreter exit can hang (vLLM's
    # once did, for minutes, after its workers had exited); qtool then stops what is left of the tree.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def perplexity(job: dict, threads: int) -> dict:
    """Summed next-token NLL (nats) over each window's scored positions, from llama.cpp's logits.

    windows[i] is a token list evaluated from an empty cache; positions scored_from[i] .. end are
    scored (each predicted from the tokens before it), as qtool.evaluate.perplexity plans them.
    """
    import math

    import llama_cpp
    import numpy as np

    ctx = max(len(w) for w in job["windows"])
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=ctx, n_ubatch=ctx, logits_all=True, seed=0, verbose=False)
    nll, count = 0.0, 0
    for window, first in zip(job["windows"], job["scored_from"], strict=True):
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)  # row t predicts token t + 1
        targets = np.asarray(window[max(first, 1):])
        rows = logits[max(first, 1) - 1:]
        top = rows.max(axis=1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(rows - top).sum(axis=1)))
        nll += float((logz - rows[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return {"nll": nll, "tokens_scored": count, "ppl": math.exp(nll / count), "ctx": ctx}


if __name__ == "__main__":
    main()
