"""Hashing, model fingerprints and the lock file beside the spec (``story.yaml`` -> ``story.lock``).

The lock records per stage: the spec slice it read, the digests of its inputs, its output files (sha256 and
size), and stage-specific facts (chosen seeds, scores). It is YAML with sorted keys, rewritten atomically and
only when its content changed, so `git diff` shows exactly what a build changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path


from . import __version__
from .errors import StorycError
from .render import atomic_write, yaml_text

LOCK_FORMAT = 1


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def walk_files(folder: Path):
    """(relative path, path) of every regular file under ``folder``, sorted; hidden files and folders skipped,
    symlinked folders not followed. What is fingerprinted and what is ingested is this one set."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            p = Path(root) / f
            if not f.startswith(".") and p.is_file():  # regular files (or links to them); no FIFOs, no dangling links
                out.append((p.relative_to(folder).as_posix(), p))
    return sorted(out)


class Hasher:
    """sha256 of files, cached by (path, size, mtime_ns): multi-GB weights are read once, not every status."""

    def __init__(self, cache_file: Path):
        self.cache_file = Path(cache_file)
        self.reads = 0  # full-content reads done (tests assert status does none)
        try:
            self.cache = json.loads(self.cache_file.read_text("utf-8"))
        except (OSError, ValueError):
            self.cache = {}
        if not isinstance(self.cache, dict):  # a damaged cache file is only a cache: start over
            self.cache = {}
        self.dirty = False

    def _cached(self, path: Path):
        """(cache key, stat, the cached sha256 or None when the file changed or was never hashed)."""
        st = path.stat()
        key = str(path.resolve())
        hit = self.cache.get(key)
        ok = isinstance(hit, list) and len(hit) == 3 and hit[0] == st.st_size and hit[1] == st.st_mtime_ns
        return key, st, hit[2] if ok else None

    def file(self, path: Path) -> str:
        path = Path(path)
        key, st, sha = self._cached(path)
        if sha is not None:
            return sha
        return self._store(key, st, sha256_file(path))

    def _store(self, key: str, st, sha: str) -> str:
        self.reads += 1
        self.cache[key] = [st.st_size, st.st_mtime_ns, sha]
        self.dirty = True
        return sha

    def tree(self, folder: Path) -> str:
        """Digest of a folder: every file's relative path and sha256 (the files ``walk_files`` yields)."""
        folder = Path(folder)
        if folder.is_file():
            return self.file(folder)
        files = walk_files(folder)
        self._hash_many([p for _, p in files])
        return digest(sorted((rel, self.file(p)) for rel, p in files))

    def _hash_many(self, paths: list) -> None:
        """Hash the files the cache lacks on several threads (file reads and sha256 release the GIL): a model's
        shards are read at once, not one after another (17 GB of Kolors weights on a build's first run)."""
        misses = []
        for path in paths:
            key, st, sha = self._cached(path)
            if sha is None:
                misses.append((path, key, st))
        if len(misses) < 2:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(len(misses), os.cpu_count() or 1, 8)) as pool:
            shas = list(pool.map(lambda m: sha256_file(m[0]), misses))
        for (_, key, st), sha in zip(misses, shas):
            self._store(key, st, sha)

    def save(self) -> None:
        if self.dirty:
            atomic_write(self.cache_file, json.dumps(self.cache, sort_keys=True, indent=0) + "\n")
            self.dirty = False


def lock_path(spec: Path) -> Path:
    return Path(spec).with_suffix(".lock")


_SHA = re.compile(r"[0-9a-f]{64}")


def _is_sha(v) -> bool:
    return isinstance(v, str) and bool(_SHA.fullmatch(v))


def _sha_or_none(v) -> bool:
    return v is None or _is_sha(v)


@dataclass(frozen=True)
class LockEntry:
    """One stage's record in the lock. Parsed and checked on load: a malformed entry is stale, never a crash."""

    params: dict  # the spec slice the stage hashed
    params_hash: str
    storyc: str  # the storyc version that wrote it
    deps: dict  # upstream stage -> its digest when this stage ran
    models: dict  # model key -> fingerprint
    outputs: dict  # path relative to the build folder -> {sha256, size} (file) or {sha256, files} (folder)
    digest: str  # what downstream stages depend on: outputs + digest facts
    extra: dict | None = None  # facts (scores, chosen seeds, the verdict)

    @classmethod
    def parse(cls, raw) -> "LockEntry | None":
        if not isinstance(raw, dict):
            return None
        try:
            e = cls(params=raw["params"], params_hash=raw["params_hash"], storyc=raw.get("storyc", ""),
                    deps=raw.get("deps") or {}, models=raw.get("models") or {}, outputs=raw["outputs"],
                    digest=raw["digest"], extra=raw.get("extra"))
        except (KeyError, TypeError):
            return None
        ok = (isinstance(e.params, dict) and isinstance(e.params_hash, str) and _is_sha(e.digest)
              and isinstance(e.storyc, str)
              and isinstance(e.deps, dict) and all(isinstance(k, str) and _sha_or_none(v) for k, v in e.deps.items())
              and isinstance(e.models, dict) and all(isinstance(k, str) and _sha_or_none(v) for k, v in e.models.items())
              and isinstance(e.outputs, dict) and all(isinstance(k, str) and _output_ok(v) for k, v in e.outputs.items())
              and (e.extra is None or isinstance(e.extra, dict)))
        return e if ok else None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["extra"] is None:
            del d["extra"]
        return d

    @property
    def facts(self) -> dict:
        return self.extra or {}


def _output_ok(rec) -> bool:
    if not isinstance(rec, dict) or not _is_sha(rec.get("sha256")):
        return False
    n = rec.get("size", rec.get("files"))
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


class Lock:
    def __init__(self, path: Path, stages: dict | None = None, problem: str | None = None):
        self.path = Path(path)
        self.stages: dict = {}  # name -> LockEntry
        self.malformed: set = set()  # names whose entry on disk could not be used
        for name, raw in (stages or {}).items():
            e = raw if isinstance(raw, LockEntry) else LockEntry.parse(raw)
            if e is None:
                self.malformed.add(name)
            else:
                self.stages[name] = e
        self.problem = problem  # why the file on disk could not be used, if it could not

    @classmethod
    def load(cls, path: Path) -> "Lock":
        from .errors import SpecError
        from .yamlio import MAX_BYTES, NotRegular, load, read_regular

        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            raw = read_regular(path, 64 * MAX_BYTES + 1)
        except NotRegular:
            raise StorycError(f"{path} is not a regular file (a pipe, a device or a socket)",
                              "point --lock at a file, or remove it to rebuild from scratch") from None
        except OSError as e:
            raise StorycError(f"cannot read {path}: {e.strerror}", "check the file's permissions") from None
        if len(raw) > 64 * MAX_BYTES:
            return cls(path, problem=f"{path.name} is larger than any storyc lock; every stage is rechecked")
        try:  # the bounded loader: no alias bomb, no duplicate keys, no Python tags
            data = load(path, path.name, text=raw.decode("utf-8-sig")).data
        except (SpecError, UnicodeDecodeError) as e:
            return cls(path, problem=f"{path.name} is not valid YAML ({type(e).__name__}); every stage is rechecked")
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            return cls(path, problem=f"{path.name} is not a storyc lock; every stage is rechecked")
        fmt = data.get("format")
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > LOCK_FORMAT:
            raise StorycError(f"{path} was written by a newer storyc (lock format {fmt}; this storyc reads {LOCK_FORMAT})",
                              "upgrade storyc (pip install -U storyc), or delete the lock to rebuild from scratch")
        if fmt != LOCK_FORMAT:
            return cls(path, problem=f"{path.name} has lock format {fmt!r}, expected {LOCK_FORMAT}; every stage is rechecked")
        return cls(path, dict(data.get("stages") or {}))

    def entry(self, name: str) -> LockEntry | None:
        return self.stages.get(name)

    def put(self, name: str, entry: LockEntry) -> None:
        self.stages[name] = entry
        self.malformed.discard(name)

    def text(self, spec_name: str) -> str:
        doc = {"format": LOCK_FORMAT, "storyc": __version__, "spec": spec_name,
               "stages": {k: self.stages[k].to_dict() for k in self.stages}}
        header = "# storyc lock file: commit it beside the spec. Written by `storyc build`; do not edit.\n"
        return header + yaml_text(doc, sort_keys=True, width=120)

    def save(self, spec_name: str) -> bool:
        text = self.text(spec_name)
        try:
            if self.path.read_text("utf-8") == text:
                return False
        except (OSError, UnicodeDecodeError):
            pass
        atomic_write(self.path, text)
        return True
