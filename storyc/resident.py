"""Models kept in memory between builds of one process (`storyc watch`); off for `storyc build`, which frees each
model when its stage ends.

One entry per role (the merged generation pipeline, the text encoder, the scorer...): a build that needs the same
role with another key (a retrained LoRA, other weights) drops the old one before loading the new, so at most one
copy of each model is held. What is held is exactly what a cold load would build (the LoRA merge is deterministic),
so a resident build's outputs are byte-identical to a cold build's.
"""
from __future__ import annotations

from typing import Callable

_held: dict | None = None  # role -> (key, value); None: not enabled


def enable() -> None:
    global _held
    if _held is None:
        _held = {}


def enabled() -> bool:
    return _held is not None


def get(role: str, key, load: Callable):
    """The value held for ``role`` if it was loaded with ``key``, else ``load()`` (kept when enabled)."""
    if _held is None:
        return load()
    old = _held.get(role)
    if old is not None and old[0] == key:
        return old[1]
    if old is not None:
        del _held[role]
        del old
        _free()
    value = load()
    _held[role] = (key, value)
    return value


def held(role: str):
    """What is held for ``role`` (None: nothing)."""
    return None if not _held or role not in _held else _held[role][1]


def _free() -> None:
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
