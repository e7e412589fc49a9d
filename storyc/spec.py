"""Load a story spec: YAML with positions, ``extends`` merging, JSON Schema validation, named rules.

``load_story(path)`` returns a :class:`Story` or raises one :class:`SpecError` listing every problem.
Light on purpose: no torch, diffsynth, data_juicer or transformers on this path.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import rules
from .errors import Diagnostic, Mark, SpecError, did_you_mean
from .model import ModelRef, Spec, Story
from .project import inside as _inside, outside_hint, project_root, root_and_why
from .schema import defaults, schema
from .yamlio import Located, get_path, json_path, load, type_name

TINY_MODELS = ("kolors", "sdxl-vae", "aesthetic")
# ---------------------------------------------------------------- extends

def _scene_edits(base: Located, child: Located) -> Located:
    """`scenes` in a spec that extends another: when every scene it lists has the id of one of the base's scenes,
    those scenes are edited in place (their keys merge; the order and the other scenes stay). Otherwise the list
    is a story of its own and replaces the base's, as any list does. Positions follow: a key the child wrote
    points at the child's line, the rest at the base's."""
    bs, cs = base.data.get("scenes"), child.data.get("scenes")
    if not (isinstance(bs, list) and isinstance(cs, list) and cs):
        return child
    ids = [s.get("id") if isinstance(s, dict) else None for s in bs]
    if not all(isinstance(s, dict) and s.get("id") in ids for s in cs):
        return child
    if len({s["id"] for s in cs}) != len(cs):
        return child  # an id twice: the rules report it on the child's list as written
    at = {s["id"]: j for j, s in enumerate(cs)}
    merged = [{**b, **cs[at[b["id"]]]} if isinstance(b, dict) and b.get("id") in at else b for b in bs]
    values = {p: m for p, m in child.values.items() if p[:1] != ("scenes",)}
    keys = {p: m for p, m in child.keys.items() if p[:1] != ("scenes",)}
    for table, btable, ctable in ((values, base.values, child.values), (keys, base.keys, child.keys)):
        for p, m in btable.items():
            if p[:1] == ("scenes",) and len(p) > 1:
                table[p] = m
        for p, m in ctable.items():
            if p[:1] == ("scenes",) and len(p) > 1:
                table[("scenes", ids.index(cs[p[1]]["id"]), *p[2:])] = m
        if ("scenes",) in ctable:
            table[("scenes",)] = ctable[("scenes",)]
    return Located({**child.data, "scenes": merged}, values, keys)


def _merge(base: Located, child: Located) -> Located:
    child = _scene_edits(base, child)

    def deep(b, c):
        if isinstance(b, dict) and isinstance(c, dict):
            out = dict(b)
            for k, v in c.items():
                out[k] = deep(b[k], v) if k in b else v
            return out
        return c  # scalars and lists replace

    data = deep(base.data, child.data)

    def shadowed(p):  # a base position hidden by a child value that replaced (not merged) it
        for i in range(len(p) + 1):
            pre = p[:i]
            if pre in child.values and not isinstance(get_path(child.data, pre), dict):
                return True
        return False

    values = {p: m for p, m in base.values.items() if not shadowed(p)}
    keys = {p: m for p, m in base.keys.items() if not shadowed(p)}
    values.update(child.values)
    keys.update(child.keys)
    return Located(data, values, keys)


MAX_EXTENDS = 32  # far beyond real use; keeps a generated 1500-file chain a clear error, not a recursion error


def _load_chain(path: Path, root: Path, display, stack: tuple) -> tuple[Located, tuple]:
    loc = load(path, display(path))
    ext = loc.data.get("extends")
    if ext is None:
        return loc, (path,)
    mark = loc.values.get(("extends",))
    if not isinstance(ext, str) or not ext:
        return loc, (path,)  # the schema reports the type
    base_path = (path.parent / ext).resolve()
    if len(stack) >= MAX_EXTENDS:
        raise SpecError([Diagnostic(f"`extends` chain is longer than {MAX_EXTENDS} files", mark, "$.extends",
                                    rule="extends_cycle", hint="merge some of the base specs into one")])
    if base_path in stack or base_path == path:
        chain = " -> ".join(display(p) for p in (*stack, path, base_path))
        raise SpecError([Diagnostic(f"`extends` cycle: {chain}", mark, "$.extends", rule="extends_cycle",
                                    hint="a spec may not extend itself, directly or through others")])
    if not _inside(base_path, root):
        raise SpecError([Diagnostic(f"`{ext}` is outside the project folder", mark, "$.extends", rule="paths",
                                    hint=outside_hint(*root_and_why(path)))])
    if not base_path.is_file():
        near = did_you_mean(Path(ext).stem, [p.stem for p in base_path.parent.glob("*.y*ml")]) if base_path.parent.is_dir() else None
        raise SpecError([Diagnostic(f"`extends: {ext}`: no such file", mark, "$.extends", hint=near, rule="paths")])
    base, chain = _load_chain(base_path, root, display, (*stack, path))
    merged = _merge(base, loc)
    merged.data.pop("extends", None)
    return merged, (path, *chain)


# ---------------------------------------------------------------- schema

def _schema_diagnostics(loc: Located) -> list[Diagnostic]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    out = []
    for err in validator.iter_errors(loc.data):
        out.extend(_explain(err, loc))
    return out


_SLUG_HINT = "use lowercase letters, digits and `-`, starting with a letter or digit"


def _explain(err, loc: Located) -> list[Diagnostic]:
    path = tuple(err.absolute_path)
    v, kw, sub = err.instance, err.validator, err.schema
    mark = loc.mark(path)

    def d(msg, hint=None, p=path, m=None):
        return Diagnostic(msg, m or mark, json_path(p), hint)

    if kw == "additionalProperties":
        allowed = list(err.schema.get("properties", {}))
        extra = [k for k in v if k not in allowed]
        if not allowed:  # typed additionalProperties (e.g. dj op params): explained by the sub-errors
            return [d(err.message)]
        return [d(f"unknown key `{k}`", did_you_mean(k, allowed) or f"allowed keys: {', '.join(allowed)}",
                  path + (k,), loc.mark(path + (k,), prefer_key=True)) for k in extra]
    if kw == "required":
        key = err.message.split("'")[1]
        what = "mapping" if path else "spec"
        example = {"version": "version: 1", "scenes": "scenes: [{id: ..., prompt: ..., seed: ...}]"}.get(key, f"{key}: ...")
        return [d(f"missing required key `{key}`", f"add `{example}` to this {what}")]
    if kw == "type":
        want = sub["type"] if isinstance(sub["type"], list) else [sub["type"]]
        names = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
                 "object": "a mapping", "array": "a list", "null": "null"}
        hint = None
        if isinstance(v, str) and "integer" in want and v.strip().lstrip("-").isdigit():
            hint = f"write {v.strip()} without quotes"
        elif isinstance(v, dict) and "string" in want and path and path[-1] in ("prompt", "description", "prefix"):
            hint = "a text that starts with `{character}` must be quoted: prompt: \"{girl}，...\""
        elif isinstance(v, str) and "number" in want:
            hint = "write the number without quotes (1.0e-4, not \"1e-4\")" if _is_num(v) else None
        return [d(f"expected {' or '.join(names[t] for t in want)}, got {type_name(v)} `{_short(v)}`", hint)]
    if kw == "enum":
        opts = sub["enum"]
        hint = did_you_mean(v, opts)
        if path == ("lora", "type") and v in ("locon", "lycoris", "glora", "boft", "oft"):
            hint = (f"{v} is not supported (storyc adapts the UNet's Linear layers only): use lora, dora, loha or "
                    "lokr")
        return [d(f"`{_short(v)}` is not one of: {', '.join(map(str, opts))}", hint)]
    if kw == "const":
        if path == ("version",):
            return [d(f"unsupported spec version `{_short(v)}`; this storyc reads version 1", "write `version: 1`")]
        return [d(f"expected `{sub['const']}`, got `{_short(v)}`")]
    if kw in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        rel = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "greater than",
               "exclusiveMaximum": "less than"}[kw]
        return [d(f"must be {rel} {sub[kw]}, got {_short(v)}")]
    if kw == "multipleOf":
        m = sub["multipleOf"]
        lo, hi = int(v // m * m), int(v // m * m + m)
        return [d(f"{v} is not a multiple of {m}", f"use {lo} or {hi}")]
    if kw == "pattern":
        return [d(f"`{_short(v)}` is not a valid slug", _SLUG_HINT + (f", e.g. `{_slugify(v)}`" if _slugify(v) else ""))]
    if kw == "minLength":
        return [d("must not be empty")]
    if kw == "maxLength":
        return [d(f"is longer than {sub['maxLength']} characters")]
    if kw == "minItems":
        return [d(f"needs at least {sub['minItems']} item{'s' if sub['minItems'] > 1 else ''}, got {len(v)}")]
    if kw == "maxItems":
        return [d(f"takes at most {sub['maxItems']} items, got {len(v)}")]
    if kw == "uniqueItems":
        return [d("items must be unique", "remove the repeated entry")]
    if kw in ("minProperties", "maxProperties") and len(path) == 2 and path[0] == "filters":
        return [d(f"each filter is one `op_name: {{params}}` mapping; this item has {len(v)} keys",
                  "start each op with its own `- ` line")]
    if kw == "oneOf":
        if path and path[-1] == "devices":
            return [d(f"expected \"auto\", a GPU count or a list of GPU indices, got `{_short(v)}`")]
        if path and path[-1] == "resolution":
            return [d(f"expected one side (multiple of 32, 64..4096) or [width, height], got `{_short(v)}`")]
        from .schema import resolve

        branches = [resolve(b) for b in sub.get("oneOf", ())]
        words = [o for b in branches for o in (b.get("enum") or ([b["const"]] if "const" in b else []))
                 if isinstance(o, str)]
        if isinstance(v, str) and words:  # a misspelt word of a field that also takes a mapping
            more = " (or a mapping)" if any(b.get("type") == "object" or "properties" in b for b in branches) else ""
            return [d(f"`{_short(v)}` is not one of: {', '.join(words)}{more}", did_you_mean(v, words))]
        if isinstance(v, dict) and err.context:  # e.g. null or a mapping: the mapping's own problem, explained
            from jsonschema.exceptions import best_match

            # the mapping branch's errors: not the other branches' "this is not null / not that constant" about
            # the value itself (a wrong enum *inside* the mapping is the mapping's own problem)
            inner = [e for e in err.context
                     if not (tuple(e.absolute_path) == path and e.validator in ("type", "const", "enum"))]
            return _explain(best_match(inner or err.context), loc)
    return [d(err.message)]


def _is_num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _short(v) -> str:
    from .render import one_line

    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else one_line(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _slugify(v) -> str:
    import re

    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", str(v).lower())).strip("-")


apply_defaults = defaults  # the schema fills every default (storyc.schema)


# ---------------------------------------------------------------- entry point

def load_story(path, display=None) -> Story:
    path = Path(path)
    spec = path.resolve()
    root = project_root(spec)
    show = display or (lambda p: _display(p))
    loc, chain = _load_chain(spec, root, show, ())
    return story_from(loc, chain, root, spec)


def load_located(path, display=None) -> tuple[Located, tuple, Path, Path]:
    """The merged spec with positions (extends applied), not yet validated: (loc, chain, root, spec)."""
    spec = Path(path).resolve()
    root = project_root(spec)
    loc, chain = _load_chain(spec, root, display or (lambda p: _display(p)), ())
    return loc, chain, root, spec


def story_from(loc: Located, chain: tuple, root: Path, spec: Path) -> Story:
    """Validate a located spec (schema, then the named rules) into a typed Story, or raise every problem."""
    diags = _schema_diagnostics(loc)
    data = defaults(loc.data)
    inp = rules.RuleInput(data=data, loc=loc, root=root, spec=spec, schema_ok=not diags)
    diags.extend(rules.run_all(inp))
    errors = [d for d in diags if d.severity == "error"]
    if errors:
        raise SpecError(errors)
    return Story(spec_path=spec, root=root, files=chain, spec=Spec.build(data), resolved=data,
                 models=rules.model_refs(inp)[0], dataset_paths=rules.dataset_paths(inp),
                 warnings=tuple(d for d in diags if d.severity == "warning"),
                 character_paths=rules.character_paths(inp), mask_paths=rules.mask_paths(inp),
                 caption_paths=rules.caption_paths(inp), validation_path=rules.validation_path(inp))


def _display(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


__all__ = ["load_story", "load_located", "story_from", "schema", "apply_defaults", "project_root", "ModelRef", "Mark"]
