#!/usr/bin/env bash
# One command: install what the tests need (browser included), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
# The CPU and the kernel paths bitsandbytes picks on it: a failure on another kind of CPU explains itself.
python3 -c "from quantlib.registry import cpu_kernel_summaries; from quantlib.runtime import cpu_features, cpu_features_text
print(cpu_features_text(cpu_features())); print(*cpu_kernel_summaries(), sep='\n')" 2>/dev/null \
  || echo "CPU features: could not be read" >&2
exec python3 -m pytest "$@"
