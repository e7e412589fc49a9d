"""What a stage executor may touch: its build folder, the project's models and caches, upstream facts, progress.

Executors read their jobs' params/settings (the hashed slice), write files under ``build_dir`` or ``cache_dir``,
and yield ``Result``s; they never write the lock (the runner does).
"""
from __future__ import annotations

from pathlib import Path

from .lock import Hasher, Lock, LockEntry
from .options import RunOptions
from .progress import Reporter


def model_folder(story, key: str, report: Reporter | None = None) -> Path:
    """A usable local folder for ``models.<key>``: builds tiny models, downloads modelscope ones."""
    ref = story.models[key]
    if ref.scheme == "tiny":
        from .models import tiny

        if not (ref.path / ".complete").exists() and report is not None:
            report.info(f"     building tiny random-init model `{ref.name}` in {story.rel(ref.path)}")
        return tiny.ensure(ref.name, ref.path)
    if ref.scheme == "modelscope":
        from .models.download import snapshot
        from .models.kolors import PREFERENCE_PATTERNS

        return snapshot(ref.name, story.root / ".storyc" / "models", PREFERENCE_PATTERNS.get(key))
    from .models.kolors import check_folder

    check_folder(key, ref.path)
    return ref.path


def check_model(story, key: str) -> None:
    """Before a build runs anything: the model is there (a local folder with its files), or can be made (tiny) or
    fetched (modelscope: the hub answers). A clear error otherwise, never halfway through a build."""
    ref = story.models[key]
    if ref.scheme == "local":
        from .models.kolors import check_folder

        check_folder(key, ref.path)
    elif ref.scheme == "modelscope":
        from .models.download import downloaded, require_modelscope
        from .models.kolors import PREFERENCE_PATTERNS

        if downloaded(story.root / ".storyc" / "models" / ref.name, PREFERENCE_PATTERNS.get(key)):
            return

        require_modelscope(f"download `{ref.name}` (models.{key})", "download it where you have network into a "
                           f"folder and point `models.{key}` at that folder")


class Context:
    def __init__(self, plan, opts: RunOptions, lock: Lock, hasher: Hasher, reporter: Reporter):
        self.plan, self.story, self.build_dir = plan, plan.story, plan.build_dir
        self.opts = opts
        self.cache_dir = opts.cache_for(plan.story)
        self.device = opts.device
        self.lock, self.hasher, self.report = lock, hasher, reporter
        self.forced: set = set()  # stages the user forced: they must not reuse cached results
        self.metrics: dict = {}  # timings an executor measured (model loads, cache pass, s/step): build_times.json

    def metric(self, name: str, value) -> None:
        self.metrics[name] = round(value, 4) if isinstance(value, float) else value

    # ---- paths
    def path(self, rel: str) -> Path:
        """A path inside the build folder."""
        return self.build_dir / rel

    def project_path(self, rel: str) -> Path:
        """A path written in a spec slice (relative to the project folder)."""
        return self.story.root / rel

    # ---- models
    def model(self, key: str) -> Path:
        return model_folder(self.story, key, self.report)

    def fingerprint(self, key: str) -> str | None:
        """Digest of a model folder (or, for "dataset", of the folder/jsonl source); None when not there yet."""
        if key == "font":  # the storyboard's caption font: its name and bytes (or that there is none)
            from .fonts import find_font
            from .lock import digest

            f = find_font()
            return digest({"font": f.name, "sha256": self.hasher.file(f.path)} if f is not None else {"font": None})
        if key == "dataset":  # source content of the folder/jsonl datasets (captions included)
            paths = [p for p in self.story.dataset_paths if p is not None]
            masks = [m for m in self.story.mask_paths if m is not None]  # only when set: old fingerprints stay
            if not (paths or masks) or not all(p.exists() for p in paths):
                return None
            trees = [self.hasher.tree(p.parent if p.is_file() else p) for p in paths]
            if masks:
                from .lock import digest

                return digest({"sources": trees, "masks": [self.hasher.tree(m) for m in masks if m.is_dir()]})
            if len(trees) == 1:
                return trees[0]
            from .lock import digest

            return digest(trees)
        if key == "validation":  # train.validation.folder's images and captions
            p = self.story.validation_path
            return self.hasher.tree(p) if p is not None and p.is_dir() else None
        if key == "captions":  # recaption's files, as the last ingest left them (or a hand edited them since)
            from .lock import digest

            return digest([self.hasher.file(p) if p.is_file() else None
                           for p in self.story.caption_paths if p is not None])
        if key.startswith("character:"):  # a character's reference images, by content
            from .lock import digest

            paths = self.story.character_paths.get(key.split(":", 1)[1], ())
            if not paths or not all(p.is_file() for p in paths):
                return None
            return digest([self.hasher.file(p) for p in paths])
        ref = self.story.models.get(key)
        if ref is None:
            return None
        path = ref.path
        if ref.scheme == "modelscope":
            path = self.story.root / ".storyc" / "models" / ref.name
        if path is None or not path.exists() or (ref.scheme == "tiny" and not (path / ".complete").exists()):
            return None
        return self.hasher.tree(path)

    # ---- outputs and upstream facts
    def record(self, p: Path) -> dict:
        """What the lock keeps of one output: sha256 and size of a file, tree digest and count of a folder."""
        if p.is_dir():
            return {"sha256": self.hasher.tree(p), "files": sum(1 for f in p.rglob("*") if f.is_file()
                                                                 and not f.name.startswith("."))}
        return {"sha256": self.hasher.file(p), "size": p.stat().st_size}

    def upstream(self, name: str) -> LockEntry | None:
        return self.lock.entry(name)

    def output(self, stage: str, ending: str) -> Path | None:
        """The output of an upstream ``stage`` whose path ends with ``ending``, as its lock entry lists it: a stage
        reads another's files through what that stage recorded, not by guessing their names."""
        e = self.lock.entry(stage)
        found = [rel for rel in (e.outputs if e else ()) if rel.endswith(ending)]
        if len(found) != 1:
            from .errors import StageError

            raise StageError(stage, f"no single recorded output ending in `{ending}` "
                             f"({len(found)} found); rebuild it with `--force {stage}`")
        return self.build_dir / found[0]
