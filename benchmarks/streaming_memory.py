"""Peak memory of streaming quantization at three model sizes, and what it implies for 70B.

For each size a random-weight Llama-shaped fp32 model is written (qtool.synthetic), then quantized
by `qtool quantize` in a fresh process with each streaming backend; the process's peak resident
set comes from the kernel (wait4's ru_maxrss). As the in-memory reference, the same model is
loaded whole by `qtool generate` (transformers from_pretrained in fp32: the first step of every
non-streaming backend). The 70B line is arithmetic, not a run: the peak measured at the largest
size minus the libraries' baseline and the largest shard, per byte of the largest source tensor,
scaled to Llama-2-70B's largest tensor (its 32000 x 8192 embedding in fp32, 1.05 GB), plus the
baseline (the peak of quantizing a 12 MiB model: the libraries) and one shard. A bf16 source adds
the bf16 copy of the tensor being cast (half its fp32 size) to that.

    .venv/bin/python benchmarks/streaming_memory.py               # ~10 min on 2 cores, ~9 GB of /tmp
    .venv/bin/python benchmarks/streaming_memory.py --check       # the written files are consistent

Writes reports/streaming-memory/results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "reports" / "streaming-memory"
# (hidden, intermediate, layers): about 0.4, 1.4 and 2.9 GB of fp32 weights
SIZES = [(512, 1408, 24), (1024, 2816, 24), (2048, 5632, 12)]
METHODS = {"rtn": [], "eetq": [], "hqq": ["--opt", "optimize=false"]}
SHARD = 512 * 2**20
LLAMA2_70B_LARGEST_TENSOR = 32000 * 8192 * 4  # the embedding (and untied head) in fp32
LLAMA2_70B_FP32 = 68_976_648_192 * 4


def run(args: list[str]) -> dict:
    """Run the qtool CLI; its exit code, seconds and peak RSS (MiB, from the kernel)."""
    from qtool.evaluate.memory import run_with_peak

    started = time.perf_counter()
    result, peak = run_with_peak([sys.executable, "-m", "qtool.cli", *args], cwd=REPO,
                                 env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2"})
    tail = result.stderr.strip().splitlines()[-1:] if result.returncode else []
    return {"exit": result.returncode, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mib": round(peak / 2**20, 1), **({"error": tail[0]} if tail else {})}


def measure(workdir: Path) -> dict:
    from qtool.models import resolve_model
    from qtool.runtime import package_versions
    from qtool.synthetic import llama_config, write_random_model

    tokenizer = resolve_model("smollm2-135m").load_tokenizer()
    tiny = workdir / "tiny"  # 12 MiB of weights: the process with every library loaded, and nothing else
    write_random_model(tiny, llama_config(2, 64, 128, heads=4), tokenizer)
    baseline = run(["quantize", "--method", "rtn", str(tiny), str(workdir / "tiny-rtn")])
    rows = []
    for hidden, intermediate, layers in SIZES:
        model = workdir / f"llama-h{hidden}-l{layers}"
        config = llama_config(layers, hidden, intermediate)
        size = write_random_model(model, config, tokenizer)
        largest = max(49152 * hidden, intermediate * hidden) * 4
        row = {"hidden": hidden, "intermediate": intermediate, "layers": layers, "weights_bytes_fp32": size,
               "largest_tensor_bytes": largest, "in_memory_load": run(["generate", str(model), "Hi", "--max-new-tokens", "1"])}
        for method, options in METHODS.items():
            out = workdir / f"{model.name}-{method}"
            result = run(["quantize", "--method", method, *options, "--max-shard-size", str(SHARD), str(model), str(out)])
            if result["exit"] == 0:
                record = json.loads((out / "qtool.json").read_text())
                result |= {"streaming": record["streaming"], "written_bytes": record["weights_bytes"]}
            row[method] = result
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(model)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"protocol": "peak RSS of a fresh `qtool quantize` process (wait4 ru_maxrss), random fp32 Llama-shaped "
                        "models (vocab 49152, tied embeddings), max shard size 512 MiB; in_memory_load: "
                        "`qtool generate` loading the same model whole",
            "baseline_peak_rss_mib": baseline["peak_rss_mib"], "max_shard_bytes": SHARD, "rows": rows,
            "projection_70b": projection(rows, baseline["peak_rss_mib"]), "versions": package_versions(),
            "load_average": os.getloadavg()}


def projection(rows: list[dict], baseline_mib: float) -> dict:
    """Llama-2-70B's streamed peak, from the largest measured size (see the module docstring)."""
    last = rows[-1]
    out = {"model": "Llama-2-70B (hidden 8192, intermediate 28672, 80 layers, vocab 32000)",
           "weights_gib_fp32": round(LLAMA2_70B_FP32 / 2**30, 1), "in_memory_load_gib_fp32_at_least": round(LLAMA2_70B_FP32 / 2**30, 1)}
    for method in METHODS:
        if last[method]["exit"]:
            continue
        shard = last[method]["streaming"]["largest_shard_bytes"] / 2**20
        per_byte = max(0.0, last[method]["peak_rss_mib"] - baseline_mib - shard) / (last["largest_tensor_bytes"] / 2**20)
        out[method] = {"working_set_per_largest_tensor_byte": round(per_byte, 2),
                       "streamed_peak_gib": round((baseline_mib + SHARD / 2**20 + per_byte * LLAMA2_70B_LARGEST_TENSOR / 2**20)
                                                  / 1024, 1)}
    return out


def table(result: dict) -> str:
    lines = ["| model (fp32 weights) | load whole | " + " | ".join(f"{m} streamed" for m in METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    for row in result["rows"]:
        cells = [f"{row[m]['peak_rss_mib']:.0f} MiB ({row[m]['seconds']:.0f} s)" if not row[m]["exit"] else "failed"
                 for m in METHODS]
        lines.append(f"| h{row['hidden']} x {row['layers']} layers ({row['weights_bytes_fp32'] / 2**30:.2f} GiB) | "
                     f"{row['in_memory_load']['peak_rss_mib']:.0f} MiB | " + " | ".join(cells) + " |")
    p = result["projection_70b"]
    lines += ["", f"Peak RSS of the process; quantizing a 12 MiB model (the libraries alone): {result['baseline_peak_rss_mib']:.0f} MiB; shards of at most "
              f"{result['max_shard_bytes'] // 2**20} MiB. Projection for {p['model']} ({p['weights_gib_fp32']} GiB in fp32, "
              "which loading whole needs at least): " + ", ".join(f"{m} ~{p[m]['streamed_peak_gib']} GiB"
                                                             for m in METHODS if m in p) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--check", action="store_true", help="check that table.md matches results.json")
    args = parser.parse_args()
    if args.check:
        result = json.loads((OUT / "results.json").read_text())
        return 0 if (OUT / "table.md").read_text() == table(result) else 1
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="qtool-streaming-") as work:
        result = measure(Path(work))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "table.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
