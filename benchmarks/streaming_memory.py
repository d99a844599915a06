"""Peak memory of streaming quantization at three model sizes, and what it implies for 70B.

For each size a random-weight Llama-shaped fp32 model is written (qtool.synthetic), then quantized
by `qtool quantize` in a fresh process with each streaming backend; the process's peak resident
set comes from the kernel (wait4's ru_maxrss). As the in-memory reference, the same model is
loaded whole by `qtool generate` (transformers from_pretrained in fp32: the first step of every
non-streaming backend). The 70B line is arithmetic, not a run: the peak minus the libraries'
baseline (the peak of quantizing a 12 MiB model), per byte of the largest tensor, measured once
where the embedding is the largest tensor and once on a wide-MLP model where a projection is,
scaled to Llama-2-70B's embedding (32000 x 8192, 1.05 GB in fp32) and projections (28672 x 8192,
0.94 GB), whichever needs more, plus the baseline. A bf16 source adds the bf16 copy of the tensor
being cast (half its fp32 size) to that.

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
# (hidden, intermediate, layers, vocab): about 0.4, 1.4 and 2.9 GB of fp32 weights whose largest tensor
# is the embedding, then a wide-MLP model (2.1 GB) whose largest tensors are its 4096 x 16384 projections
SIZES = [(512, 1408, 24, 49152), (1024, 2816, 24, 49152), (2048, 5632, 12, 49152), (4096, 16384, 2, 4096)]
METHODS = {"rtn": [], "eetq": [], "hqq": ["--opt", "optimize=false"]}
SHARD = 512 * 2**20
LLAMA2_70B_EMBEDDING = 32000 * 8192 * 4  # fp32 bytes; the untied head is as large
LLAMA2_70B_PROJECTION = 28672 * 8192 * 4  # gate/up/down_proj
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
    for hidden, intermediate, layers, vocab in SIZES:
        model = workdir / f"llama-h{hidden}-l{layers}"
        config = llama_config(layers, hidden, intermediate, vocab=vocab)
        size = write_random_model(model, config, tokenizer)
        row = {"hidden": hidden, "intermediate": intermediate, "layers": layers, "vocab": vocab, "weights_bytes_fp32": size,
               "embedding_bytes": vocab * hidden * 4, "largest_projection_bytes": intermediate * hidden * 4,
               "in_memory_load": run(["generate", str(model), "Hi", "--max-new-tokens", "1"]) if vocab >= len(tokenizer)
               else None}
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
    """Llama-2-70B's streamed peak (see the module docstring): per method, the working set per byte
    of the largest tensor, measured where the embedding is largest (the last embedding-heavy row)
    and where a projection is (the wide row), applied to 70B's embedding and projections."""
    embedding_row, projection_row = rows[-2], rows[-1]
    out = {"model": "Llama-2-70B (hidden 8192, intermediate 28672, 80 layers, vocab 32000)",
           "weights_gib_fp32": round(LLAMA2_70B_FP32 / 2**30, 1)}
    for method in METHODS:
        if embedding_row[method]["exit"] or projection_row[method]["exit"]:
            continue
        per_embedding_byte = (embedding_row[method]["peak_rss_mib"] - baseline_mib) / (embedding_row["embedding_bytes"] / 2**20)
        per_projection_byte = ((projection_row[method]["peak_rss_mib"] - baseline_mib)
                               / (projection_row["largest_projection_bytes"] / 2**20))
        working = max(per_embedding_byte * LLAMA2_70B_EMBEDDING, per_projection_byte * LLAMA2_70B_PROJECTION) / 2**20
        out[method] = {"working_set_per_embedding_byte": round(per_embedding_byte, 2),
                       "working_set_per_projection_byte": round(per_projection_byte, 2),
                       "streamed_peak_gib": round((baseline_mib + working) / 1024, 1)}
    return out


def table(result: dict) -> str:
    lines = ["| model (fp32 weights) | load whole | " + " | ".join(f"{m} streamed" for m in METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    for row in result["rows"]:
        cells = [f"{row[m]['peak_rss_mib']:.0f} MiB ({row[m]['seconds']:.0f} s)" if not row[m]["exit"] else "failed"
                 for m in METHODS]
        whole = f"{row['in_memory_load']['peak_rss_mib']:.0f} MiB" if row["in_memory_load"] else "—"
        lines.append(f"| h{row['hidden']}, MLP {row['intermediate']}, {row['layers']} layers, vocab {row['vocab']} "
                     f"({row['weights_bytes_fp32'] / 2**30:.2f} GiB) | {whole} | " + " | ".join(cells) + " |")
    p = result["projection_70b"]
    lines += ["", f"Peak RSS of the process (seconds in brackets); quantizing a 12 MiB model (the libraries alone): "
              f"{result['baseline_peak_rss_mib']:.0f} MiB; shards of at most {result['max_shard_bytes'] // 2**20} MiB; "
              "load whole: `qtool generate` loading the model in fp32 (the wide model's vocabulary is smaller than the "
              f"tokenizer's, so it is not loaded). Projection for {p['model']} ({p['weights_gib_fp32']} GiB in fp32, "
              "which loading whole needs at least): " + ", ".join(f"{m} ~{p[m]['streamed_peak_gib']} GiB"
                                                             for m in METHODS if m in p)
              + " (libraries plus the working set per byte of the largest tensor measured here, times 70B's; a bf16 "
              "source adds the bf16 copy of the tensor being cast to fp32: +0.5 GiB)."]
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
