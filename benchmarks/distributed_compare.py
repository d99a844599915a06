"""Sequential vs distributed `qtool compare`: the same 4 cheap cells on SmolLM2-135M, in one run.

Runs `qtool compare RECIPE` three times, one after the other: sequentially (all cells in one
process, the base loaded once) with torch's default threads (= this machine's cores) and with
`--threads 1`, then with `--workers 2` (each cell a submitit job: a fresh process that imports
qtool, loads the base and runs its cell with cores/2 torch threads). Each is timed as a user sees
it: the whole command, from process start to the written report; the ratio is taken against the
faster sequential run. Every cell's numbers (perplexity, KL, sizes: the record minus timings, peak
memory and who ran it) are compared with the sequential run of the same thread count (torch's
reductions may round differently with another thread count; those differences are listed too),
and the machine's load before and after each run is recorded (the machine is shared: a busy
neighbour slows any run, and under contention more processes get a larger share of the CPU).

Writes REPORT/distributed-compare.json (times, ratio, equality, threads, load, versions) and keeps
each run's results.jsonl and report in REPORT/sequential, REPORT/sequential-1-thread, REPORT/workers.
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


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Where two records' numbers differ: 'path: a != b' lines (relative difference for floats)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [line for k in sorted(set(a) | set(b)) for line in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [line for i, (x, y) in enumerate(zip(a, b, strict=True)) for line in differences(x, y, f"{path}[{i}]")]
    if a == b:
        return []
    if isinstance(a, float) and isinstance(b, float) and a:
        return [f"{path}: {a!r} != {b!r} (relative {abs(a - b) / abs(a):.1e})"]
    return [f"{path}: {a!r} != {b!r}"]


def load() -> dict:
    one, five, fifteen = os.getloadavg()
    top = subprocess.run(["top", "-bn1"], capture_output=True, text=True).stdout.splitlines()
    busy = [line for line in top[7:12] if line.split() and not line.split()[8].startswith("0.0")]
    return {"loadavg_1_5_15": [one, five, fifteen], "top_processes": busy}


def run(recipe: Path, out: Path, extra: list[str]) -> dict:
    """One timed `qtool compare` into `out` (a fresh folder; its results.jsonl and report are kept)."""
    shutil.rmtree(out, ignore_errors=True)
    before = load()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qtool.cli", "compare", str(recipe), "--out", str(out), "--quiet",
                           *extra], capture_output=True, text=True, cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"qtool compare {' '.join(extra)} failed:\n{proc.stderr}")
    for bulky in ("models", "jobs"):
        shutil.rmtree(out / bulky, ignore_errors=True)
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

    args.report.mkdir(parents=True, exist_ok=True)
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
                       capture_output=True, cwd=REPO)  # the GGUF's converted folder and the page cache, for all runs
        cores = os.cpu_count() or 1
        runs = {f"sequential_{cores}_threads": run(recipe, args.report / "sequential", []),
                "sequential_1_thread": run(recipe, args.report / "sequential-1-thread", ["--threads", "1"]),
                f"workers_{args.workers}": run(recipe, args.report / "workers", ["--workers", str(args.workers)])}
    results = {name: r.pop("results") for name, r in runs.items()}
    dist_name = f"workers_{args.workers}"
    dist = results[dist_name]
    sequential = {name: r for name, r in runs.items() if name != dist_name}
    fastest = min(sequential, key=lambda name: runs[name]["seconds"])
    per_worker = sorted({r["worker"]["threads"] for r in dist.values()})
    same_threads = next(name for name in sequential
                        if sorted({r["worker"]["threads"] for r in results[name].values()}) == per_worker)
    equal = {name: {cell: differences(numbers(results[name][cell]), numbers(dist.get(cell, {})))
                    for cell in results[name]} for name in sequential}
    report = {
        "what": "qtool compare of the same recipe in one run: sequential (one process, torch's default threads), "
                f"sequential with --threads 1, then --workers {args.workers} (local submitit jobs, "
                f"{per_worker} thread each); the ratio is against the faster sequential run",
        "recipe": {"model": "smollm2-135m", "text": str(TEXT.relative_to(REPO.parent)), "ctx": 512,
                   "max_tokens": args.max_tokens, "kl": True, "cells": list(dist)},
        "seconds": {name: r["seconds"] for name, r in runs.items()},
        "sequential_s": runs[fastest]["seconds"], "sequential_run": fastest,
        "distributed_s": runs[dist_name]["seconds"],
        "ratio": round(runs[dist_name]["seconds"] / runs[fastest]["seconds"], 3),
        "ratio_per_sequential_run": {name: round(runs[dist_name]["seconds"] / runs[name]["seconds"], 3)
                                     for name in sequential},
        "target_ratio": 0.65,
        "identical_numbers": all(not d for d in equal[same_threads].values()),
        "identical_numbers_against": same_threads,
        "differences": {name: {cell: d for cell, d in cells.items() if d} for name, cells in equal.items()},
        "threads": {name: sorted({r["worker"]["threads"] for r in results[name].values()}) for name in runs},
        "cell_seconds": {cell: {name: results[name][cell]["seconds"] for name in runs} for cell in dist},
        "ppl": {cell: {name: results[name][cell]["perplexity"]["ppl"] for name in runs} for cell in dist},
        "kl_mean": {cell: {name: (results[name][cell]["divergence"] or {}).get("kl_mean") for name in runs}
                    for cell in dist},
        "workers": {cell: r["worker"] for cell, r in dist.items()},
        "runs": runs,
        "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "submitit": submitit.__version__},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = args.report / "distributed-compare.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['seconds']}: ratio {report['ratio']} against {fastest}, identical numbers against "
          f"{same_threads}: {report['identical_numbers']}; wrote {path}")


if __name__ == "__main__":
    main()
