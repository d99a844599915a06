"""Sequential vs distributed `qtool compare`: the same 4 cheap cells on SmolLM2-135M, in one run.

Runs `qtool compare RECIPE --out OUT/seq` (all cells in one process, the base loaded once, torch's
default threads = this machine's cores) and then `qtool compare RECIPE --out OUT/dist --workers 2`
(each cell a submitit job: a fresh process that imports qtool, loads the base and runs its cell
with cores/2 torch threads). Both are timed as a user sees them: the whole command, from process
start to the written report. Then every cell's numbers (perplexity, KL, sizes: the record minus
timings, peak memory and who ran it) are compared for equality, and the machine's load before and
after each run is recorded (the machine is shared; a busy neighbour slows either run).

Writes REPORT/distributed-compare.json (times, ratio, equality, threads, load, versions).
Usage: python benchmarks/distributed_compare.py [--max-tokens 4096] [--report reports/distributed-compare]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt"
CELLS = """\
    - {method: rtn, bits: [4, 3], group_size: 64}
    - {method: hqq, bits: 4, group_size: 64}
    - {method: eetq, bits: 8}
"""
VOLATILE = {"seconds", "started_utc", "worker", "timings_s", "peak_memory_mib", "quantization_cost", "versions"}


def numbers(record: dict) -> dict:
    """A record without what may differ between two runs of the same cell (timings, memory, worker)."""
    if isinstance(record, dict):
        return {k: numbers(v) for k, v in record.items() if k not in VOLATILE}
    if isinstance(record, list):
        return [numbers(v) for v in record]
    return record


def load() -> dict:
    one, five, fifteen = os.getloadavg()
    top = subprocess.run(["top", "-bn1"], capture_output=True, text=True).stdout.splitlines()
    busy = [line for line in top[7:12] if line.split() and not line.split()[8].startswith("0.0")]
    return {"loadavg_1_5_15": [one, five, fifteen], "top_processes": busy}


def run(recipe: Path, out: Path, extra: list[str]) -> dict:
    before = load()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qtool.cli", "compare", str(recipe), "--out", str(out), "--quiet",
                           *extra], capture_output=True, text=True, cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"qtool compare {' '.join(extra)} failed:\n{proc.stderr}")
    results = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        results[record["cell"]] = record
    return {"seconds": round(seconds, 1), "load_before": before, "load_after": load(), "log": proc.stderr.splitlines(),
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens per cell (ctx 512 windows)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "distributed-compare")
    args = parser.parse_args()

    import submitit
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "compare.yaml"
        recipe.write_text(f"""\
compare:
  name: distributed-benchmark
  model: smollm2-135m
  device: cpu
  seed: 0
  eval: {{text: {TEXT}, ctx: 512, max_tokens: {args.max_tokens}, kl: true}}
  cells:
{CELLS}""")
        subprocess.run([sys.executable, "-c", "from qtool import api; api.load('smollm2-135m', device='cpu')"],
                       capture_output=True, cwd=REPO)  # the GGUF's converted folder and the page cache, for both runs
        sequential = run(recipe, Path(tmp) / "seq", [])
        distributed = run(recipe, Path(tmp) / "dist", ["--workers", str(args.workers)])
        shutil.rmtree(Path(tmp) / "seq" / "models", ignore_errors=True)

    seq, dist = sequential.pop("results"), distributed.pop("results")
    differing = sorted(cell for cell in seq if numbers(seq[cell]) != numbers(dist.get(cell, {})))
    report = {
        "what": "qtool compare of the same recipe, sequential (one process) then --workers "
                f"{args.workers} (local submitit jobs), one after the other in one run",
        "recipe": {"model": "smollm2-135m", "text": str(TEXT.relative_to(REPO.parent)), "ctx": 512,
                   "max_tokens": args.max_tokens, "kl": True, "cells": list(seq)},
        "sequential_s": sequential["seconds"], "distributed_s": distributed["seconds"],
        "ratio": round(distributed["seconds"] / sequential["seconds"], 3),
        "target_ratio": 0.65,
        "identical_numbers": not differing, "differing_cells": differing,
        "threads": {"sequential": sorted({r["worker"]["threads"] for r in seq.values()}),
                    "per_worker": sorted({r["worker"]["threads"] for r in dist.values()})},
        "cell_seconds": {cell: {"sequential": seq[cell]["seconds"], "distributed": dist[cell]["seconds"]} for cell in seq},
        "workers": {cell: r["worker"] for cell, r in dist.items()},
        "sequential_run": sequential, "distributed_run": distributed,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "submitit": submitit.__version__},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.report.mkdir(parents=True, exist_ok=True)
    path = args.report / "distributed-compare.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"sequential {report['sequential_s']} s, {args.workers} workers {report['distributed_s']} s, "
          f"ratio {report['ratio']}, identical numbers: {report['identical_numbers']}; wrote {path}")


if __name__ == "__main__":
    main()
