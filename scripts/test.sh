#!/usr/bin/env bash
# Install, lint, type-check and run the default test lane (no GPU, no network, no SmolLM2),
# then the cookbook lane: four tinker-cookbook recipes against a mint server on SmolLM2
# (scripts/test-cookbook.sh; MINT_COOKBOOK_LANE=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# The tinker 0.22 probe lane needs its own venv; without a package index it is skipped.
bash scripts/setup-tinker022.sh || echo "warning: no tinker 0.22 venv; its probe lane is skipped"
. .venv/bin/activate
ruff check src tests tools
ruff format --check src tests tools
mypy
python -m pytest -q "$@"
if [ "${MINT_COOKBOOK_LANE:-1}" != 0 ]; then
  MINT_PYTHON=$PWD/.venv/bin/python bash scripts/test-cookbook.sh
fi
