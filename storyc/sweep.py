"""Sweeps in the spec language: a `sweep:` section names spec paths and their values; every variant is an ordinary
story, validated exactly as one (file:line of the sweep value that broke it, did-you-mean on paths).

    sweep:
      method: grid                  # or random (with samples and seed)
      parameters:
        generation.cfg_scale: [3.5, 4.0, 5.0]
        style.prefix: ["二次元，", "日系动漫，"]
      scenes:                       # whole-scene overrides, one option per variant
        wishing-star: [{seed: 7}, {seed: 8}, {seed: 9}]
      objective: mean_aesthetic     # or style_coherence, or {weights: {mean_aesthetic: 1, style_distance: -2}}
                                    # (also prompt_alignment, with models.clip_zh, and
                                    # character_consistency, with characters; character_dreamsim,
                                    # with them and models.dreamsim; and pickscore,
                                    # hpsv2, hpsv2_1, imagereward, mps with models.<that name>)

Light: no torch; `storyc validate` and `storyc plan` use it.
"""
from __future__ import annotations

import copy
import itertools
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import Diagnostic, SpecError, did_you_mean
from .lock import digest
from .model import PREFERENCE
from .yamlio import Located, get_path, json_path

_SEG = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclass(frozen=True)
class Variant:
    id: str  # "v-" + digest of its overrides: the same sweep gives the same ids
    overrides: dict  # "generation.cfg_scale" -> 4.0; "scenes[wishing-star]" -> {seed: 8}
    story: object  # the validated Story
    training: str  # digest of the slices its LoRA depends on: variants with the same one share a training


@dataclass(frozen=True)
class Sweep:
    spec: Path
    base: object  # the Story without its sweep section
    variants: tuple
    objective: dict  # metric -> weight
    trainings: int  # distinct trainings the variants need


def parse_path(text: str) -> tuple:
    """"filters[0].image_shape_filter.min_width" -> ("filters", 0, "image_shape_filter", "min_width")."""
    out = []
    for name, index in _SEG.findall(text):
        out.append(int(index) if index else name)
    if not out or "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in out).lstrip(".") != text:
        raise ValueError(text)
    return tuple(out)


def _set(data, path: tuple, value):
    cur = data
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value


def load_sweep(spec, display=None, only: str | None = None) -> Sweep | None:
    """The sweep of a spec (None when it has no `sweep:` section), every variant validated as a story
    (``only``: just that variant, as a trial needs)."""
    from .spec import load_located, story_from

    loc, chain, root, path = load_located(spec, display)
    if not isinstance(loc.data, dict) or "sweep" not in loc.data:
        return None
    base = story_from(_without(loc, ("sweep",)), chain, root, path)  # the story itself must be valid first
    return sweep_from(loc, chain, root, path, base, only)


def sweep_from(loc: Located, chain: tuple, root: Path, path: Path, base, only: str | None = None) -> Sweep:
    """Expand and validate the sweep of an already loaded spec whose story (without the sweep) is ``base``."""
    from .compiler import compile
    from .schema import at as schema_at
    from .spec import story_from

    sw = loc.data["sweep"]
    diags: list[Diagnostic] = []
    if not isinstance(sw, dict):
        raise SpecError([Diagnostic("expected a mapping", loc.mark(("sweep",)), "$.sweep", rule="sweep")])
    dims = []  # (label, spec path, [(value, sweep path of the value)])
    for key, values in (sw.get("parameters") or {}).items():
        at = ("sweep", "parameters", key)
        try:
            target = parse_path(str(key))
        except ValueError:
            diags.append(Diagnostic(f"`{key}` is not a spec path", loc.mark(at, prefer_key=True), json_path(at),
                                    "write it as dotted keys, e.g. generation.cfg_scale or filters[0].image_shape_filter",
                                    "sweep"))
            continue
        if target and target[0] in ("sweep", "version", "extends"):
            diags.append(Diagnostic(f"`{key}` cannot be swept", loc.mark(at, prefer_key=True), json_path(at),
                                    rule="sweep"))
            continue
        sub, names = schema_at(target)
        if sub is None:
            prefix = ".".join(str(p) for p in target[:-1])
            near = did_you_mean(str(target[-1]), names) if names else None
            diags.append(Diagnostic(f"`{key}`: the spec has no `{target[-1]}`" + (f" under `{prefix}`" if prefix else ""),
                                    loc.mark(at, prefer_key=True), json_path(at), near, "sweep"))
            continue
        if not isinstance(values, list) or not values:
            diags.append(Diagnostic("expected a non-empty list of values", loc.mark(at), json_path(at),
                                    f"e.g. `{key}: [a, b]`", "sweep"))
            continue
        dims.append((str(key), target, [(v, (*at, i)) for i, v in enumerate(values)]))
    scene_ids = [s.id for s in base.scenes]
    for sid, options in (sw.get("scenes") or {}).items():
        at = ("sweep", "scenes", sid)
        if sid not in scene_ids:
            diags.append(Diagnostic(f"no scene `{sid}`", loc.mark(at, prefer_key=True), json_path(at),
                                    did_you_mean(str(sid), scene_ids), "sweep"))
            continue
        if not isinstance(options, list) or not options or not all(isinstance(o, dict) for o in options):
            diags.append(Diagnostic("expected a non-empty list of scene overrides (mappings)", loc.mark(at),
                                    json_path(at), "e.g. `[{seed: 7}, {seed: 8}]`", "sweep"))
            continue
        dims.append((f"scenes[{sid}]", ("scenes", scene_ids.index(sid)), [(o, (*at, i)) for i, o in enumerate(options)]))
    objective = _objective(sw.get("objective", "mean_aesthetic"), loc, diags)
    if "prompt_alignment" in objective and "clip_zh" not in base.spec.models:
        at = ("sweep", "objective")
        diags.append(Diagnostic("the objective weighs prompt_alignment, which this story does not measure",
                                loc.mark(at), json_path(at), "set `models.clip_zh` (a Chinese CLIP folder)", "sweep"))
    for k in PREFERENCE:
        if k in objective and k not in base.spec.models:
            at = ("sweep", "objective")
            diags.append(Diagnostic(f"the objective weighs {k}, which this story does not measure", loc.mark(at),
                                    json_path(at), f"set `models.{k}` (modelscope:DiffSynth-Studio/"
                                    "QualityMetric_reward_pretrained, or a folder of it)", "sweep"))
    # measured for a character shown in two scenes or more (score.character_consistency)
    twice = any(sum(c in s.characters for s in base.spec.scenes) > 1 for c in base.spec.characters)
    for k in ("character_consistency", "character_dreamsim"):
        if k in objective and (not twice or (k == "character_dreamsim" and "dreamsim" not in base.spec.models)):
            at = ("sweep", "objective")
            diags.append(Diagnostic(f"the objective weighs {k}, which this story does not measure", loc.mark(at),
                                    json_path(at), "list a character in the `characters` of two scenes or more" if
                                    not twice else "set `models.dreamsim` (a folder of DreamSim's checkpoint)",
                                    "sweep"))
    if diags:
        raise SpecError(diags)
    if not dims:
        raise SpecError([Diagnostic("the sweep names no parameters and no scenes", loc.mark(("sweep",)), "$.sweep",
                                    "add `parameters: {generation.cfg_scale: [3.5, 5.0]}`", "sweep")])
    combos = list(itertools.product(*[d[2] for d in dims]))
    method = sw.get("method", "grid")
    if method == "random":
        n = sw.get("samples", 4)
        if not isinstance(n, int) or n < 1:
            raise SpecError([Diagnostic("expected a positive integer", loc.mark(("sweep", "samples")),
                                        "$.sweep.samples", rule="sweep")])
        rng = random.Random(sw.get("seed", 0))
        combos = rng.sample(combos, min(n, len(combos)))
    elif method != "grid":
        raise SpecError([Diagnostic(f"`{method}` is not one of: grid, random", loc.mark(("sweep", "method")),
                                    "$.sweep.method", did_you_mean(str(method), ["grid", "random"]), "sweep")])
    variants, problems = [], []
    for combo in combos:
        vloc = _without(loc, ("sweep",))
        overrides = {}
        for (label, target, _), (value, at) in zip(dims, combo):
            if label.startswith("scenes["):
                scene = copy.deepcopy(get_path(vloc.data, target))
                scene.update(copy.deepcopy(value))
                _point(vloc, loc, target, at, scene, merge=True)
            else:
                if not _exists_parent(vloc.data, target):
                    _make_parents(vloc.data, target)
                _point(vloc, loc, target, at, copy.deepcopy(value))
            overrides[label] = value
        vid = "v-" + digest(overrides)[:8]
        if only is not None and vid != only:
            continue
        try:
            story = story_from(vloc, chain, root, path)
        except SpecError as e:
            for d in e.diagnostics:
                problems.append(_in_variant(d, overrides))
            continue
        variants.append(Variant(vid, overrides, story, _train_identity(compile(story))))
    if problems:
        raise SpecError(_dedupe(problems))
    return Sweep(path, base, tuple(variants), objective, len({v.training for v in variants}))


# what a variant's objective may weigh (style_distance is lower-better: give it a negative weight)
METRICS = ("mean_aesthetic", "style_coherence", "style_distance", "prompt_alignment", "character_consistency",
           "character_dreamsim", *PREFERENCE)  # the last: DiffSynth's preference models (models.<name>)


def _objective(obj, loc, diags) -> dict:
    metrics = METRICS
    at = ("sweep", "objective")
    if isinstance(obj, str):
        if obj not in metrics:
            diags.append(Diagnostic(f"`{obj}` is not one of: {', '.join(metrics)}", loc.mark(at), json_path(at),
                                    did_you_mean(obj, metrics) or "or {weights: {mean_aesthetic: 1, style_coherence: 1}}",
                                    "sweep"))
            return {}
        return {obj: 1.0}
    weights = obj.get("weights") if isinstance(obj, dict) else None
    if not isinstance(weights, dict) or not weights:
        diags.append(Diagnostic("expected a metric name or {weights: {metric: weight}}", loc.mark(at), json_path(at),
                                rule="sweep"))
        return {}
    for k, w in weights.items():
        if k not in metrics:
            diags.append(Diagnostic(f"unknown metric `{k}`", loc.mark((*at, "weights", k), prefer_key=True),
                                    json_path((*at, "weights", k)), did_you_mean(str(k), metrics), "sweep"))
        elif not isinstance(w, (int, float)) or isinstance(w, bool):
            diags.append(Diagnostic("expected a number", loc.mark((*at, "weights", k)), json_path((*at, "weights", k)),
                                    rule="sweep"))
    return {k: float(w) for k, w in weights.items() if k in metrics and isinstance(w, (int, float))}


def score(objective: dict, record: dict) -> float | None:
    """The objective of a finished variant (the aesthetic gate is a separate, hard constraint); None when it weighs
    a metric the variant did not measure (prompt_alignment without models.clip_zh): never counted as 0."""
    if any(record.get(k) is None for k in objective):
        return None
    return sum(w * record[k] for k, w in objective.items())


def _train_identity(plan) -> str:
    """What decides whether two variants share one training: the slices of train and every stage it needs."""
    from .schedule import order, selected

    needed = selected(plan, "train")
    return digest([plan.stages[n].params_hash for n in order(plan) if n in needed])


# ---------------------------------------------------------------- positions

def _exists_parent(data, path) -> bool:
    try:
        get_path(data, path[:-1])
        return True
    except (KeyError, IndexError, TypeError):
        return False


def _make_parents(data, path):
    cur = data
    for p in path[:-1]:
        if isinstance(cur, dict):
            cur = cur.setdefault(p, {})
        else:
            cur = cur[p]


def _without(loc: Located, path: tuple) -> Located:
    data = copy.deepcopy(loc.data)
    data.pop(path[0], None)
    keep = lambda table: {p: m for p, m in table.items() if p[:1] != path}  # noqa: E731
    return Located(data, keep(loc.values), keep(loc.keys))


def _point(vloc: Located, loc: Located, target: tuple, at: tuple, value, merge: bool = False) -> None:
    """Put ``value`` at ``target`` in the variant, with the positions of the sweep value it came from, so a
    problem with it is reported at the sweep's line."""
    _set(vloc.data, target, value)
    for table, src in ((vloc.values, loc.values), (vloc.keys, loc.keys)):
        if not merge:
            for p in [p for p in table if p[:len(target)] == target]:
                del table[p]
        for p, m in src.items():
            if p[:len(at)] == at:
                table[(*target, *p[len(at):])] = m
        if at in src:
            table[target] = src[at]


def _in_variant(d: Diagnostic, overrides: dict) -> Diagnostic:
    what = ", ".join(f"{k} = {_short(v)}" for k, v in overrides.items())
    return Diagnostic(f"{d.message} (in the variant {what})", d.mark, d.path, d.hint, d.rule, d.severity)


def _short(v) -> str:
    import json

    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def _dedupe(diags: list) -> list:
    seen, out = set(), []
    for d in diags:
        key = (d.mark, d.path, d.message.split(" (in the variant")[0])
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def apply(spec, variant_id: str) -> tuple[Path, dict]:
    """Write a variant's values into the spec file itself, keeping its comments and layout (ruamel.yaml's
    round trip), so the winner is an ordinary story: `storyc build SPEC` then builds exactly that variant.
    The sweep section stays (delete it when the sweeping is done). Returns (spec path, the values written)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    from .errors import StorycError

    sw = load_sweep(spec)
    if sw is None:
        raise StorycError(f"{spec} has no `sweep:` section")
    found = {v.id: v for v in sw.variants}
    if variant_id not in found:
        raise StorycError(f"no variant `{variant_id}` in this sweep", did_you_mean(variant_id, found)
                          or f"its variants: {', '.join(found)} (see `storyc plan` or `storyc sweep show`)")
    v = found[variant_id]
    yaml = YAML()  # round-trip: comments, key order, quoting and flow style are kept
    yaml.preserve_quotes = True
    yaml.width = 4096
    path = Path(spec)
    doc = yaml.load(path.read_text("utf-8"))
    for key, value in v.overrides.items():
        if key.startswith("scenes["):
            sid = key[len("scenes["):-1]
            scenes = doc.get("scenes")
            if scenes is None:  # the scenes come from the base spec: an edit by id merges into it
                doc["scenes"] = scenes = [CommentedMap(id=sid)]
            scene = next((s for s in scenes if s.get("id") == sid), None)
            if scene is None:  # this spec edits other scenes of its base by id: edit this one too
                scene = CommentedMap(id=sid)
                scenes.append(scene)
            for k, x in value.items():
                scene[k] = x
            continue
        target = parse_path(key)
        cur = doc
        for p in target[:-1]:
            if isinstance(p, int):
                cur = cur[p]
                continue
            if p not in cur or cur[p] is None:
                cur[p] = CommentedMap()
            cur = cur[p]
        cur[target[-1]] = value
    import io

    buf = io.StringIO()
    yaml.dump(doc, buf)
    from .render import atomic_write

    atomic_write(path, buf.getvalue())
    return path, v.overrides
