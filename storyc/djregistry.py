"""Snapshot of Data-Juicer's op registry (op names; own parameters with types and defaults; the common ones), shipped as data/dj_ops.json so
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
        own = [_param(p) for p in inspect.signature(cls.__init__).parameters.values()
               if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        base = set()
        for klass in cls.__mro__[1:]:
            if klass.__module__.startswith("data_juicer") and "__init__" in vars(klass):
                try:
                    base.update(_KWARG.findall(inspect.getsource(klass.__init__)))
                except (OSError, TypeError):
                    pass
        kind = cls.__module__.split(".")[2] if cls.__module__.count(".") >= 2 else "op"
        ops[name] = {"kind": kind, "params": own, "common": tuple(sorted(base - {p["name"] for p in own}))}
    # the base classes' parameters are the same for most ops: store each distinct set once
    sets = {c: f"{i}" for i, c in enumerate(sorted({o["common"] for o in ops.values()}))}
    for o in ops.values():
        o["common"] = sets[o["common"]]
    common = {k: list(c) for c, k in sets.items()}
    return {"format": "storyc.dj_ops/2", "data_juicer": data_juicer.__version__, "common": common, "ops": ops}


def _param(p) -> dict:
    """One own parameter: name, type (as written in the signature) and default (JSON-safe)."""
    out = {"name": p.name}
    if p.annotation is not p.empty:
        ann = p.annotation
        text = ann if isinstance(ann, str) else getattr(ann, "__name__", None) or str(ann)
        out["type"] = re.sub(r"\b(typing|typing_extensions|pydantic\.types|annotated_types)\.", "", str(text))
    if p.default is not p.empty:
        d = p.default
        out["default"] = d if d is None or isinstance(d, (bool, int, float, str)) else repr(d)
        if isinstance(d, float) and d != d:
            out["default"] = "nan"
    return out


def names(reg: dict, op: str) -> list[str]:
    """Every parameter name an op accepts: its own, then the common ones of its base classes."""
    o = reg["ops"][op]
    return [p["name"] for p in o["params"]] + reg["common"][o["common"]]


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
