#!/usr/bin/env bash
# One prepared GPU check (issue 24): qtool's backends on SmolLM2-135M, 7B-shaped decode, QLoRA.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT]
#
# On the GPU machine: first `benchmarks/gpu_pack.sh` here (it writes .gpu-p1/ and .gpu-p2/: the
# carried packages and the built-in model as two parts of one tarball, and the WikiText-2 files),
# carry each in its own call (the device tool keeps only what the current call carries, so the
# first call copies its part to /tmp/qtool-parts: `mkdir -p /tmp/qtool-parts && cp .gpu-p1/* /tmp/qtool-parts/`),
# then run this with .gpu-p2 carried. OUT defaults to $OUT (the device tool's result folder), else out/gpu-check.
# Each part runs in its own process under `timeout`; the whole run stays under ~8 minutes.
# --dry-run runs the same Python on the CPU with a tiny Llama (tests/test_gpu_check.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
RESULTS=${1:-${OUT:-out/gpu-check}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -n "$DRY" ] && PY=.venv/bin/python
TEXT=(); CALIB=()
if [ -z "$DRY" ]; then
  if [ -d .gpu-p2 ]; then
    mkdir -p /tmp/qtool-site
    # the parts, by name: those carried in this call and those an earlier call copied to /tmp/qtool-parts
    parts=$(ls .gpu-p*/site.tgz.part-* /tmp/qtool-parts/site.tgz.part-* 2>/dev/null | awk -F/ '!seen[$NF]++ {print $NF, $0}' | sort | cut -d' ' -f2)
    cat $parts | tar xzf - -C /tmp/qtool-site || { echo "gpu_check: .gpu-p*/site.tgz.part-* do not unpack (carry .gpu-p1 and .gpu-p2)" >&2; exit 2; }
    export PYTHONPATH=/tmp/qtool-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    TEXT=(--text .gpu-p2/wikitext-2/test.txt); CALIB=(--calib .gpu-p2/wikitext-2/valid.txt)
  fi
  nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
status=0
run() {  # run PART SECONDS_LIMIT ROW_BUDGET
  local part=$1 limit=$2 budget=$3 start=$SECONDS
  echo "== $part (limit ${limit}s)" >&2
  timeout --signal=INT --kill-after=10 "$limit" "$PY" benchmarks/gpu_check.py "$part" --out "$RESULTS" \
    --budget-s "$budget" $DRY "${TEXT[@]}" "${CALIB[@]}" ${GPU_CHECK_CELLS:+--cells $GPU_CHECK_CELLS} 2>&1 | tee "$RESULTS/$part.log" | grep -v "it/s\]$" >&2
  local rc=${PIPESTATUS[0]}
  echo "== $part: exit $rc after $((SECONDS - start)) s" >&2
  [ "$rc" = 0 ] || status=1
}
# GPU_CHECK_PARTS picks parts, GPU_CHECK_CELLS smollm2 cells (e.g. GPU_CHECK_CELLS=aqlm-2x8 for a rerun)
for part in ${GPU_CHECK_PARTS:-smollm2 decode qlora}; do
  case $part in
    smollm2) run smollm2 "${GPU_CHECK_SMOLLM2_S:-200}" "${GPU_CHECK_SMOLLM2_BUDGET_S:-170}" ;;
    decode) run decode "${GPU_CHECK_DECODE_S:-200}" "${GPU_CHECK_DECODE_BUDGET_S:-170}" ;;
    qlora) run qlora "${GPU_CHECK_QLORA_S:-100}" 90 ;;
  esac
done
exit $status
