"""The content-addressed cache (``.storyc/cache`` or ``--cache DIR``): trained LoRAs as sealed folders (entries),
VAE latents and prompt embeddings as sealed files. Shared by every story of a project, and possibly by a cluster
over NFS, so nothing in it is trusted until verified:

- a key is the digest of everything the bytes depend on (``key``);
- a file or entry is written under a temporary name, renamed, then sealed with the sha256 of its bytes (a
  ``.sha256`` beside a file; ``DONE``, listing every file's digest and size, inside an entry);
- before use its bytes are read and checked against the seal. A missing, empty or different seal means "not
  sealed": the data is dropped (with a warning) and made again. Size and mtime are never taken as proof: bit rot
  keeps both.

Verification reads every byte once per process (a process that reuses a LoRA or a latent twice hashes it once): the
files are small next to the work they save (a rank-16 LoRA is tens of MB, a 1024-px latent 128 kB), and the bytes
are read right after anyway.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from .lock import digest
from .render import atomic_write, canonical_json

ENTRY_FORMAT = "storyc.train_cache/1"
_SHA = re.compile(r"[0-9a-f]{64}")
_verified: dict = {}  # (path, size, mtime_ns, inode) -> sha256 read this process


def key(**parts) -> str:
    """The content address of what ``parts`` (everything the cached bytes depend on) describe."""
    return digest(parts)


def sha256(path: Path) -> str:
    """sha256 of the file's bytes, read in full once per process (memoised by size, mtime and inode)."""
    st = os.stat(path)
    memo = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _verified:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _verified[memo] = h.hexdigest()
    return _verified[memo]


# ---------------------------------------------------------------- files (latents, prompt embeddings)

def _seal_of(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_file(path: Path, write) -> None:
    """``write(tmp)`` writes the data to a temporary name; it is renamed into place and sealed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    sha = sha256(tmp)
    _seal_of(path).unlink(missing_ok=True)  # never new bytes under an old seal
    tmp.replace(path)
    atomic_write(_seal_of(path), sha + "\n")


def file_ok(path: Path, report=None) -> bool:
    """The file is there, sealed, and its bytes are the sealed ones; else it is removed (a warning says why when it
    was there) and the caller makes it again."""
    if not path.is_file():
        return False
    try:
        want = _seal_of(path).read_text("utf-8").strip()
    except OSError:
        want = ""
    why = None
    if not _SHA.fullmatch(want):
        why = "not sealed"
    elif sha256(path) != want:
        why = "its bytes differ from its seal"
    if why is None:
        return True
    if report is not None:
        report.line(f"warning: cache file {path.parent.name}/{path.name[:12]}… {why}; making it again")
    path.unlink(missing_ok=True)
    _seal_of(path).unlink(missing_ok=True)
    return False


# ---------------------------------------------------------------- entries (trained LoRAs)

def seal_entry(work: Path, entry_key: str) -> None:
    """Record every file of a finished entry (and its digest) in ``DONE``: written last, so a folder without it is
    unfinished."""
    files = {f.relative_to(work).as_posix(): {"sha256": sha256(f), "size": f.stat().st_size}
             for f in sorted(work.rglob("*")) if f.is_file() and f.name != "DONE"}
    atomic_write(work / "DONE", canonical_json({"format": ENTRY_FORMAT, "key": entry_key, "files": files}))


def entry_problem(final: Path) -> str | None:
    """Why the entry cannot be used (None: sealed, complete and byte-for-byte what was sealed)."""
    try:
        done = json.loads((final / "DONE").read_text("utf-8"))
    except (OSError, ValueError):
        return "not sealed"
    files = done.get("files") if isinstance(done, dict) else None
    if not isinstance(files, dict) or not files or done.get("key") != final.name:
        return "not sealed"
    on_disk = {f.relative_to(final).as_posix() for f in final.rglob("*") if f.is_file() and f.name != "DONE"}
    if on_disk != set(files):
        return f"its files differ from its seal ({', '.join(sorted(on_disk ^ set(files))[:3])})"
    for name, rec in sorted(files.items()):
        f = final / name
        if not isinstance(rec, dict) or f.stat().st_size != rec.get("size") or sha256(f) != rec.get("sha256"):
            return f"{name} differs from its seal"
    return None


def entry_ok(final: Path, report=None) -> bool:
    """A sealed, intact entry; anything else is removed (with a warning when it was there) and made again."""
    if not final.exists():
        return False
    why = entry_problem(final)
    if why is None:
        return True
    if report is not None:
        report.line(f"warning: cache entry {final.name[:12]} {why}; dropping it and making it again")
    shutil.rmtree(final, ignore_errors=True)
    return False


def publish_entry(work: Path, final: Path, entry_key: str) -> None:
    """Seal the finished work folder and move it into place (replacing what was there)."""
    seal_entry(work, entry_key)
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
