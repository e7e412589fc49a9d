#!/usr/bin/env bash
# Install storyc with the full stack (CPU) and run the test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
# constraints.txt: the exact versions CI was green with (scripts/constraints.py writes it)
python3 -m pip install -q -c constraints.txt -e '.[run,test]'
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# two workers (the CI machine has 2 cores): most tests wait on subprocess builds; 10 min instead of 11.5-13.5
exec python3 -m pytest -q -p no:cacheprovider -n 2 tests "$@"
