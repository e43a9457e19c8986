#!/usr/bin/env bash
# Install, lint, type-check and run the default test lane (no GPU, no network, no SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# The tinker 0.22 probe lane needs its own venv; without a package index it is skipped.
bash scripts/setup-tinker022.sh || echo "warning: no tinker 0.22 venv; its probe lane is skipped"
. .venv/bin/activate
ruff check src tests
ruff format --check src tests
mypy
python -m pytest -q "$@"
