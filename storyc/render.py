"""Jinja2 rendering (StrictUndefined) and atomic file writes."""
from __future__ import annotations

import json
import os
import shlex
import tempfile
from functools import lru_cache
from pathlib import Path

import yaml


def canonical_json(obj) -> str:
    """Stable, diff-friendly JSON: sorted keys, two-space indent, UTF-8 text, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"  # strict JSON


def to_yaml(obj, indent: int = 0) -> str:
    text = yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    pad = " " * indent
    return "\n".join(pad + ln if ln else ln for ln in text.rstrip("\n").splitlines())


@lru_cache(maxsize=1)
def env():
    import jinja2
    from importlib import resources

    e = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda n: resources.files("storyc").joinpath("templates", n).read_text("utf-8")),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
    )
    e.filters["to_yaml"] = to_yaml
    e.filters["shq"] = lambda v: shlex.quote(str(v))
    e.filters["json"] = lambda v: json.dumps(v, ensure_ascii=False)
    e.filters["comment"] = comment_text
    e.filters["md"] = markdown_text
    return e


def markdown_text(v) -> str:
    """Text from a spec inside Markdown (a table cell too): no raw HTML, no cell breaks, one line."""
    import html

    return html.escape(str(v), quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def csv_cell(v):
    """A spreadsheet-safe CSV cell: text that a spreadsheet would run as a formula gets a leading quote."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def comment_text(v) -> str:
    """A value on one line of a `#` comment: control characters (a newline in a file name) escaped, so nothing
    from a spec can end the comment and become code in a shell script or config."""
    return json.dumps(str(v), ensure_ascii=False)[1:-1]


def render(template: str, **ctx) -> str:
    return env().get_template(template).render(**ctx)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, data, mode: str = "w") -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb" if "b" in mode else "w", **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
