"""The validated story as frozen dataclasses (defaults already applied from the schema)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Scene:
    index: int
    id: str
    prompt: str
    seed: int
    negative: str = ""
    caption: str = ""


@dataclass(frozen=True)
class ModelRef:
    """A model location: a local folder, ``modelscope:<id>`` or ``tiny:<name>``."""

    raw: str
    scheme: str  # local | modelscope | tiny
    path: Path | None  # resolved local folder (for tiny: where it is built)
    name: str = ""  # modelscope id or tiny name


@dataclass(frozen=True)
class Story:
    spec_path: Path  # the top spec file (absolute)
    root: Path  # project folder: paths may not escape it
    sources: tuple  # spec files, top first (extends chain)
    data: dict  # the merged, defaulted spec as plain data (what stages hash)
    models: dict  # kolors | vae | aesthetic -> ModelRef
    dataset_paths: tuple  # per training source (rules.sources): its local path, None for ModelScope
    scenes: tuple
    warnings: tuple = field(default_factory=tuple)

    @property
    def id(self) -> str:
        return self.data["story"]["id"]

    @property
    def title(self) -> str:
        return self.data["story"].get("title") or self.id

    def section(self, name: str):
        return self.data[name]

    def rel(self, p: Path) -> str:
        """A path as written into artifacts: relative to the project folder, POSIX style."""
        try:
            return Path(p).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return Path(p).as_posix()
