"""Every stage kind, declared once: its stages and their hashed slices, the files it compiles, the models it
reads, its executor, its verdict, its out-of-memory hint.

``compile``, the scheduler, the runner, status, the bundle and sweeps all loop over ``KINDS``; adding a kind is
one ``StageKind`` here and one executor module. A kind's ``jobs`` turns the compiled story into its stages:
``params`` is the slice of the spec that changes its outputs (hashed into the lock: an edit there reruns it),
``settings`` its execution-only values (the schema's ``x-hash: never`` fields: changing them reruns nothing).
An executor ``run(ctx, jobs)`` reads only its jobs' params and settings and yields one ``Result`` per finished
stage; the runner alone writes the lock. Light (no torch): ``compile`` and ``status`` use it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..lock import digest
from ..model import PREFERENCE, plain
from ..render import canonical_json, render, yaml_file

FORMAT = 1  # of the compiled JSON artifacts


@dataclass(frozen=True)
class StageSpec:
    """One stage of a compiled plan (a job for its kind's executor)."""

    name: str  # e.g. "generate[bored-at-home]"
    kind: str
    params: dict  # the hashed slice of the spec
    deps: tuple  # upstream stage names
    scene: str | None = None
    settings: dict = field(default_factory=dict)  # execution-only, never hashed
    reads: dict = field(default_factory=dict)  # upstream stage -> the outputs it reads (default: all of them)

    @property
    def params_hash(self) -> str:
        return digest({"stage": self.kind, "version": KINDS[self.kind].version, "params": self.params})


@dataclass(frozen=True)
class Result:
    """What an executor reports for one finished stage."""

    name: str
    outputs: list  # paths relative to the build folder (files or folders)
    facts: dict | None = None  # recorded in the lock (scores, chosen seeds, cache key, the verdict)
    digest_facts: object = None  # facts that downstream stages depend on beyond the output bytes


@dataclass(frozen=True)
class Compiled:
    """What compile derives from the story once, for every kind's ``jobs`` and ``artifacts``."""

    story: object  # model.Story
    scenes: list  # final scene records (prompt with style prefix, joined negative, seeds, file)
    refs: dict  # model key -> reference as written into artifacts
    spec_rel: str  # the spec's path relative to the project
    build_rel: str  # the build folder's path relative to the project

    @property
    def spec(self):
        return self.story.spec


@dataclass(frozen=True)
class StageKind:
    name: str
    version: int  # bump when the executor's code changes what it produces
    jobs: Callable[[Compiled], list]
    models: Callable[[StageSpec, object], tuple]  # (job, story) -> model keys whose weights its outputs depend on
    executor: str  # module whose ``run(ctx, jobs)`` executes the kind (imported only when it runs)
    artifacts: Callable[[Compiled, list], dict] = lambda c, jobs: {}  # files it compiles: build-relative path -> text
    scene_keys: tuple = ()  # params keys that come from the scene itself (status says "scenes[i]: prompt changed")
    oom_hint: str = ""  # what to lower when it runs out of memory
    verdict: str | None = None  # "module:function": (ctx, job, entry) -> (exit code, lines) judging the build


def scene_file(index: int, scene_id: str) -> str:
    return f"images/{index + 1:02d}-{scene_id}.png"


# ---------------------------------------------------------------- ingest

def _ingest(c: Compiled):
    out = []
    masks = c.story.mask_paths or (None,) * len(c.spec.datasets)
    for src, path, mask in zip(c.spec.datasets, c.story.dataset_paths, masks):
        ds = src.hashed()  # repeats only when set: a lock from before repeats existed stays valid
        if path is not None:
            ds["path"] = c.story.rel(path)  # relative to the project, wherever the spec that wrote it lives
        if mask is not None:
            ds["masks"] = c.story.rel(mask)
        if ds.get("recaption"):  # its file relative to the project, like the path
            ds["recaption"] = {**ds["recaption"], "file": c.story.rel(c.story.caption_paths[len(out)])}
        out.append(ds)
    params = {"datasets": out} if c.spec.many_datasets else {"dataset": out[0]}
    if any(ds.get("recaption") for ds in out):
        params["captioner"] = c.refs["captioner"]
    return [StageSpec("ingest", "ingest", params, ())]


def _ingest_artifacts(c: Compiled, jobs):
    job, = jobs
    return {"data/ingest.json": canonical_json({
        "format": f"storyc.ingest/{FORMAT}", **job.params,
        "output": {"metadata": "data/input/metadata.jsonl", "images": "data/input/images/"}})}


def _dataset_model(job, story):
    keys = ("dataset",) if any(p is not None for p in (*story.dataset_paths, *story.mask_paths)) else ()
    if "captioner" in job.params:  # recaption: the captioner's weights and the (hand-editable) captions files
        keys += ("captioner", "captions")
    return keys


# ---------------------------------------------------------------- filter (Data-Juicer)

def filter_ops(spec) -> list:
    return [{name: plain(params) or {}} for name, params in spec.filters]


def _filter(c: Compiled):
    params = {"filters": [{name: plain(p)} for name, p in c.spec.filters], "processing": c.spec.processing.hashed()}
    return [StageSpec("filter", "filter", params, ("ingest",))]


def _filter_artifacts(c: Compiled, jobs):
    """Data-Juicer's config, written by the YAML emitter (comments included): a spec's file name or values can
    only ever be values here, never keys such as `custom_operator_paths`."""
    proc = c.spec.processing
    cfg = {"project_name": f"storyc-{c.story.id}", "dataset_path": "data/input/metadata.jsonl", "np": proc.workers,
           "text_keys": "text", "image_key": "image", "image_special_token": "<__dj__image>",
           "export_path": "data/output/result.jsonl", "executor_type": proc.executor}
    if proc.executor == "ray":
        cfg["ray_address"] = "auto"
    cfg["process"] = filter_ops(c.spec)
    return {"data/data_juicer.yaml": yaml_file([
        f"Data-Juicer config compiled by storyc {__version__} from {c.spec_rel} (format storyc.data_juicer/2).",
        "Do not edit: edit the spec and run `storyc compile`. Paths are relative to the build folder that holds data/;",
        "to run it by hand from there:  dj-process --config data/data_juicer.yaml"], cfg)}


# ---------------------------------------------------------------- train

def _train(c: Compiled):
    tr = c.spec.train
    params = {"lora": c.spec.lora.hashed(), "train": tr.hashed(),
              "models": {"kolors": c.refs["kolors"], "vae": c.refs["vae"]},
              "formats": list(c.spec.submission.lora_formats)}
    if tr.preview_every:
        params["preview"] = preview_params(c)
    if c.story.validation_path is not None:  # relative to the project, with the caption its images fall back to
        params["train"]["validation"] = {**params["train"]["validation"],
                                         "folder": c.story.rel(c.story.validation_path),
                                         "caption": c.spec.datasets[0].caption}
    return [StageSpec("train", "train", params, ("filter",), settings=tr.settings())]


def preview_params(c: Compiled) -> dict:
    """What the story previews during training render: the scenes (first seed each), at the generation's
    guidance and LoRA strength, at the preview size and steps, scored by the aesthetic model (and by the model of any
    other figure train.select weighs)."""
    tr, common = c.spec.train, generation_common(c.spec)
    size = tr.preview_size
    w, h = (size, size) if isinstance(size, int) else (tuple(size) if size else (common["width"], common["height"]))
    scenes = [{"id": s["id"], "prompt": s["prompt"], "negative_prompt": s["negative_prompt"], "seed": s["seeds"][0],
               # characters only when a scene shows some: a story without characters keeps its slice
               **({"characters": character_params(c, s["characters"])} if s.get("characters") else {})}
              for s in c.scenes]
    out = {"scenes": scenes, "width": w, "height": h, "steps": tr.preview_steps or common["steps"],
           "cfg_scale": common["cfg_scale"], "lora_strength": common["lora_strength"], "aesthetic": c.refs["aesthetic"],
           **guidance(c.spec.generation)}
    if any("characters" in s for s in scenes):  # the previews render the characters, as generation does
        out["ip_adapter"] = c.refs["ip_adapter"]
    weights = tr.select.get("weights", {}) if isinstance(tr.select, dict) else {}
    out.update(measured_by_models(c, {k for k, w in weights.items() if w}))  # what train.select weighs, only then
    return out


def measured_by_models(c: Compiled, figures) -> dict:
    """The params of those ``figures`` that a model measures, hashed only when measured: ``clip_zh`` (prompt
    alignment's Chinese CLIP), ``dreamsim`` (character consistency by DreamSim) and ``preference`` ({name: ref} of
    DiffSynth's preference models)."""
    out = {"clip_zh": c.refs["clip_zh"]} if "prompt_alignment" in figures else {}
    if "character_dreamsim" in figures:
        out["dreamsim"] = c.refs["dreamsim"]
    if any(k in figures for k in PREFERENCE):
        out["preference"] = {k: c.refs[k] for k in PREFERENCE if k in figures}
    return out


def measuring_models(params: dict) -> tuple:
    """The model keys of a stage's measured figures: what ``measured_by_models``'s params name, and DreamSim (the
    score stage's ``dreamsim``)."""
    return (("clip_zh",) * ("clip_zh" in params) + tuple(params.get("preference", ()))
            + ("dreamsim",) * ("dreamsim" in params))


def _train_artifacts(c: Compiled, jobs):
    job, = jobs
    spec, tr, lo = c.spec, c.spec.train, c.spec.lora
    w, h = tr.size
    world = tr.world_size()
    doc = {
        "format": f"storyc.train/{FORMAT}", "models": job.params["models"], "dataset": "data/train/metadata.csv",
        "lora": plain(lo), "train": {**plain(tr), "width": w, "height": h},
        "world_size": world if world is not None else "one process per GPU found at run time",
        "total_steps": tr.optimizer_steps(world or 1),  # optimizer steps, as fit counts them
        "lora_scaling": lo.alpha / lo.rank,
        "outputs": {f: f"lora/{c.story.id}.{f}.safetensors" for f in spec.submission.lora_formats},
    }
    kolors, vae = job.params["models"]["kolors"], job.params["models"]["vae"]
    # what DiffSynth's script has no flag for: said in the script, never silently dropped
    flags = {"epochs", "steps_per_epoch", "batch_size", "learning_rate", "resolution", "center_crop", "random_flip",
             "precision", "accumulate_grad_batches", "strategy"}
    unsupported = [f"train.{k} = {json.dumps(v)}" + (" (the GPUs: CUDA_VISIBLE_DEVICES)" if k == "devices" else "")
                   for k, v in job.params["train"].items() if k not in flags]
    if spec.many_datasets or any(s.repeats != 1 for s in spec.datasets):
        unsupported.append("several sources / repeats (data/train/metadata.csv already holds a row per repeat)")
    if "preview" in job.params:
        unsupported.append("the story previews and checkpoint selection")
    sh = render("train.sh.j2", storyc_version=__version__, spec=c.spec_rel, unsupported=unsupported,
                unet=f"{kolors}/unet/diffusion_pytorch_model.safetensors", text_encoder=f"{kolors}/text_encoder",
                vae=f"{vae}/diffusion_pytorch_model.safetensors", rank=lo.rank, alpha=lo.alpha,
                target_modules=",".join(lo.target_modules), init=lo.init, dataset=f"{c.build_rel}/data/train",
                output=f"{c.build_rel}/lora", epochs=tr.epochs, steps_per_epoch=tr.steps_per_epoch, height=h, width=w,
                center_crop=tr.center_crop, random_flip=tr.random_flip, batch_size=tr.batch_size,
                num_workers=tr.num_workers, learning_rate=tr.learning_rate, accumulate=tr.accumulate_grad_batches,
                strategy=tr.strategy, gradient_checkpointing=tr.gradient_checkpointing, precision=tr.precision)
    return {"train/train_config.json": canonical_json(doc), "train/train.sh": sh}


def _train_models(job, story):
    keys = ("kolors", "vae", "aesthetic") if "preview" in job.params else ("kolors", "vae")
    if "ip_adapter" in job.params.get("preview", {}):  # previews with characters: the adapter and the references
        ids = sorted({ch["id"] for s in job.params["preview"]["scenes"] for ch in s.get("characters", ())})
        keys += ("ip_adapter", *(f"character:{i}" for i in ids))
    keys += measuring_models(job.params.get("preview", {}))
    if "folder" in (job.params["train"].get("validation") or {}):  # its images, by content
        keys += ("validation",)
    return keys


# ---------------------------------------------------------------- generate

# generation values that apply to every scene (lora_scale is hashed through lora_alpha / lora_strength)
GEN_COMMON = ("width", "height", "steps", "cfg_scale", "lora_alpha", "lora_strength", "candidates")
SCENE_KEYS = ("prompt", "negative_prompt", "seeds", "file")


def generation_common(spec) -> dict:
    lora, gen = spec.lora, spec.generation
    alpha = lora.alpha * gen.lora_scale
    return {"width": gen.width, "height": gen.height, "steps": gen.steps, "cfg_scale": gen.cfg_scale,
            "lora_scale": gen.lora_scale, "lora_alpha": alpha, "lora_strength": alpha / lora.rank,
            "candidates": gen.candidates}


def guidance(gen) -> dict:
    """generation.guidance_interval as a stage param, only when set: a slice without it is as it was."""
    return {"guidance_interval": list(gen.guidance_interval)} if gen.guidance_interval is not None else {}


def _generate(c: Compiled):
    common = generation_common(c.spec)
    out = []
    for sc in c.scenes:
        params = {**{k: sc[k] for k in SCENE_KEYS}, **{k: common[k] for k in GEN_COMMON}, "model": c.refs["kolors"],
                  **guidance(c.spec.generation)}
        sel = {k: v for k, v in plain(c.spec.generation.select).items() if k in SELECT_DEFAULT or v}
        if common["candidates"] > 1 and sel != SELECT_DEFAULT:
            params["select"] = sel  # hashed only when it can change the choice
            params.update(measured_by_models(c, {k for k, w in sel.items() if w}))
        if sc.get("characters"):  # hashed only when shown: a scene without characters keeps its slice
            params["characters"] = character_params(c, sc["characters"])
            params["ip_adapter"] = c.refs["ip_adapter"]
        settings = {"index": sc["index"], "batch_size": c.spec.generation.batch_size,
                    "lora_scale": common["lora_scale"]}
        # it reads the diffsynth LoRA only: exporting another format does not re-render the images
        reads = {"train": (f"lora/{c.story.id}.diffsynth.safetensors",)}
        out.append(StageSpec(f"generate[{sc['id']}]", "generate", params, ("train",), sc["id"], settings, reads))
    return out


def character_params(c: Compiled, ids) -> list:
    """What a scene's image depends on of its characters: each one's scale and its reference images (the paths
    here; their bytes are the `character:<id>` fingerprint, so replacing an image re-renders its scenes only)."""
    chars = c.spec.characters
    return [{"id": i, "scale": chars[i].scale,
             "references": [c.story.rel(p) for p in c.story.character_paths.get(i, ())]} for i in ids]


def _generate_artifacts(c: Compiled, jobs):
    gen = c.spec.generation
    return {"generate/generation_plan.json": canonical_json({
        "format": f"storyc.generation/{FORMAT}", "model": c.refs["kolors"], "batch_size": gen.batch_size,
        **generation_common(c.spec), "scenes": c.scenes})}


SELECT_DEFAULT = {"aesthetic": 1.0, "prompt_alignment": 0.0}


def _generate_models(job, story):
    keys = ("kolors",)
    if job.params["candidates"] > 1:
        keys += ("aesthetic", *measuring_models(job.params))
    if "characters" in job.params:
        keys += ("ip_adapter", *(f"character:{ch['id']}" for ch in job.params["characters"]))
    return keys


# ---------------------------------------------------------------- score

# ---------------------------------------------------------------- refine (hi-res, img2img)

def refined_file(index: int, scene_id: str) -> str:
    return f"refined/{index + 1:02d}-{scene_id}.png"


def _refine(c: Compiled):
    """A refine stage for each scene that is refined: its own slice (the refine settings, the scene's prompts, the
    LoRA strength), so tuning it re-runs refine, score and bundle, never generate or train."""
    common = generation_common(c.spec)
    out = []
    for sc in c.scenes:
        r = sc.get("refine")
        if not r:
            continue
        params = {"refine": {k: v for k, v in r.items() if k != "tile"}, "prompt": sc["prompt"],
                  "negative_prompt": sc["negative_prompt"], "source": sc["file"],
                  "file": refined_file(sc["index"], sc["id"]), "model": c.refs["kolors"],
                  "lora_strength": common["lora_strength"]}
        if r["upscaler"] == "esrgan":  # hashed only when used: a Lanczos refine's slice is as it was
            params["esrgan"] = c.refs["esrgan"]
        if sc.get("characters"):  # redrawn with the same references as generated
            params["characters"] = character_params(c, sc["characters"])
            params["ip_adapter"] = c.refs["ip_adapter"]
        reads = {"train": (f"lora/{c.story.id}.diffsynth.safetensors",)}
        out.append(StageSpec(f"refine[{sc['id']}]", "refine", params, (f"generate[{sc['id']}]", "train"), sc["id"],
                             {"tile": r["tile"], "index": sc["index"]}, reads))
    return out


def _refine_models(job, story):
    keys = ("kolors", "esrgan") if "esrgan" in job.params else ("kolors",)
    if "characters" in job.params:
        keys += ("ip_adapter", *(f"character:{ch['id']}" for ch in job.params["characters"]))
    return keys


# ---------------------------------------------------------------- score

def _score(c: Compiled):
    """Each scene's last image: the refined one when the scene is refined."""
    out = []
    for sc in c.scenes:
        last = (refined_file(sc["index"], sc["id"]), f"refine[{sc['id']}]") if sc.get("refine") else \
            (sc["file"], f"generate[{sc['id']}]")
        params = {"model": c.refs["aesthetic"], "file": last[0]}
        # prompt alignment and the preference scores: each whose model the story sets (hashed only then)
        measured = measured_by_models(c, {k for k in PREFERENCE if k in c.refs}
                                      | ({"prompt_alignment"} if "clip_zh" in c.refs else set()))
        if measured:
            params.update(measured, prompt=sc["prompt"])
        if "dreamsim" in c.refs and sc.get("characters"):  # character consistency by DreamSim too (hashed only then)
            params["dreamsim"] = c.refs["dreamsim"]
        out.append(StageSpec(f"score[{sc['id']}]", "score", params, (last[1],), sc["id"]))
    return out


def _score_models(job, story):
    return ("aesthetic", *measuring_models(job.params))


# ---------------------------------------------------------------- bundle

def _bundle(c: Compiled):
    params = {"story": plain(c.spec.story), "submission": c.spec.submission.hashed(),
              "captions": [s["caption"] for s in c.scenes],
              "scenes": [{k: s[k] for k in ("id", "prompt", "negative_prompt", "file")} for s in c.scenes]}
    deps = ("train", *(f"score[{s['id']}]" for s in c.scenes))
    return [StageSpec("bundle", "bundle", params, deps, settings=c.spec.submission.settings())]


def _bundle_artifacts(c: Compiled, jobs):
    sid, sub = c.story.id, c.spec.submission
    lora_files = [f"{sid}.{f}.safetensors" for f in sub.lora_formats]
    images = [Path(s["file"]).name for s in c.scenes]
    return {"submission_manifest.json": canonical_json({
        "format": f"storyc.submission/{FORMAT}", "story": plain(c.spec.story), "folder": f"submission/{sid}",
        "min_aesthetic": sub.min_aesthetic, "storyboard": plain(sub.storyboard),
        "files": sorted(lora_files + images + ["prompts.txt", "prompts.csv", "prompts.json", "storyboard.png",
                                              "scores.json", "README.md", "manifest.json", "report.html"])})}


def _bundle_models(job, story):
    """The bundle draws its captions and report.html's text with the font (storyc.fonts)."""
    return ("font",)


# ---------------------------------------------------------------- the kinds, in pipeline order

KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("ingest", 1, _ingest, _dataset_model, "storyc.stages.ingest", _ingest_artifacts),
    StageKind("filter", 1, _filter, lambda job, story: (), "storyc.stages.filter", _filter_artifacts),
    StageKind("train", 1, _train, _train_models, "storyc.stages.train.stage", _train_artifacts,
              oom_hint="set `train.gradient_checkpointing: true` (or `auto`), lower `train.batch_size` or "
                       "`train.resolution`, or cap the memory storyc plans for with STORYC_GPU_MEMORY_GIB"),
    StageKind("generate", 1, _generate, _generate_models, "storyc.stages.generate", _generate_artifacts,
              scene_keys=(*SCENE_KEYS, "characters"),
              oom_hint="lower `generation.batch_size` (images per UNet call; `auto` sizes it from free memory), "
                       "or cap the memory storyc plans for with STORYC_GPU_MEMORY_GIB"),
    StageKind("refine", 1, _refine, _refine_models, "storyc.stages.refine",
              scene_keys=("refine", "prompt", "negative_prompt", "characters"),
              oom_hint="set `generation.refine.tile: true` (tiled VAE), lower `generation.refine.scale`, or cap the "
                       "memory storyc plans for with STORYC_GPU_MEMORY_GIB"),
    # version 2: each image's style statistics and (with models.clip_zh) prompt alignment beside its score;
    # version 3: each image scored on its own (its figures no longer depend on the other images of the batch)
    StageKind("score", 3, _score, _score_models, "storyc.stages.score", scene_keys=("prompt",)),
    # version 5: scores.json says character_consistency (null: the story has no character in two scenes);
    # version 6: storyboard.png written by storyc.png (Average-filtered, deflated on every core): other bytes
    # version 7: scores.json says each preference model's figures (null: not measured); 8: MPS among them;
    # 9: character_consistency says its DreamSim figures (null: not measured)
    StageKind("bundle", 9, _bundle, _bundle_models, "storyc.stages.bundle", _bundle_artifacts,
              verdict="storyc.submission:verdict"),
)}


def stage_jobs(c: Compiled) -> dict:
    """Every stage of the story, in pipeline order: name -> StageSpec."""
    stages = {}
    for kind in KINDS.values():
        for job in kind.jobs(c):
            assert job.name not in stages, job.name
            stages[job.name] = job
    return stages
