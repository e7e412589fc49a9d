"""How a build runs: one typed, frozen value, built from the command line in ``cli.py`` only.

Python callers (tests, a sweep trial) build ``RunOptions`` directly; nothing below the CLI sees argparse.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class RunOptions:
    build_dir: Path | None = None  # default: <project>/build/<story-id>
    lock_path: Path | None = None  # default: the spec's path with .lock (story.yaml -> story.lock)
    cache_dir: Path | None = None  # default: <project>/.storyc/cache (content-addressed training cache)
    device: str | None = None  # torch device for GPU stages; None: cuda when available
    target: str | None = None  # a stage or kind: run it and what it needs, nothing after it
    force: str | None = None  # a stage, a kind, or "all": run it even when up to date
    dry_run: bool = False  # say what would run and why; change nothing
    keep_going: bool = False  # after a failure, still run the stages that do not depend on it
    quiet: bool = False
    live: bool | None = None  # a live progress bar (default: when stderr is a terminal)

    def __post_init__(self):
        for name in ("build_dir", "lock_path", "cache_dir"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                object.__setattr__(self, name, Path(v))

    def with_(self, **changes) -> "RunOptions":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:  # a misspelt option is an error, never a silent default
            raise TypeError(f"unknown run option(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    # ---- resolved locations (the spec decides the defaults)
    def lock_for(self, story) -> Path:
        return (self.lock_path or Path(story.spec_path).with_suffix(".lock")).resolve()

    def cache_for(self, story) -> Path:
        return (self.cache_dir or story.root / ".storyc" / "cache").resolve()
