"""The spec's JSON Schema: the one source of its keys, types, defaults and each field's hashing policy.

Light (json and importlib only): validate, compile and status use it. ``x-hash`` on a property says how a stage
that hashes its section treats it: ``always`` (the default), ``when-set`` (only when it differs from its default,
so locks written before the field existed stay valid) or ``never`` (an execution setting).
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources

POLICIES = ("always", "when-set", "never")


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(resources.files("storyc").joinpath("schema/story.schema.json").read_text("utf-8"))


def resolve(node: dict) -> dict:
    """``node`` with its ``$ref`` (into ``$defs``) followed; its own keys win over the definition's."""
    defs = schema()["$defs"]
    while "$ref" in node:
        node = {**defs[node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def at(path: tuple) -> tuple[dict | None, list]:
    """The schema of the value at spec ``path`` (keys and list indices); (None, the names known there) when a
    key does not exist. A free-form mapping (a Data-Juicer op's parameters) gives {}."""
    s = resolve(schema())
    for p in path:
        if isinstance(p, int):
            if "items" not in s:
                return None, []
            s = resolve(s["items"])
            continue
        props = s.get("properties")
        if props is None and isinstance(s.get("additionalProperties"), dict):
            s = resolve(s["additionalProperties"])
            continue
        if props is None:
            if s.get("additionalProperties") is not False and s.get("type") in ("object", None):
                return {}, []
            return None, []
        if p not in props:
            return None, list(props)
        s = resolve(props[p])
    return s, []


def defaults(data: dict) -> dict:
    """A deep copy of ``data`` with every schema default filled in."""
    def fill(s, value):
        s = resolve(s)
        if isinstance(value, dict) and "properties" not in s:  # null or a mapping (oneOf): the mapping's defaults
            s = next((resolve(b) for b in s.get("oneOf", ()) if "properties" in resolve(b)), s)
        if isinstance(value, dict) and "properties" in s:
            for k, ps in s["properties"].items():
                ps = resolve(ps)
                if k not in value and "default" in ps:
                    value[k] = copy.deepcopy(ps["default"])
                if k in value:
                    value[k] = fill(ps, value[k])
        elif isinstance(value, dict) and isinstance(s.get("additionalProperties"), dict):  # id -> record maps
            value = {k: fill(s["additionalProperties"], v) for k, v in value.items()}
        elif isinstance(value, list) and isinstance(s.get("items"), dict):
            value = [fill(s["items"], x) for x in value]
        return value

    return fill(schema(), copy.deepcopy(data))


@lru_cache(maxsize=None)
def fields(path: tuple) -> dict:
    """name -> (hash policy, default) of every key of the mapping at spec ``path`` (("train",), ("dataset",))."""
    node, _ = at(path)
    out = {}
    for name, prop in node["properties"].items():
        prop = resolve(prop)
        policy = prop.get("x-hash", "always")
        assert policy in POLICIES, (path, name, policy)
        out[name] = (policy, prop.get("default"))
    return out
