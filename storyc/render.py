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


class _Dumper(yaml.SafeDumper):
    """Readable UTF-8 YAML in which no string can break out of its scalar: one holding anything unprintable
    (U+2028, U+0085, NUL, controls, bidi marks) is written double-quoted, where the emitter escapes line breaks
    and controls, so every YAML 1.1 or 1.2 reader gets the same document back. No anchors or aliases: what
    storyc writes is plain data, and a file holding them is not one of storyc's."""

    def ignore_aliases(self, data):
        return True


def _represent_str(dumper, s: str):
    style = '"' if not all(c.isprintable() or c == "\n" for c in s) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_Dumper.add_representer(str, _represent_str)


def yaml_text(obj, sort_keys: bool = False, width: int = 1000) -> str:
    """YAML through the emitter (never by pasting text into a template)."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=sort_keys, allow_unicode=True, default_flow_style=False,
                     width=width)


def yaml_file(header: list[str], obj, sort_keys: bool = False) -> str:
    """A YAML file with `#` comment lines on top: each header line made one line (``one_line``) first."""
    return "".join(f"# {one_line(ln)}\n" for ln in header) + yaml_text(obj, sort_keys)


def to_yaml(obj, indent: int = 0) -> str:
    text = yaml_text(obj)
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

    text = " ".join(str(v).splitlines())  # every Unicode line break (\n, \r, U+0085, U+2028, ...) becomes a space
    return html.escape(one_line(text), quote=False).replace("|", "\\|")


def csv_cell(v):
    """A spreadsheet-safe CSV cell: text that a spreadsheet would run as a formula gets a leading quote."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(v) -> str:
    """Text that stays on its line of a generated file and shows what it is: every character that is not
    printable (any Unicode line or paragraph break, NUL and other controls, bidi and other format characters)
    and the backslash are written as escapes (``\\u2028``), so nothing from a spec (a file name, a title) can
    end a comment and become code in a shell script or config, or reorder what a reader sees."""
    out = []
    for c in str(v):
        if c in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[c])
        elif c.isprintable():
            out.append(c)
        else:
            n = ord(c)
            out.append(f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")
    return "".join(out)


comment_text = one_line  # the `comment` filter of the templates


def render(template: str, **ctx) -> str:
    return env().get_template(template).render(**ctx)


_UMASK = os.umask(0)
os.umask(_UMASK)


def link_or_copy(src, dst) -> None:
    """``dst`` as a hard link to ``src`` (the same bytes, no copy), or a copy where links are refused (another file
    system)."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename in (None, tmp):  # disk full: name the file being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return path
