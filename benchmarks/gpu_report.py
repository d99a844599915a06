"""Write reports/gpu-h200/README.md from the JSON files that benchmarks/gpu_check.sh wrote.

    python benchmarks/gpu_report.py [REPORT_FOLDER]

Reads every `*/smollm2.json`, `*/decode.json` and `*/qlora.json` under the folder (one sub-folder
per device call, in name order; a later smollm2 row replaces an earlier one of the same cell) and
writes the tables. The decode rooflines are recomputed here with gpu_check.decode_bytes_per_step
from the recorded shape, bandwidth and each variant's bits per weight, so every row uses the same
byte count whatever version of gpu_check measured it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import BITS_PER_WEIGHT, decode_bytes_per_step  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def load_parts(folder: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"*/{name}.json"))]


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def smollm2_table(parts: list[dict[str, Any]]) -> list[str]:
    rows: dict[str, dict[str, Any]] = {}
    for part in parts:
        for row in part["rows"]:
            if row["cell"] not in rows or row.get("status") == "ok":
                rows[row["cell"]] = row
    settings = parts[-1]["settings"]
    lines = [
        f"Token PPL, ctx {settings['ctx']}, first {settings['max_tokens']:,} tokens of WikiText-2 test "
        f"({settings['protocol']}); calibration {settings['nsamples']} × {settings['seqlen']} tokens of WikiText-2 "
        "valid. CPU: the committed fp32 runs in reports/smollm2-cpu*/ (same windows).",
        "",
        "| cell | status | layer class (CUDA) | CUDA dtype | PPL CUDA | PPL CPU | Δ | quantize s CUDA | quantize s CPU | quantize peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        cpu = row.get("cpu_reference") or {}
        delta = row.get("ppl_vs_cpu_pct")
        status = row.get("status", "")
        if status != "ok":
            status = f"{status}: {row.get('reason') or row.get('error', '')}"[:90]
        lines.append(
            f"| {row['cell']} | {status} | {', '.join(row.get('layer_classes') or []) or '—'} | "
            f"{(row.get('dtype') or '—').replace('torch.', '')} | {fmt(row.get('ppl'), 2)} | {fmt(cpu.get('ppl'), 2)} | "
            f"{'—' if delta is None else f'{delta:+.2f} %'} | {fmt((row.get('timings_s') or {}).get('quantize'))} | "
            f"{fmt(cpu.get('quantize_s'))} | {fmt(row.get('peak_memory_mib'), 0)} |"
        )
    return lines


def decode_table(part: dict[str, Any]) -> list[str]:
    s = part["settings"]
    bandwidth = s["copy_bandwidth_gb_s"]
    context = s["prompt_tokens"] + s["new_tokens"] // 2
    lines = [
        f"Llama-2-7B shape, random weights; prompt {s['prompt_tokens']} tokens, {s['new_tokens'] - 1} timed greedy "
        f"decode steps per run, median of {s['repeats']} runs; attention {s['attention']}, KV cache: {s['kv_cache']}. "
        f"Roofline = batch × {bandwidth:,.0f} GB/s (device-to-device copy, measured in the same process) / bytes "
        f"a step reads (weights at the format's bits per weight, 16-bit head and embedding row, KV cache of "
        f"{context} tokens).",
        "",
        "| variant | kernel | bits/weight | batch | mode | decode tok/s | ms/step | roofline tok/s | % of roofline | peak VRAM GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in part["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['variant']} | {row.get('status')}: {row.get('error', row.get('reason', ''))[:80]} |||||||||")
            continue
        bits = BITS_PER_WEIGHT[row["variant"]]
        for run in row["runs"]:
            if "decode_tokens_per_s" not in run:
                lines.append(f"| {row['variant']} | {row['kernel']} | {bits:.2f} | {run.get('batch')} | "
                             f"{run.get('status') or run.get('error', '')[:60]} ||||||")
                continue
            batch = run["batch"]
            roofline = batch * bandwidth * 1e9 / decode_bytes_per_step(s["shape"], bits, batch, context)
            speed = run["decode_tokens_per_s"]["median"]
            mode = run["mode"] + ("" if run["mode"] == "cuda-graph" or not run.get("cuda_graph_requested")
                                  else f" ({run['fallback_reason']})")
            lines.append(
                f"| {row['variant']} | {row['kernel']} | {bits:.2f} | {batch} | {mode} | {speed:,.1f} | "
                f"{run['step_ms']['median']:.2f} | {roofline:,.0f} | {100 * speed / roofline:.1f} | "
                f"{run['peak_memory_mib'] / 1024:.2f} |"
            )
    return lines


def qlora_table(part: dict[str, Any]) -> list[str]:
    s = part["settings"]
    lora = s["lora"]
    lines = [
        f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']} on {lora['targets']}; base {s['base']}, "
        f"compute {s['compute_dtype']}; {s['steps']} steps at sequence length {s['seqlen']}, batch {s['batch']}; "
        f"{s['optimizer']}; {s['data']}. Peak VRAM = torch max allocated during the steps (reserved in brackets).",
        "",
        "| gradient checkpointing | status | s/step (median, steps 2–20) | first step s | peak VRAM GiB | trainable parameters |",
        "|---|---|---|---|---|---|",
    ]
    for row in part["rows"]:
        lines.append(
            f"| {row['gradient_checkpointing']} | {row.get('status')} | {fmt(row.get('s_per_step_median'), 3)} | "
            f"{fmt(row.get('s_first_step'), 2)} | {fmt(row.get('peak_vram_gib'), 2)} ({fmt(row.get('peak_vram_reserved_gib'), 2)}) | "
            f"{row.get('trainable_parameters', 0):,} |"
        )
    return lines


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else REPO / "reports" / "gpu-h200"
    smollm2, decode, qlora = (load_parts(folder, n) for n in ("smollm2", "decode", "qlora"))
    env = (smollm2 or decode or qlora)[0]["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    notes = (folder / "NOTES.md").read_text() if (folder / "NOTES.md").exists() else ""
    lines = [
        "# GPU check: NVIDIA H200",
        "",
        f"Generated by `python benchmarks/gpu_report.py` from the JSON files beside this page, written by "
        f"`benchmarks/gpu_check.sh` on one {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, compute capability "
        f"{env.get('compute_capability')}, {env.get('multiprocessors')} SMs). Versions: {versions}.",
        "",
        "## 1. SmolLM2-135M through qtool's backends on CUDA",
        "",
        *smollm2_table(smollm2),
        "",
        "## 2. Decode speed, 7B shape",
        "",
        *(decode_table(decode[-1]) if decode else ["not run"]),
        "",
        "## 3. QLoRA on the nf4 7B shape",
        "",
        *(qlora_table(qlora[-1]) if qlora else ["not run"]),
        "",
        notes,
    ]
    (folder / "README.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {folder / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
