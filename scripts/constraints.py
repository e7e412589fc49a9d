"""Write constraints.txt: the exact version of every package `pip install -e '.[run,test]'` installed here.

`scripts/test.sh`, `.ci/run` and the README install with `-c constraints.txt`, so a new upstream release (a
hypothesis that breaks hypothesis-jsonschema, say) cannot change what CI runs. After changing a dependency in
pyproject.toml: install it, run the tests, then `python3 scripts/constraints.py` and commit the file.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: tuple) -> dict:
    """name -> version of ``root`` with ``extras`` and everything it needs, as installed."""
    seen: dict = {}
    todo = [(root, extras)]
    while todo:
        name, ext = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency whose marker did not apply here
        key = norm(dist.metadata["Name"])
        done = seen.get(key)
        if done is not None and set(ext) <= done[1]:
            continue
        seen[key] = (dist.version, (done[1] if done else set()) | set(ext))
        for raw in dist.requires or []:
            req = Requirement(raw)
            envs = [{"extra": e} for e in ext] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(req.extras)))
    return {k: v[0] for k, v in seen.items() if k != "storyc"}


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
