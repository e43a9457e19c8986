#!/usr/bin/env bash
# Create (or reuse) .venv-tinker022: the JSON-era tinker SDK (0.22.7) alone, for the
# conformance probe's second lane (tests/api/test_probe_022.py skips when it is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.22.7
if [ -x .venv-tinker022/bin/python ] &&
  .venv-tinker022/bin/python -c "import tinker, sys; sys.exit(tinker.__version__ != '$VERSION')"; then
  exit 0
fi
rm -rf .venv-tinker022
python3.11 -m venv .venv-tinker022 2>/dev/null || python3 -m venv .venv-tinker022
.venv-tinker022/bin/pip install --quiet --disable-pip-version-check "tinker==$VERSION"
