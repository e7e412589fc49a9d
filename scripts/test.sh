#!/usr/bin/env bash
# Install storyc with the full stack (CPU) and run the test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
# constraints.txt: the exact versions CI was green with (scripts/constraints.py writes it)
python3 -m pip install -q -c constraints.txt -e '.[run,test]'
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# two workers (the CI machine has 2 cores), one CPU thread each (tests/conftest.py sets OMP_NUM_THREADS=1). The
# whole suite (339 tests) took 11.2 min on this 2-core machine, 12.7-13.6 min when its host was busy (2026-12-03;
# 15.3 min with torch's default threads, 2026-12-02);
# the slowest are the Ray sweeps (1-1.6 min each); `-m "not slow"` runs the ~200 tests that build no project in ~1 min
exec python3 -m pytest -q -p no:cacheprovider -n 2 tests "$@"
