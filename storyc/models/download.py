"""ModelScope: whether its hub answers (the one offline check, honouring modelscope's own MODELSCOPE_ENDPOINT),
and `modelscope:<id>` model references downloaded once into .storyc/models/<id> with modelscope's client."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..errors import StorycError


def endpoint() -> str:
    """The hub modelscope's client talks to: its own MODELSCOPE_ENDPOINT setting, else the public site."""
    return os.environ.get("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn"


def require_modelscope(what: str, hint: str, error=StorycError) -> None:
    """Fail fast, with ``hint``, when the hub does not answer (instead of hanging in the client's retries)."""
    url = urlparse(endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError:
        raise error(f"cannot reach ModelScope at {endpoint()} to {what} (no network)", hint) from None


def done_marker(target: Path, patterns=None) -> Path:
    """The file that says a download finished: the whole repository, or (``patterns``) that part of it."""
    if not patterns:
        return Path(target) / ".complete"
    import hashlib

    return Path(target) / f".complete-{hashlib.sha256(chr(10).join(patterns).encode()).hexdigest()[:12]}"


def downloaded(target: Path, patterns=None) -> bool:
    """Whether the repository (or the part ``patterns`` picks) is in ``target`` already; a whole one holds any part."""
    return (Path(target) / ".complete").exists() or done_marker(target, patterns).exists()


def snapshot(model_id: str, root: Path, patterns=None) -> Path:
    """``model_id`` downloaded once under ``root``; with ``patterns``, only the files they match."""
    target = Path(root) / model_id
    if downloaded(target, patterns):
        return target
    require_modelscope(f"download `{model_id}`", "download it where you have network into a folder and point the "
                       f"spec at that folder instead of `modelscope:{model_id}`")
    from modelscope import snapshot_download

    path = Path(snapshot_download(model_id, local_dir=str(target), allow_file_pattern=patterns))
    done_marker(path, patterns).write_text(model_id + "\n")
    return path
