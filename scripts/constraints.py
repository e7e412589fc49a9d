"""Write constraints.txt: the exact version of every package `pip install -e '.[run,test]'` installed here.

`scripts/test.sh`, `.ci/run` and the README install with `-c constraints.txt`, so a new upstream release (a
hypothesis that breaks hypothesis-jsonschema, say) cannot change what CI runs. After changing a dependency in
pyproject.toml: install it, run the tests, then `python3 scripts/constraints.py` and commit the file.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storyc.deps import closure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    pins = closure("storyc", ("run", "test"))
    head = ("# Exact versions of storyc[run,test] and everything they pull in, as tested (Python "
            f"{sys.version_info.major}.{sys.version_info.minor}, Linux x86_64).\n"
            "# Written by `python3 scripts/constraints.py`; used as `pip install -c constraints.txt -e '.[run,test]'`.\n")
    text = head + "".join(f"{k}=={v}\n" for k, v in sorted(pins.items()))
    (ROOT / "constraints.txt").write_text(text, "utf-8")
    print(f"wrote constraints.txt: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
