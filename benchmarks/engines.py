"""Speed and memory of each variant in each serving engine, with ratios to the base in the same engine.

Variants: the base model, qtool's gptq/awq 4-bit and bnb nf4 checkpoints (folders given with
--variant NAME=PATH; a .gguf path runs in llama.cpp only), and the base as GGUF Q8_0 / Q4_K_M
(llama.cpp's own quantizer). Each variant
runs `qtool eval --speed --engine ...` in its own process, one after the other in one run, so
the ratios are comparable; absolute numbers are this machine's. An engine that cannot take a
variant (llama.cpp has no lossless GGUF of an nf4 checkpoint) is listed with its reason.
Writes REPORT/engines.json and REPORT/engines.md. Needs the engines: make engine-vllm engine-llamacpp.

Usage: python benchmarks/engines.py --variant gptq4=out/gptq4 --variant awq4=out/awq4 --variant nf4=out/nf4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from qtool.report import timed

ENGINES = ("hf", "vllm", "llamacpp")


def measure(path: str, engines: tuple[str, ...], args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "eval.json"
        cmd = [sys.executable, "-m", "qtool.cli", "eval", path, "--speed", "--device", "cpu", "--quiet",
               "--batch", args.batch, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--json", str(result), *[f"--engine={e}" for e in engines]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        return json.loads(result.read_text())


def runs(payload: dict) -> dict[str, dict]:
    """engine -> {speed: [...], peak_memory_mib, kernel, dtype, version, error}."""
    out = {}
    entries = timed(payload.get("speed"))  # emulated formats: not timed
    if entries:
        out["hf"] = {"speed": entries, "peak_memory_mib": max(s["peak_memory_generate_mib"] for s in entries),
                     "kernel": "transformers eager", "dtype": "float32", "version": payload["versions"].get("transformers")}
    out.update(payload.get("engines") or {})
    return out


def decode(run: dict, batch: int) -> float | None:
    return next((s["decode_tokens_per_s"]["median"] for s in timed(run.get("speed")) if s.get("batch") == batch), None)


def table(rows: list[dict], batches: list[int]) -> list[str]:
    head = ["variant", "engine", *[f"decode b{b} tok/s" for b in batches], *[f"× base b{b}" for b in batches],
            "prefill b1 tok/s", "TTFT b1 ms", "peak MiB", "weights as run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {e: r for row in rows if row["variant"] == "base" for e, r in row["runs"].items()}
    for row in rows:
        for engine, run in row["runs"].items():
            if run.get("error"):
                lines.append(f"| {row['variant']} | {engine} | " + " | ".join(["—"] * (len(head) - 3))
                             + f" | not run: {run['error'][:120]} |")
                continue
            speeds = [decode(run, b) for b in batches]
            ref = base.get(engine) or {}
            ratios = [f"{s / decode(ref, b):.2f}" if s and ref and decode(ref, b) else "—" for s, b in zip(
                speeds, batches, strict=True)]
            b1 = next((s for s in timed(run.get("speed")) if s.get("batch") == 1), None)
            lines.append(" ".join([
                f"| {row['variant']} | {engine} {run.get('version', '')} |",
                " | ".join(f"{s:.1f}" if s else "—" for s in speeds), "|", " | ".join(ratios), "|",
                f"{b1['prefill_tokens_per_s']['median']:.0f} | {1000 * b1['time_to_first_token_s']['median']:.0f} |"
                if b1 else "— | — |",
                f"{run.get('peak_memory_mib') or 0:.0f} | {run.get('dtype')}"
                + (f"; {run.get('kernel')}" if engine == "vllm" else "") + " |"]))
    return lines


def llamacpp_kernel(rows: list[dict]) -> str:
    return next((r["runs"]["llamacpp"].get("kernel") for r in rows
                 if (r["runs"].get("llamacpp") or {}).get("kernel")), "not run")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH", help="a checkpoint to measure")
    parser.add_argument("--gguf-types", default="Q8_0,Q4_K_M", help="llama.cpp quantizations of the base to add")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES), help="engines to run (default: all)")
    parser.add_argument("--report", default="reports/smollm2-cpu-engines")
    args = parser.parse_args()

    chosen = tuple(e for e in args.engines.split(",") if e)
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    variants = [("base", args.model, chosen)]
    variants += [(name, path, ("llamacpp",) if path.endswith(".gguf") else chosen)
                 for name, path in (v.split("=", 1) for v in args.variant)]
    gguf_dir = Path("out/engines-gguf")
    gguf_dir.mkdir(parents=True, exist_ok=True)
    for kind in [t for t in args.gguf_types.split(",") if t]:
        path = gguf_dir / f"base-{kind}.gguf"
        if not path.exists():
            subprocess.run([sys.executable, "-m", "qtool.cli", "export", args.model, "--type", kind, "-o", str(path)],
                           check=True)
        variants.append((f"gguf {kind} (base, llama.cpp quantizer)", str(path), ("llamacpp",)))
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    for name, path, engines in variants:
        print(f"[{name}] {path}: {', '.join(engines)}", file=sys.stderr, flush=True)
        payload = measure(path, engines, args)
        rows.append({"variant": name, "path": path, "runs": runs(payload) if "error" not in payload else
                     {e: {"error": payload["error"]} for e in engines}, "versions": payload.get("versions")})
    settings = {k: getattr(args, k) for k in ("batch", "prompt_len", "new_tokens", "repeats")}
    (report / "engines.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = [f"# Engines: {args.model} on this CPU", "",
             f"`python benchmarks/engines.py {' '.join(sys.argv[1:])}`: {args.prompt_len}-token prompt + "
             f"{args.new_tokens} greedy tokens (EOS ignored), median of {args.repeats} after a warm-up; "
             "ratios are to the base in the same engine (GGUF rows: to the base's F16 GGUF in llama.cpp). "
             "Peak MiB: hf = torch allocations while generating; vllm/llamacpp = resident memory of the engine's "
             "process tree over load and all runs. llama-cpp-python decodes one sequence, so llama.cpp has no batch-8 "
             f"figure. llama.cpp's kernels: {llamacpp_kernel(rows)}.", "", *table(rows, batches), ""]
    (report / "engines.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
