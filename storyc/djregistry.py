"""Snapshot of Data-Juicer's op registry (op names and parameter names), shipped as data/dj_ops.json so
`storyc validate` can check `filters` without importing data_juicer.

Regenerate after upgrading py-data-juicer:  python -m storyc.djregistry --write
(tests/test_djregistry.py fails when the snapshot and the installed library disagree).
"""
from __future__ import annotations

import inspect
import os
import re
import sys
from importlib import resources

_KWARG = re.compile(r"""kwargs\.(?:get|pop)\(\s*["'](\w+)["']""")


def snapshot() -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import data_juicer
    import data_juicer.ops  # noqa: F401 - registers every op
    from data_juicer.ops.base_op import OPERATORS

    ops = {}
    for name, cls in sorted(OPERATORS.modules.items()):
        params = []
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.append(p.name)
        base = set()
        for klass in cls.__mro__[1:]:
            if klass.__module__.startswith("data_juicer") and "__init__" in vars(klass):
                try:
                    base.update(_KWARG.findall(inspect.getsource(klass.__init__)))
                except (OSError, TypeError):
                    pass
        params += sorted(base - set(params))
        kind = cls.__module__.split(".")[2] if cls.__module__.count(".") >= 2 else "op"
        ops[name] = {"kind": kind, "params": params}
    return {"format": "storyc.dj_ops/1", "data_juicer": data_juicer.__version__, "ops": ops}


def main(argv=None) -> int:
    from .render import canonical_json, atomic_write

    text = canonical_json(snapshot())
    if "--write" in (argv or sys.argv[1:]):
        atomic_write(resources.files("storyc").joinpath("data/dj_ops.json"), text)
        print("wrote storyc/data/dj_ops.json")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
