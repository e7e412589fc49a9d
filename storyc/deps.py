"""The installed versions of a package and everything it needs (reproduce/constraints.txt, scripts/constraints.py)."""
from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement


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
