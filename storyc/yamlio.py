"""Safe YAML loading that keeps every value's file:line:col.

PyYAML's SafeLoader alone silently keeps the last of duplicate keys, turns dates into datetime objects and
expands alias bombs; this loader composes the node tree and converts it itself so it can refuse all three and
remember where each value came from.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from .errors import Diagnostic, Mark, SpecError

MAX_BYTES = 4 * 1024 * 1024
MAX_NODES = 100_000  # far above any real spec; an alias bomb hits it in microseconds
MAX_EXPANDED = 2 * MAX_BYTES  # text after aliases are expanded: a few aliases to a huge string hit this, not the node cap
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge")}


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when present: ~8x faster parse
    pass


# Dates stay strings: a title like 2024-08-09 must not become a datetime.
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def get_path(data, path):
    """The value at ``path`` (keys and indices) of plain data."""
    for p in path:
        data = data[p]
    return data


def json_path(parts) -> str:
    out = "$"
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and p.replace("_", "a").replace("-", "a").isalnum() and not p[:1].isdigit():
            out += f".{p}"
        else:
            out += f"[{p!r}]"
    return out


class Located:
    """Parsed data plus where every value (and every mapping key) sits in its file."""

    def __init__(self, data, values: dict, keys: dict):
        self.data = data
        self.values = values  # path tuple -> Mark of the value
        self.keys = keys  # path tuple -> Mark of the key that holds it

    def mark(self, path, prefer_key: bool = False) -> Mark | None:
        path = tuple(path)
        while True:
            table = (self.keys, self.values) if prefer_key else (self.values, self.keys)
            for t in table:
                if path in t:
                    return t[path]
            if not path:
                return None
            path = path[:-1]


def _mark(file: str, m) -> Mark:
    return Mark(file, m.line + 1, m.column + 1)


class NotRegular(OSError):
    """A path that is a FIFO, a device or a socket: reading it could block forever or never end."""


def read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file (a folder raises IsADirectoryError; a FIFO, device or socket
    NotRegular), never blocking: the file is opened without waiting for a writer and checked before reading."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "Is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"{path} is not a regular file")
        return f.read(limit)


def read_text(path: Path, name: str | None = None) -> str:
    name = name or str(path)
    try:
        raw = read_regular(path, MAX_BYTES + 1)
    except NotRegular:
        raise SpecError([Diagnostic(f"{name} is not a regular file (a pipe, a device or a socket)", rule="yaml")]) from None
    except FileNotFoundError:
        raise SpecError([Diagnostic(f"no such file: {name}", rule="yaml")]) from None
    except IsADirectoryError:
        raise SpecError([Diagnostic(f"{name} is a folder, not a spec file", rule="yaml")]) from None
    except OSError as e:
        raise SpecError([Diagnostic(f"cannot read {name}: {e.strerror}", rule="yaml")]) from None
    if len(raw) > MAX_BYTES:
        raise SpecError([Diagnostic(f"file is {len(raw)} bytes; a spec may be at most {MAX_BYTES}", Mark(name, 1, 1), rule="yaml")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        before = raw[: e.start]
        line = before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        raise SpecError([Diagnostic(
            f"file is not UTF-8 text (byte 0x{raw[e.start]:02x} cannot be decoded)", Mark(name, line, col),
            hint="save the file as UTF-8", rule="yaml")]) from None


def load(path: Path, display: str | None = None, text: str | None = None) -> Located:
    """Load one YAML file (or its ``text``, already read) into plain data with positions; raise SpecError on any
    problem. Bounded: aliases expand to at most MAX_NODES nodes and MAX_EXPANDED characters."""
    name = display or str(path)
    text = read_text(path, name) if text is None else text
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise SpecError([Diagnostic("file is empty", Mark(name, 1, 1), rule="yaml",
                                    hint="a spec needs at least `version: 1`, `story: {id: ...}` and `scenes:`; "
                                         "`storyc init DIR` writes a starter")])
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        if "expected a single document" in str(e.context or ""):
            problem = "more than one YAML document (`---`); a spec is one document"
        raise SpecError([Diagnostic(f"YAML syntax error: {problem}", _mark(name, m) if m else Mark(name, 1, 1),
                                    rule="yaml")]) from None
    except yaml.YAMLError as e:
        raise SpecError([Diagnostic(f"YAML error: {e}", Mark(name, 1, 1), rule="yaml")]) from None
    finally:
        loader.dispose()

    values, keys, problems = {}, {}, []
    count, size = [0], [0]

    def bad_tag(n, path):
        tag = n.tag.replace("tag:yaml.org,2002:", "!!")
        problems.append(Diagnostic(f"YAML tag `{tag}` is not allowed", _mark(name, n.start_mark), json_path(path),
                                   hint="specs are plain data; storyc never constructs Python objects", rule="yaml"))

    def convert(n, path):
        count[0] += 1
        if count[0] > MAX_NODES:
            raise SpecError([Diagnostic(f"document expands to more than {MAX_NODES} values (YAML alias bomb?)",
                                        _mark(name, n.start_mark), json_path(path), rule="yaml")])
        values[path] = _mark(name, n.start_mark)
        if n.tag not in _PLAIN_TAGS:
            bad_tag(n, path)
            return None
        if isinstance(n, yaml.MappingNode):
            try:
                loader.flatten_mapping(n)  # merge keys (<<)
            except yaml.MarkedYAMLError as e:
                problems.append(Diagnostic(f"YAML error: {e.problem}", _mark(name, e.problem_mark), json_path(path), rule="yaml"))
            out = {}
            for kn, vn in n.value:
                if not isinstance(kn, yaml.ScalarNode):
                    problems.append(Diagnostic("mapping keys must be plain scalars", _mark(name, kn.start_mark),
                                               json_path(path), rule="yaml"))
                    continue
                key = loader.construct_object(kn) if kn.tag in _PLAIN_TAGS else kn.value
                if not isinstance(key, str):
                    key = kn.value  # keys are names: `yes:` or `1:` stay text
                if key in out:
                    first = keys[path + (key,)]
                    problems.append(Diagnostic(f"duplicate key `{key}` (first at line {first.line})",
                                               _mark(name, kn.start_mark), json_path(path + (key,)),
                                               hint="YAML keeps only one of them; remove or rename one", rule="yaml"))
                    continue
                keys[path + (key,)] = _mark(name, kn.start_mark)
                out[key] = convert(vn, path + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [convert(item, path + (i,)) for i, item in enumerate(n.value)]
        size[0] += len(n.value)
        if size[0] > MAX_EXPANDED:
            raise SpecError([Diagnostic(f"document expands to more than {MAX_EXPANDED} characters of text "
                                        "(YAML aliases repeating a large value?)", _mark(name, n.start_mark),
                                        json_path(path), rule="yaml")])
        v = loader.construct_object(n)
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(Diagnostic(f"`{n.value}` is not a finite number", _mark(name, n.start_mark),
                                       json_path(path), hint="every number in a spec must be finite", rule="finite"))
        return v

    data = convert(node, ())
    if problems:
        raise SpecError(problems)
    if not isinstance(data, dict):
        raise SpecError([Diagnostic(f"a spec is a mapping of keys, got {type_name(data)}", Mark(name, 1, 1), rule="yaml")])
    return Located(data, values, keys)


def type_name(v) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)
