#!/usr/bin/env bash
# Set up (idempotent) and run the default test suite (tests marked `slow` are skipped; add -m slow for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
