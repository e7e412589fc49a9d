"""`modelscope:<id>` model references: download once into .storyc/models/<id> with modelscope's own client."""
from __future__ import annotations

import socket
from pathlib import Path

from ..errors import StorycError


def snapshot(model_id: str, root: Path) -> Path:
    target = Path(root) / model_id
    if (target / ".complete").exists():
        return target
    try:  # fail fast offline instead of hanging in the client's retries
        socket.create_connection(("www.modelscope.cn", 443), timeout=5).close()
    except OSError:
        raise StorycError(f"cannot reach ModelScope to download `{model_id}` (no network)",
                          f"download it where you have network into a folder and point the spec at that folder "
                          f"instead of `modelscope:{model_id}`") from None
    from modelscope import snapshot_download

    path = Path(snapshot_download(model_id, local_dir=str(target)))
    (path / ".complete").write_text(model_id + "\n")
    return path
