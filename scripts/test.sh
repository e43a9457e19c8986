#!/usr/bin/env bash
# Install, lint, type-check and run the default test lane (no GPU, no network, no SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
. .venv/bin/activate
ruff check src tests
ruff format --check src tests
mypy
python -m pytest -q "$@"
