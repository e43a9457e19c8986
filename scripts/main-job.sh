#!/usr/bin/env bash
# The main job on the embedded default: install, start a local server, train two GRPO
# policies on SmolLM2-135M-Instruct through the tinker SDK, evaluate, print the catalog.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
. .venv/bin/activate
export MINT_HOME="${MINT_HOME:-$HOME/.mint}"
export TINKER_TELEMETRY=0
exec mint rl "$@"
