"""The project folder: where a spec's paths may point (data, models and `extends` stay inside it)."""
from __future__ import annotations

from pathlib import Path

ROOT_MARKERS = (".git", ".storyc", "storyc.toml")


def project_root(spec: Path) -> Path:
    """The nearest folder above the spec holding .git, .storyc or storyc.toml; else the spec's folder."""
    return root_and_why(spec)[0]


def root_and_why(spec: Path) -> tuple[Path, str]:
    """The project root and how it was chosen (said when a path is refused as outside the project)."""
    start = Path(spec).resolve().parent
    for d in (start, *start.parents):
        for m in ROOT_MARKERS:
            if (d / m).exists():
                return d, f"the nearest folder above the spec with {m}"
    return start, "the spec's own folder, since no folder above it has .git, .storyc or storyc.toml"


def outside_hint(root: Path, why: str) -> str:
    return (f"the project folder is {root} ({why}); keep data and models inside it (links are followed, so a "
            "link must point inside it too; hard links or copies are fine), or make a folder above it the project root with an empty storyc.toml (or .storyc/) there")


def inside(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root)
        return True
    except ValueError:
        return False
