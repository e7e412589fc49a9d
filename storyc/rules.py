"""Cross-field rules beyond the schema. Each ``check_*`` is one named rule returning diagnostics.

Rules run on the defaulted data even when the schema found problems, so a user sees every problem in one
pass; a rule that meets a value of the wrong type skips it (the schema already reported it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from . import tokens
from .errors import Diagnostic, did_you_mean
from .model import PREFERENCE, SPLICE, ModelRef, join_negative, micro_batches, optimizer_steps
from .project import outside_hint, root_and_why
from .submission import COMPETITION_NAME, PLACEHOLDER_TEAMS
from .yamlio import Located, get_path, json_path

TINY_NAMES = {"kolors": "kolors", "vae": "sdxl-vae", "aesthetic": "aesthetic", "esrgan": "esrgan",
              "clip_zh": "clip-zh", "ip_adapter": "ip-adapter", "captioner": "captioner", "dreamsim": "dreamsim",
              **{k: "preference" for k in PREFERENCE}}


@dataclass(frozen=True)
class RuleInput:
    """What every rule reads: the merged, defaulted spec data (not yet known to be well-typed), where each value
    came from, and the project. Rules only read it and return diagnostics."""

    data: dict
    loc: Located
    root: Path
    spec: Path
    schema_ok: bool

    def diag(self, path, message, hint=None, rule="", severity="error", key=False):
        return Diagnostic(message, self.loc.mark(path, prefer_key=key), json_path(path), hint, rule, severity)

    def source_dir(self, path) -> Path:
        """Folder of the file the value at ``path`` came from (paths are relative to their own file)."""
        m = self.loc.mark(path)
        return Path(m.file).resolve().parent if m else self.spec.parent


def _list(v) -> list:
    return v if isinstance(v, list) else []


def check_unique_scene_ids(ctx):
    seen, out = {}, []
    for i, s in enumerate(_list(ctx.data.get("scenes"))):
        sid = s.get("id") if isinstance(s, dict) else None
        if not isinstance(sid, str):
            continue
        if sid in seen:
            out.append(ctx.diag(("scenes", i, "id"), f"scene id `{sid}` is already used by scenes[{seen[sid]}]",
                                "scene ids name image files; make each one unique", "unique_scene_ids"))
        else:
            seen[sid] = i
    return out


def check_unique_seeds(ctx):
    gen = ctx.data.get("generation")
    if isinstance(gen, dict) and gen.get("allow_duplicate_seeds") is True:
        return []
    seen, out = {}, []
    for i, s in enumerate(_list(ctx.data.get("scenes"))):
        seed = s.get("seed") if isinstance(s, dict) else None
        if not isinstance(seed, int) or isinstance(seed, bool):
            continue
        if seed in seen:
            out.append(ctx.diag(("scenes", i, "seed"), f"seed {seed} is already used by scenes[{seen[seed]}]",
                                "give each scene its own seed, or set `generation.allow_duplicate_seeds: true`",
                                "unique_seeds"))
        else:
            seen[seed] = i
    return out


def check_scene_count(ctx):
    sc, sub = ctx.data.get("scenes"), ctx.data.get("submission")
    if not isinstance(sc, list) or not sc or not isinstance(sub, dict):
        return []
    want = sub.get("images")
    if isinstance(want, int) and len(sc) != want:
        return [ctx.diag(("scenes",), f"the story has {len(sc)} scenes but `submission.images` is {want}",
                         f"add or remove scenes, or set `submission.images: {len(sc)}`", "scene_count")]
    return []


_MS_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def modelscope_id_problem(mid: str) -> str | None:
    """Why ``mid`` is not a ModelScope OWNER/NAME id (None when it is one). Ids become folder names under
    .storyc/, so `..`, slashes beyond one and odd characters are refused."""
    parts = mid.split("/")
    if len(parts) != 2:
        return "a ModelScope id is OWNER/NAME"
    if any(p in (".", "..") or not _MS_PART.fullmatch(p) for p in parts):
        return "a ModelScope id's OWNER and NAME use letters, digits, `_`, `.` and `-` (and are not `.` or `..`)"
    return None


def dataset_entries(data: dict) -> list[tuple[tuple, dict]]:
    """The training sources with their spec paths: `datasets[i]` when given, else the one `dataset`."""
    many = data.get("datasets")
    if isinstance(many, list):
        return [(("datasets", i), ds) for i, ds in enumerate(many) if isinstance(ds, dict)]
    ds = data.get("dataset")
    return [(("dataset",), ds)] if isinstance(ds, dict) else []


def check_dataset_fields(ctx):
    out = []
    raw = ctx.loc.data if isinstance(ctx.loc.data, dict) else {}
    if "dataset" in raw and "datasets" in raw:
        out.append(ctx.diag(("datasets",), "both `dataset` and `datasets` are given",
                            "use `dataset` for one source, or list every source under `datasets`", "dataset_fields",
                            key=True))
    for where, ds in dataset_entries(ctx.data):
        src = ds.get("source")
        if src == "modelscope" and not ds.get("id"):
            out.append(ctx.diag(where, "`source: modelscope` needs a dataset `id`",
                                "e.g. `id: AI-ModelScope/lowres_anime`", "dataset_fields"))
        elif src == "modelscope" and isinstance(ds.get("id"), str) and modelscope_id_problem(ds["id"]):
            out.append(ctx.diag((*where, "id"), f"`{ds['id']}`: {modelscope_id_problem(ds['id'])}",
                                "e.g. `id: AI-ModelScope/lowres_anime`", "dataset_fields"))
        elif src in ("folder", "jsonl") and not ds.get("path"):
            what = "a folder of images" if src == "folder" else "a .jsonl file"
            out.append(ctx.diag(where, f"`source: {src}` needs a `path` to {what}", rule="dataset_fields"))
    return out


def _local_path(ctx, path, raw, rule):
    """Resolve a relative path from a spec; return (Path | None, diagnostics)."""
    if Path(raw).is_absolute() or raw.startswith("~"):
        return None, [ctx.diag(path, f"`{raw}` is an absolute path", "paths are relative to the spec file", rule)]
    if bad_char(raw, False):  # check_text names the character; nothing to resolve
        return None, []
    p = (ctx.source_dir(path) / raw).resolve()
    try:
        p.relative_to(ctx.root)
    except ValueError:
        return None, [ctx.diag(path, f"`{raw}` points outside the project folder",
                               outside_hint(*root_and_why(ctx.spec)), rule)]
    return p, []


def dataset_paths(ctx) -> tuple:
    """Per training source (in order): its local path resolved against the file that wrote it, None for a
    ModelScope source or one whose path is refused (check_paths says why)."""
    out = []
    for where, ds in dataset_entries(ctx.data):
        p = None
        if isinstance(ds.get("path"), str) and ds.get("source") in ("folder", "jsonl"):
            p, _ = _local_path(ctx, (*where, "path"), ds["path"], "paths")
        out.append(p)
    return tuple(out)


def mask_paths(ctx) -> tuple:
    """Per training source: its `masks` folder resolved against the file that wrote it; None for none, for
    `alpha`, or for a path check_masks refuses."""
    out = []
    for where, ds in dataset_entries(ctx.data):
        raw, p = ds.get("masks"), None
        if isinstance(raw, str) and raw and raw != "alpha":
            p, _ = _local_path(ctx, (*where, "masks"), raw, "masks")
        out.append(p)
    return tuple(out)


def caption_paths(ctx) -> tuple:
    """Per training source: its recaption `file` resolved against the file that wrote it (None: no recaption)."""
    out = []
    for where, ds in dataset_entries(ctx.data):
        rc, p = ds.get("recaption"), None
        if isinstance(rc, dict) and isinstance(rc.get("file", "captions.jsonl"), str):
            p, _ = _local_path(ctx, (*where, "recaption", "file") if "file" in rc else (*where, "recaption"),
                               rc.get("file", "captions.jsonl"), "recaption")
        out.append(p)
    return tuple(out)


_FIELD = re.compile(r"\{([^{}]*)\}")


def check_recaption(ctx):
    """recaption needs models.captioner; its template names only {caption} and {source}; its file stays inside
    the project and is not a folder."""
    out = []
    models = ctx.data.get("models") if isinstance(ctx.data.get("models"), dict) else {}
    for where, ds in dataset_entries(ctx.data):
        rc = ds.get("recaption")
        if not isinstance(rc, dict):
            continue
        if not models.get("captioner"):
            out.append(ctx.diag((*where, "recaption"), "recaption needs a captioner, and `models.captioner` is not "
                                "set", "add `captioner: modelscope:Salesforce/blip2-opt-2.7b` (or a local BLIP-2 / "
                                "BLIP folder) under `models:`", "recaption"))
        tpl = rc.get("template", "{caption}")
        if isinstance(tpl, str):
            names = _FIELD.findall(tpl)
            bad = [n for n in names if n not in ("caption", "source")]
            if bad:
                out.append(ctx.diag((*where, "recaption", "template"), f"unknown field `{{{bad[0]}}}` in the template",
                                    did_you_mean(bad[0], ["caption", "source"]) or
                                    "the template knows {caption} (the captioner's words) and {source}", "recaption"))
            elif "caption" not in names:
                out.append(ctx.diag((*where, "recaption", "template"), "the template does not use `{caption}`, so "
                                    "the captioner's words are dropped", "e.g. `template: \"{source}，{caption}\"`",
                                    "recaption"))
        f = rc.get("file", "captions.jsonl")
        if isinstance(f, str):
            at = (*where, "recaption", "file") if "file" in rc else (*where, "recaption")
            p, errs = _local_path(ctx, at, f, "recaption")
            out += errs
            if p is not None and p.is_dir():
                out.append(ctx.diag(at, f"`{f}` is a folder", "name a .jsonl file, e.g. `file: captions.jsonl`",
                                    "recaption"))
    return out


def validation_path(ctx):
    """train.validation.folder resolved against the file that wrote it (None: not set, or refused)."""
    tr = ctx.data.get("train") if isinstance(ctx.data.get("train"), dict) else {}
    val = tr.get("validation")
    if isinstance(val, dict) and isinstance(val.get("folder"), str):
        return _local_path(ctx, ("train", "validation", "folder"), val["folder"], "train_knobs")[0]
    return None


def check_masks(ctx):
    """`masks` is `alpha` or an existing folder; train.masked_loss needs a source with masks, and masks without
    train.masked_loss train nothing differently."""
    out, any_masks = [], False
    for where, ds in dataset_entries(ctx.data):
        raw = ds.get("masks")
        if not isinstance(raw, str) or not raw:
            continue
        any_masks = True
        if raw == "alpha":
            continue
        at = (*where, "masks")
        if ds.get("source") == "modelscope":
            out.append(ctx.diag(at, "a ModelScope dataset's images have no file names to match masks by",
                                "use `masks: alpha`, or download the dataset and use `source: folder`", "masks"))
            continue
        p, errs = _local_path(ctx, at, raw, "masks")
        out += errs
        if p is not None and not p.is_dir():
            near = did_you_mean(p.name, [c.name for c in p.parent.iterdir()]) if p.parent.is_dir() else None
            out.append(ctx.diag(at, f"`{raw}` is not a folder" if p.exists() else f"`{raw}` does not exist",
                                near or "`masks` is `alpha` (each image's alpha channel) or a folder of mask images "
                                "named as the images", "masks"))
    tr = ctx.data.get("train") if isinstance(ctx.data.get("train"), dict) else {}
    if tr.get("masked_loss") is True and not any_masks:
        where = dataset_entries(ctx.data)[0][0] if dataset_entries(ctx.data) else ("dataset",)
        out.append(ctx.diag(("train", "masked_loss"), "masked_loss is on, but no training source has `masks`",
                            f"add `masks: alpha` (the images' alpha channel) or `masks: <folder>` to "
                            f"`{'.'.join(map(str, where))}`", "masks"))
    elif any_masks and not tr.get("masked_loss") and ("train", "masked_loss") not in ctx.loc.values:
        out.append(ctx.diag(("train",), "the sources' `masks` are used only by the masked loss",
                            "add `masked_loss: true` under `train:`", "masks", severity="warning"))
    return out


def model_refs(ctx) -> tuple[dict, list]:
    """models.* as ModelRefs (a local folder, modelscope:<id>, tiny:<name>), and what is wrong with them."""
    refs, out = {}, []
    models = ctx.data.get("models")
    if not isinstance(models, dict):
        return refs, out
    for key in TINY_NAMES:
        raw = models.get(key)
        if not isinstance(raw, str) or not raw:
            continue
        path = ("models", key)
        if raw.startswith("modelscope:") and key == "dreamsim":
            from .models.kolors import model_hint

            out.append(ctx.diag(path, f"`{raw}`: DreamSim's checkpoints are GitHub release files, not a ModelScope "
                                "repository", model_hint(key, "DIR"), "paths"))
        elif raw.startswith("modelscope:"):
            mid = raw.split(":", 1)[1]
            if modelscope_id_problem(mid):
                out.append(ctx.diag(path, f"`{raw}`: {modelscope_id_problem(mid)}", rule="paths"))
            refs[key] = ModelRef(raw, "modelscope", None, mid)
        elif raw.startswith("tiny:"):
            name = raw.split(":", 1)[1]
            if name != TINY_NAMES[key]:
                out.append(ctx.diag(path, f"`{raw}`: no tiny model of that name for `models.{key}`",
                                    f"use `tiny:{TINY_NAMES[key]}`", "paths"))
            refs[key] = ModelRef(raw, "tiny", ctx.root / ".storyc" / "models" / f"tiny-{TINY_NAMES[key]}", name)
        else:
            p, errs = _local_path(ctx, path, raw, "paths")
            out += errs
            if p is not None:
                refs[key] = ModelRef(raw, "local", p)
                if not p.exists():
                    from .models.kolors import model_hint

                    out.append(ctx.diag(path, f"model folder `{raw}` does not exist yet", model_hint(key, raw),
                                        "paths", severity="warning"))
    return refs, out


def check_paths(ctx):
    out = []
    for where, ds in dataset_entries(ctx.data):
        if not (isinstance(ds.get("path"), str) and ds.get("source") in ("folder", "jsonl")):
            continue
        at = (*where, "path")
        p, errs = _local_path(ctx, at, ds["path"], "paths")
        out += errs
        if p is None:
            continue
        if not p.exists():
            near = did_you_mean(p.name, [c.name for c in p.parent.iterdir()]) if p.parent.is_dir() else None
            out.append(ctx.diag(at, f"`{ds['path']}` does not exist", near, "paths"))
        elif ds["source"] == "folder" and not p.is_dir():
            out.append(ctx.diag(at, f"`{ds['path']}` is a file; `source: folder` needs a folder",
                                "use `source: jsonl` for a jsonl file", "paths"))
        elif ds["source"] == "jsonl" and not p.is_file():
            out.append(ctx.diag(at, f"`{ds['path']}` is a folder; `source: jsonl` needs a file",
                                "use `source: folder` for a folder of images", "paths"))
    return out + model_refs(ctx)[1]


@lru_cache(maxsize=1)
def dj_registry() -> dict:
    return json.loads(resources.files("storyc").joinpath("data/dj_ops.json").read_text("utf-8"))


def check_dj_ops(ctx):
    filters = ctx.data.get("filters")
    if not isinstance(filters, list):
        return []
    from .djregistry import names

    reg = dj_registry()
    ops = reg["ops"]
    out = []
    for i, item in enumerate(filters):
        if not isinstance(item, dict) or len(item) != 1:
            continue
        (name, params), = item.items()
        if name not in ops:
            out.append(ctx.diag(("filters", i, name), f"unknown Data-Juicer op `{name}`",
                                did_you_mean(name, ops) or "see `storyc ops` for the ops Data-Juicer has",
                                "dj_ops", key=True))
            continue
        allowed = names(reg, name)
        for p in (params or {}) if isinstance(params, dict) else ():
            if p not in allowed:
                out.append(ctx.diag(("filters", i, name, p), f"`{name}` has no parameter `{p}`",
                                    did_you_mean(p, allowed) or f"its parameters: {', '.join(allowed)}",
                                    "dj_op_params", key=True))
    return out


def check_prompt_length(ctx):
    scenes = ctx.data.get("scenes")
    style = ctx.data.get("style")
    if not isinstance(scenes, list) or not isinstance(style, dict):
        return []
    counter = tokens.counter()
    if counter is None:
        return [ctx.diag(("scenes",), "prompt length check skipped: " + tokens.why_unavailable(),
                         "install the run extra (`pip install -e .[run]`) to count Kolors tokens",
                         "prompt_length", "warning")]
    prefix, neg = style.get("prefix"), style.get("negative")
    if not isinstance(prefix, str) or not isinstance(neg, str):
        return []
    out = []
    for i, s in enumerate(scenes):
        if not isinstance(s, dict):
            continue
        prompt, negative = s.get("prompt", ""), s.get("negative", "")
        if not isinstance(prompt, str) or not isinstance(negative, str):
            continue  # the schema has said so
        for key, text in (("prompt", prefix + prompt), ("negative", join_negative(neg, negative))):
            n = counter(text)
            if n > tokens.LIMIT:
                what = "style prefix + prompt" if key == "prompt" else "style negative + scene negative"
                out.append(ctx.diag(("scenes", i, key) if key in s else ("scenes", i),
                                    f"{what} is {n} tokens; Kolors reads at most {tokens.LIMIT}",
                                    f"Kolors reads at most {tokens.LIMIT} tokens; this {key} has {n}: "
                                    f"the last {n - tokens.LIMIT} would be cut off", "prompt_length"))
    return out


def check_storyboard(ctx):
    sub = ctx.data.get("submission")
    if not isinstance(sub, dict) or not isinstance(sub.get("storyboard"), dict):
        return []
    cols, n = sub["storyboard"].get("columns"), sub.get("images")
    if isinstance(cols, int) and isinstance(n, int) and n > cols > 0 and n % cols:
        return [ctx.diag(("submission", "storyboard", "columns"),
                         f"{n} images in {cols} columns leave the last row with {n % cols}",
                         rule="storyboard", severity="warning")]
    return []


def check_small_sizes(ctx):
    """Kolors is trained at 1024 px; tiny sizes only make sense with tiny test models."""
    gen, models = ctx.data.get("generation"), ctx.data.get("models")
    if not isinstance(gen, dict) or not isinstance(models, dict) or str(models.get("kolors", "")).startswith("tiny:"):
        return []
    out = []
    for key in ("width", "height"):
        v = gen.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v < 512:
            out.append(ctx.diag(("generation", key), f"{key} {v} is far below Kolors' 1024 px training size",
                                "images under 512 px come out blurry; use 768-1536", "small_sizes", "warning"))
    return out


def _refine_places(ctx) -> list:
    """Where the spec sets refine settings: generation.refine and each scene's own."""
    gen = ctx.data.get("generation")
    places = []
    if isinstance(gen, dict) and isinstance(gen.get("refine"), dict):
        places.append(("generation", "refine"))
    for i, sc in enumerate(_list(ctx.data.get("scenes"))):
        if isinstance(sc, dict) and isinstance(sc.get("refine"), dict):
            places.append(("scenes", i, "refine"))
    return places


def check_guidance_interval(ctx):
    """A guidance interval [lo, hi] guides the noise levels above lo and up to hi: lo must be below hi."""
    gen = ctx.data.get("generation")
    places = [("generation",)] if isinstance(gen, dict) else []
    out = []
    for where in places + _refine_places(ctx):
        v = get_path(ctx.data, where).get("guidance_interval")
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and v[0] >= v[1]:
            out.append(ctx.diag((*where, "guidance_interval"), f"guidance interval [{v[0]:g}, {v[1]:g}] holds no "
                                "noise level: its first value (lo) must be below its second (hi)",
                                "write [lo, hi], e.g. [0.28, 5.42] (SD-XL's interval), or [0, 1000] to guide every "
                                "step",
                                "guidance_interval"))
    return out


def check_upscaler(ctx):
    """`refine.upscaler: esrgan` (story-wide or a scene's) needs the Real-ESRGAN weights: said at that line."""
    models = ctx.data.get("models")
    if not isinstance(models, dict) or models.get("esrgan"):
        return []
    out = []
    for where in _refine_places(ctx):
        if get_path(ctx.data, where).get("upscaler") == "esrgan":
            out.append(ctx.diag((*where, "upscaler"), "upscaler `esrgan` needs the Real-ESRGAN x4 weights: "
                                "`models.esrgan` is not set",
                                "add `models: {esrgan: modelscope:AI-ModelScope/Real-ESRGAN}` (or a folder holding "
                                "RealESRGAN_x4.pth; `tiny:esrgan` for tests), or use `upscaler: lanczos`", "upscaler"))
    return out


def _weights_without_models(ctx, path: tuple, weights: dict, doing: str, topic: str) -> list:
    """A diagnostic for each nonzero weight (in ``weights``, at ``path``) of a figure that only a model measures,
    whose ``models.<name>`` the spec does not set: prompt alignment (a Chinese CLIP), DreamSim's character
    consistency and the preference scores."""
    models = ctx.data.get("models") if isinstance(ctx.data.get("models"), dict) else {}
    hub = "modelscope:DiffSynth-Studio/QualityMetric_reward_pretrained"
    out = []
    for k, model, label, needs, hint in (
            ("prompt_alignment", "clip_zh", "prompt alignment", "a Chinese CLIP",
             "`models.clip_zh` (a ChineseCLIPModel folder)"),
            ("character_dreamsim", "dreamsim", "character consistency by DreamSim", "DreamSim",
             "`models.dreamsim` (a folder of DreamSim's open_clip_vitb32 checkpoint, unzipped)"),
            *((k, k, k, "its model", f"`models.{k}: {hub}` (or a folder of it)") for k in PREFERENCE)):
        if isinstance(weights.get(k), (int, float)) and weights[k] and not models.get(model):
            out.append(ctx.diag((*path, k), f"{doing} {label} needs {needs}: `models.{model}` is not set",
                                f"set {hint}, or remove this weight", topic))
    return out


def check_select(ctx):
    """generation.select: prompt alignment needs a Chinese CLIP, a preference score its model, character likeness a
    scene with characters; ranking one candidate changes nothing."""
    gen, models = ctx.data.get("generation"), ctx.data.get("models")
    if not isinstance(gen, dict) or not isinstance(gen.get("select"), dict) or not isinstance(models, dict):
        return []
    out = _weights_without_models(ctx, ("generation", "select"), gen["select"], "ranking candidates by", "select")
    like = gen["select"].get("character_likeness")
    if isinstance(like, (int, float)) and like and not any(
            isinstance(sc, dict) and _list(sc.get("characters")) for sc in _list(ctx.data.get("scenes"))):
        out.append(ctx.diag(("generation", "select", "character_likeness"), "ranking candidates by character "
                            "likeness needs a scene that shows a character, and none does",
                            "list a character in a scene's `characters`, or remove this weight", "select"))
    if gen.get("candidates") == 1 and ("generation", "select") in ctx.loc.values:  # written, to no effect
        out.append(ctx.diag(("generation", "select"), "`select` ranks candidates, but `candidates` is 1",
                            "set `generation.candidates: 4` (seeds tried per scene), or remove `select`", "select",
                            severity="warning"))
    return out


# The Linear layers of diffsynth's Kolors UNet. peft could also adapt its Conv2d layers, but storyc merges and
# exports LoRAs as Linear updates (B @ A), so those would fail after training; they are refused here instead.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "ff", "proj", "proj_in", "proj_out", "time_emb_proj",
                "text_intermediate_proj")
CONV_LAYERS = ("conv", "conv1", "conv2", "conv_in", "conv_out", "conv_shortcut")


def check_lora_type(ctx):
    """A DoRA ships as diffsynth and diffusers files: no kohya/LyCORIS layout holds peft's DoRA. LoKr's own
    parameters only with `type: lokr`."""
    lora, sub = ctx.data.get("lora"), ctx.data.get("submission")
    if not isinstance(lora, dict):
        return []
    out = []
    kind = lora.get("type", "lora")
    for key in ("factor", "decompose_both"):
        if ("lora", key) in ctx.loc.values and kind != "lokr":  # written (the defaults are filled in)
            out.append(ctx.diag(("lora", key), f"`{key}` is a LoKr parameter, but lora.type is {kind}",
                                f"set `type: lokr`, or remove `{key}`", "lora_type"))
    if lora.get("factor") == 0:
        out.append(ctx.diag(("lora", "factor"), "factor 0 splits no side", "use -1 (near the square root) or a "
                            "positive factor such as 8", "lora_type"))
    if kind != "dora" or not isinstance(sub, dict):
        return out
    formats = sub.get("lora_formats")
    if not (isinstance(formats, list) and "kohya" in formats):
        return out
    written = ("submission", "lora_formats") in ctx.loc.values
    return out + [ctx.diag(("submission", "lora_formats") if written else ("lora", "type"),
                           "a DoRA has no kohya file: kohya/LyCORIS loaders (ComfyUI, the WebUIs) normalise the weight "
                           "per input column, peft's DoRA (what storyc trains) per output row, so it would load as "
                           "other weights" + ("" if written else
                                              " (`submission.lora_formats` defaults to [diffsynth, kohya])"),
                           "set `submission: {lora_formats: [diffsynth, diffusers]}`", "lora_type")]


def check_lora_targets(ctx):
    lora = ctx.data.get("lora")
    targets = lora.get("target_modules") if isinstance(lora, dict) else None
    if not isinstance(targets, list):
        return []
    out = []
    for i, t in enumerate(targets):
        if not isinstance(t, str) or not t:
            continue
        leaf = t.rsplit(".", 1)[-1]
        if leaf in LORA_TARGETS:
            continue
        if leaf in CONV_LAYERS:
            msg = f"`{t}` is a Conv2d layer; storyc trains, merges and exports LoRAs on Linear layers only"
        else:
            msg = f"`{t}` is not a Linear layer of the Kolors UNet"
        out.append(ctx.diag(("lora", "target_modules", i), msg,
                            did_you_mean(leaf, LORA_TARGETS) or f"use some of: {', '.join(LORA_TARGETS)}",
                            "lora_targets"))
    return out




def check_team(ctx):
    story = ctx.data.get("story")
    team = story.get("team") if isinstance(story, dict) else None
    if isinstance(team, str) and team.strip().lower() in PLACEHOLDER_TEAMS:
        return [ctx.diag(("story", "team"), f"story.team is still the placeholder `{team}`",
                         "write your team's name: `storyc publish` names the model "
                         f"`{COMPETITION_NAME.format(team='<team>', rest='<title>')}` from it", "team",
                         severity="warning")]
    return []


COMPETITION_IMAGES, COMPETITION_GATE = 8, 6.0
NOT_AN_ENTRY = "or set `submission.rules: none` for a story that is not a competition entry"


def check_competition(ctx):
    """With `submission.rules: competition` (the default) the spec must be an entry the Kolors LoRA story
    competition takes: 8 images, its gate of a mean aesthetic score of 6, the LoRA file its notebook loads, and a
    team to name the model after."""
    sub, story = ctx.data.get("submission"), ctx.data.get("story")
    if not isinstance(sub, dict) or sub.get("rules", "competition") != "competition":
        return []
    out = []
    images = sub.get("images")
    if isinstance(images, int) and not isinstance(images, bool) and images != COMPETITION_IMAGES:
        out.append(ctx.diag(("submission", "images"), f"the competition takes {COMPETITION_IMAGES} images; this story "
                            f"has `submission.images: {images}`", f"tell the story in {COMPETITION_IMAGES} scenes, "
                            + NOT_AN_ENTRY, "competition"))
    gate = sub.get("min_aesthetic")
    if isinstance(gate, (int, float)) and not isinstance(gate, bool) and gate < COMPETITION_GATE:
        out.append(ctx.diag(("submission", "min_aesthetic"), f"the competition's gate is a mean aesthetic score of "
                            f"{COMPETITION_GATE:g}; `min_aesthetic: {gate:g}` would call an entry valid that it "
                            "rejects", f"remove the line (the default is {COMPETITION_GATE:g}), " + NOT_AN_ENTRY,
                            "competition"))
    formats = sub.get("lora_formats")
    if isinstance(formats, list) and "diffsynth" not in formats:
        out.append(ctx.diag(("submission", "lora_formats"), "the competition loads the LoRA with DiffSynth's "
                            "`load_lora` (its notebook's): the submission needs the diffsynth file",
                            "add `diffsynth` to `submission.lora_formats`, " + NOT_AN_ENTRY, "competition"))
    lora = ctx.data.get("lora") if isinstance(ctx.data.get("lora"), dict) else {}
    kind = lora.get("type")
    if kind in ("dora", "loha", "lokr"):
        lost = {"dora": "a DoRA's magnitudes would be dropped",
                "loha": "a LoHa's Hadamard factors would not load", "lokr": "a LoKr's Kronecker factors would not load"}
        out.append(ctx.diag(("lora", "type"), "the competition loads the LoRA with DiffSynth's `load_lora`, which "
                            f"reads plain LoRA weights: {lost[kind]}", "use `type: lora`, " + NOT_AN_ENTRY,
                            "competition"))
    if isinstance(story, dict) and not story.get("team"):
        out.append(ctx.diag(("story",), "story.team is not set: the competition names the model "
                            f"`{COMPETITION_NAME.format(team='<team>', rest='<title>')}`",
                            "add `team: <your team>` under `story:` (`storyc publish` refuses without it)",
                            "competition", severity="warning"))
    return out


def check_train_knobs(ctx):
    """Combinations of the trainers' knobs that cannot work, or that almost certainly are a mistake."""
    tr = ctx.data.get("train")
    if not isinstance(tr, dict):
        return []
    out = []
    counts = [tr.get(k) for k in ("epochs", "steps_per_epoch", "batch_size", "accumulate_grad_batches")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts):
        return out  # the schema has said what is wrong with them
    steps = optimizer_steps(micro_batches(*counts[:3]), counts[3], 1)  # on one device
    warm = tr.get("lr_warmup_steps") or 0
    if isinstance(warm, int) and warm:
        if warm >= steps:
            out.append(ctx.diag(("train", "lr_warmup_steps"), f"{warm} warm-up steps but the run has only {steps} "
                                "optimizer steps", "warm up over a small part of the run (e.g. 5%)", "train_knobs"))
    weights = tr["select"].get("weights") if isinstance(tr.get("select"), dict) else None
    for key in ("character_consistency", "character_dreamsim"):
        if not (isinstance(weights, dict) and key in weights):
            continue
        shown: dict = {}
        for sc in _list(ctx.data.get("scenes")):
            for cid in _list(sc.get("characters") if isinstance(sc, dict) else None):
                shown[cid] = shown.get(cid, 0) + 1
        if not any(n > 1 for n in shown.values()):
            out.append(ctx.diag(("train", "select", "weights", key), "the previews measure character consistency "
                                "only for a character shown in two scenes or more, and no character is",
                                "list a character in two scenes' `characters`, or remove this weight", "train_knobs"))
    if isinstance(weights, dict):  # a figure the previews measure only with its model
        out += _weights_without_models(ctx, ("train", "select", "weights"), weights, "choosing the checkpoint by",
                                      "train_knobs")
    if (tr.get("select") == "best_score" or isinstance(tr.get("select"), dict)) and not tr.get("preview_every"):
        how = "best_score" if tr["select"] == "best_score" else "{weights: ...}"
        out.append(ctx.diag(("train", "select"), f"`select: {how}` needs previews to score checkpoints",
                            "set `train.preview_every: N` (e.g. 500), or `select: last`", "train_knobs"))
    if isinstance(tr.get("preview_every"), int) and not isinstance(tr["preview_every"], bool):
        if tr["preview_every"] > steps:
            out.append(ctx.diag(("train", "preview_every"), f"preview every {tr['preview_every']} steps but the run "
                                f"has {steps}: only the last checkpoint is previewed", severity="warning",
                                rule="train_knobs"))
    val = tr.get("validation")
    if isinstance(val, dict):
        if ("images" in val) == ("folder" in val):
            out.append(ctx.diag(("train", "validation"), "`validation` needs either `images` (held out of the "
                                "training images) or `folder` (images of their own)" if "images" not in val else
                                "`validation` takes `images` or `folder`, not both",
                                "e.g. `validation: {images: 2, every: 100}` or `validation: {folder: val}`",
                                "train_knobs"))
        elif isinstance(val.get("folder"), str):
            p, errs = _local_path(ctx, ("train", "validation", "folder"), val["folder"], "train_knobs")
            out += errs
            if p is not None and not p.is_dir():
                near = did_you_mean(p.name, [c.name for c in p.parent.iterdir()]) if p.parent.is_dir() else None
                out.append(ctx.diag(("train", "validation", "folder"), f"`{val['folder']}` is not a folder of images",
                                    near, "train_knobs"))
    stop = tr.get("stop")
    if isinstance(stop, dict):
        if stop.get("metric") == "val_loss" and not isinstance(tr.get("validation"), dict):
            out.append(ctx.diag(("train", "stop", "metric"), "`metric: val_loss` needs held-out images to measure",
                                "set `train.validation: {images: 2, every: 100}`, or `metric: story_score`",
                                "train_knobs"))
        if stop.get("metric") == "story_score" and not tr.get("preview_every"):
            out.append(ctx.diag(("train", "stop", "metric"), "`metric: story_score` needs previews to score",
                                "set `train.preview_every: N` (e.g. 500), or `metric: val_loss`", "train_knobs"))
    if tr.get("optimizer") == "prodigy" and isinstance(tr.get("learning_rate"), (int, float)) and tr["learning_rate"] < 0.1:
        out.append(ctx.diag(("train", "learning_rate"), f"learning_rate {tr['learning_rate']:g} with optimizer prodigy",
                            "Prodigy finds the step size itself; its learning_rate is a multiplier, usually 1.0",
                            "train_knobs", severity="warning"))
    return out


# Free text that may span lines (a `caption: |` block); every other string of a spec is one line.
MULTILINE_KEYS = {"prompt", "negative", "caption", "prefix", "description"}
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def bad_char(text: str, multiline: bool) -> str | None:
    """The first character of ``text`` that no spec string may hold (controls, NUL, Unicode line and paragraph
    separators, bidi overrides and isolates; newline and tab in one-line values), or None."""
    import unicodedata

    for c in text:
        if c in "\n\t" and multiline:
            continue
        if c in BIDI or unicodedata.category(c) in ("Cc", "Zl", "Zp"):
            return c
    return None


def check_text(ctx):
    """No string of the spec carries characters that could hide text, reorder it or end a line in a generated
    file (ids, titles, paths, prompts alike): refused here, with the character named, before anything is written."""
    out = []

    def walk(v, path):
        if isinstance(v, dict):
            for k, x in v.items():
                if isinstance(k, str) and bad_char(k, False):
                    out.append(_char_diag(ctx, path + (k,), k, bad_char(k, False), key=True))
                walk(x, path + (k,))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, path + (i,))
        elif isinstance(v, str):
            multiline = bool(path) and path[-1] in MULTILINE_KEYS
            c = bad_char(v, multiline)
            if c is not None:
                out.append(_char_diag(ctx, path, v, c))

    walk(ctx.loc.data, ())
    return out


def _char_diag(ctx, path, text, c, key=False):
    import unicodedata

    name = unicodedata.name(c, "a control character")
    what = "newline" if c == "\n" else "tab" if c == "\t" else name
    where = f" at character {text.index(c) + 1}"
    hint = ("this value must be one line: remove the line break" if c in "\n\t"
            else "remove it (it can hide or reorder text, or end a line in the files storyc writes)")
    return ctx.diag(path, f"contains U+{ord(c):04X} ({what}){where}", hint, "text", key=key)


def _references(ctx):
    """(character id, path of the value, the reference as written) for every reference image of every character."""
    chars = ctx.data.get("characters")
    for cid, c in (chars.items() if isinstance(chars, dict) else ()):
        ref = c.get("reference") if isinstance(c, dict) else None
        if isinstance(ref, str):
            yield cid, ("characters", cid, "reference"), ref
        elif isinstance(ref, list):
            for j, r in enumerate(ref):
                if isinstance(r, str):
                    yield cid, ("characters", cid, "reference", j), r


def character_paths(ctx) -> dict:
    """Character id -> its reference images, resolved against the file that wrote them (refused ones left out:
    check_characters says why)."""
    out: dict = {}
    for cid, at, raw in _references(ctx):
        p, errs = _local_path(ctx, at, raw, "characters") if raw else (None, [])
        out.setdefault(cid, [])
        if p is not None and not errs:
            out[cid].append(p)
    return {k: tuple(v) for k, v in out.items()}


def check_characters(ctx):
    """Reference images exist and are images; scenes show declared characters; a scene with characters has the
    IP-Adapter to draw them; `{id}` in a prompt names a character with a description."""
    out = []
    chars = ctx.data.get("characters") if isinstance(ctx.data.get("characters"), dict) else {}
    for cid, at, raw in _references(ctx):
        if not raw:
            continue
        p, errs = _local_path(ctx, at, raw, "characters")
        out += errs
        if p is None:
            continue
        try:
            exists, is_file = p.exists(), p.is_file()
        except OSError as e:  # a name the file system refuses (too long, ...)
            out.append(ctx.diag(at, f"reference `{raw}` cannot be read ({e.strerror})", rule="characters"))
            continue
        if not exists:
            near = did_you_mean(p.name, [c.name for c in p.parent.iterdir()]) if p.parent.is_dir() else None
            out.append(ctx.diag(at, f"reference image `{raw}` does not exist", near, "characters"))
        elif not is_file:
            out.append(ctx.diag(at, f"reference `{raw}` is a folder; name an image file", rule="characters"))
        else:
            problem = _image_problem(p)
            if problem:
                out.append(ctx.diag(at, f"reference `{raw}` is not an image storyc can read ({problem})",
                                    "use a PNG, JPEG or WebP file", "characters"))
    shown: set = set()
    models = ctx.data.get("models") if isinstance(ctx.data.get("models"), dict) else {}
    for i, sc in enumerate(_list(ctx.data.get("scenes"))):
        ids = sc.get("characters") if isinstance(sc, dict) else None
        for j, cid in enumerate(_list(ids)):
            if not isinstance(cid, str):
                continue
            shown.add(cid)
            if cid not in chars:
                out.append(ctx.diag(("scenes", i, "characters", j), f"unknown character `{cid}`",
                                    did_you_mean(cid, list(chars)) or
                                    (f"characters: {', '.join(chars)}" if chars else
                                     f"declare it: `characters: {{{cid}: {{reference: path/to/image.png}}}}`"),
                                    "characters"))
        if _list(ids) and not models.get("ip_adapter"):
            out.append(ctx.diag(("scenes", i, "characters"), "drawing characters from their reference images needs "
                                "the Kolors IP-Adapter-Plus: `models.ip_adapter` is not set",
                                "add `models: {ip_adapter: modelscope:Kwai-Kolors/Kolors-IP-Adapter-Plus}` (or a "
                                "folder in that layout; `tiny:ip-adapter` for tests), or remove `characters`",
                                "characters"))
        prompt = sc.get("prompt") if isinstance(sc, dict) else None
        if chars and isinstance(prompt, str):
            for m in re.finditer(SPLICE, prompt):
                cid = m.group(1)
                if cid not in chars:
                    out.append(ctx.diag(("scenes", i, "prompt"), f"`{{{cid}}}` names no character",
                                        did_you_mean(cid, list(chars)) or f"characters: {', '.join(chars)}",
                                        "characters"))
                elif not (isinstance(chars[cid], dict) and chars[cid].get("description")):
                    out.append(ctx.diag(("scenes", i, "prompt"), f"`{{{cid}}}`: character `{cid}` has no "
                                        "description to splice in",
                                        f"add `description: ...` to characters.{cid}", "characters"))
    for cid in chars:
        if cid not in shown:
            out.append(ctx.diag(("characters", cid), f"character `{cid}` is in no scene",
                                "list it in the `characters` of the scenes that show it", "characters",
                                severity="warning", key=True))
    return out


def _image_problem(p: Path) -> str | None:
    """Why PIL cannot read ``p`` as an image (None: it can). Light: PIL only, header and data checked."""
    try:
        from PIL import Image

        with Image.open(p) as im:
            im.verify()
        return None
    except Exception as e:  # noqa: BLE001 - any failure is the user's file, said at its line
        return f"{type(e).__name__}: {str(e)[:80]}" if str(e) else type(e).__name__


RULES = [check_text, check_unique_scene_ids, check_unique_seeds, check_scene_count, check_dataset_fields, check_paths,
         check_dj_ops, check_prompt_length, check_storyboard, check_small_sizes, check_lora_targets, check_lora_type, check_masks, check_recaption,
         check_team, check_train_knobs, check_competition, check_upscaler, check_guidance_interval, check_select,
         check_characters]


def run_all(ctx: RuleInput) -> list[Diagnostic]:
    """Every rule's diagnostics. A rule meets values of any type (the schema reports the wrong ones) and checks
    them itself: an exception here is a bug in the rule, never hidden."""
    out = []
    for rule in RULES:
        out.extend(rule(ctx))
    return out
