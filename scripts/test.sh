#!/usr/bin/env bash
# One command: install what the tests need (browser included), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
exec python3 -m pytest "$@"
