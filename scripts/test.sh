#!/usr/bin/env bash
# Install storyc with the full stack (CPU) and run the test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
# A CJK font for storyboard captions (optional: storyc warns and falls back without one).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ! -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei) >/dev/null 2>&1 || true
fi
python3 -m pip install -q -e '.[run,test]'
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 -m pytest -q -p no:cacheprovider tests "$@"
