#!/usr/bin/env bash
# A separate virtual environment for XTTS workers (.venv-xtts), at the exact versions in
# locks/xtts.txt (inputs: locks/xtts.in; refresh with scripts/lock.sh): coqui-tts needs torchaudio,
# which exists only for some torch versions; the CPU torch on this machine's disk is 2.13.0 and
# torchaudio 2.11.0 installs beside it (its pure-Python parts are what XTTS uses); coqui-tts 0.28.0
# needs transformers 4.x. A model config points at it with
#   python: .venv-xtts/bin/python
# The proxy's package reaches the worker through PYTHONPATH (the supervisor sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP_VERSION=26.3
if [ ! -x .venv-xtts/bin/python ]; then
  "$PY" -m venv .venv-xtts
fi
.venv-xtts/bin/python -m pip install --quiet "pip==$PIP_VERSION"
.venv-xtts/bin/python -m pip install --quiet --no-deps --build-constraint locks/build.txt -r locks/xtts.txt
.venv-xtts/bin/python scripts/check_lock.py --prune locks/xtts.txt
# torchaudio 2.11's wheel is a CUDA build: on a CPU-only torch its compiled extensions cannot load
# (libc10_cuda.so), and torchaudio falls back to its pure-Python parts (what XTTS uses: MelSpectrogram,
# resample) only when they are absent. So, on a CPU-only torch, set them aside.
if .venv-xtts/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then
  lib=$(.venv-xtts/bin/python -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("torchaudio").origin), "lib"))')
  mkdir -p "$lib/cuda-only" && find "$lib" -maxdepth 1 -name '*.so' -exec mv {} "$lib/cuda-only/" \;
fi
