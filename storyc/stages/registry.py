"""Every stage kind, declared once: what it hashes, what it only executes with, the models it reads.

A kind's ``jobs`` turns the compiled story into its stages: ``params`` is the slice of the spec that changes
its outputs (hashed into the lock; an edit there reruns it), ``settings`` are execution-only values (checkpoint
cadence, CUDA graphs, batch sizes: never hashed, so changing them reruns nothing). The executor is
``storyc.stages.<kind>.run(ctx, jobs)``: it reads only its jobs' params and settings, and yields one
``Result`` per finished stage; the runner alone writes the lock. Adding a kind is one entry here and one module.
This module is light (no torch): ``compile`` and ``status`` use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..lock import digest


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
class Source:
    """What compile derives from the story once, for every kind's ``jobs``."""

    story: object  # model.Story
    scenes: list  # final scene records (prompt with style prefix, joined negative, seeds, file)
    refs: dict  # model key -> reference as written into artifacts


@dataclass(frozen=True)
class StageKind:
    name: str
    version: int  # bump when the executor's code changes what it produces
    jobs: Callable[[Source], list]
    models: Callable[[StageSpec, object], tuple]  # (job, story) -> model keys whose weights its outputs depend on
    oom_hint: str = ""  # what to lower when it runs out of memory
    verdict: bool = False  # its executor module has ``verdict(entry, ctx) -> (exit code, lines)``


# ---------------------------------------------------------------- the kinds, in pipeline order

def _ingest(src: Source):
    from ..rules import sources

    out = []
    for (where, ds), path in zip(sources(src.story.data), src.story.dataset_paths):
        ds = dict(ds)
        if path is not None:
            ds["path"] = src.story.rel(path)  # relative to the project, wherever the spec that wrote it lives
        if ds.get("repeats") == 1:
            del ds["repeats"]  # the default is not hashed: a lock from before repeats existed stays valid
        out.append(ds)
    params = {"datasets": out} if "datasets" in src.story.data else {"dataset": out[0]}
    return [StageSpec("ingest", "ingest", params, ())]


def _filter(src: Source):
    d = src.story.data
    return [StageSpec("filter", "filter", {"filters": d["filters"], "processing": d["processing"]}, ("ingest",))]


# train.* values that decide how fast or how resumably it trains, never what it trains
TRAIN_SETTINGS = ("checkpoint_every", "cuda_graphs", "compile", "num_workers", "gradient_checkpointing",
                  "tensorboard")
# the trainers' knobs: hashed only when set, so a spec that leaves them at the notebook's math keeps its lock
TRAIN_KNOBS = {"min_snr_gamma": None, "noise_offset": 0, "caption_dropout": 0, "ema": None, "optimizer": "adamw",
               "lr_scheduler": "constant", "lr_warmup_steps": 0, "preview_every": None, "preview_steps": None,
               "preview_size": None, "select": "last", "buckets": False}


def _train(src: Source):
    d = src.story.data
    train = {k: v for k, v in d["train"].items()
             if k not in TRAIN_SETTINGS and not (k in TRAIN_KNOBS and v == TRAIN_KNOBS[k])}
    params = {"lora": d["lora"], "train": train, "models": {"kolors": src.refs["kolors"], "vae": src.refs["vae"]},
              "formats": list(d["submission"]["lora_formats"])}
    if d["train"]["preview_every"]:
        params["preview"] = preview_params(src)
    settings = {k: d["train"][k] for k in TRAIN_SETTINGS}
    return [StageSpec("train", "train", params, ("filter",), settings=settings)]


def preview_params(src: Source) -> dict:
    """What the story previews during training render: the scenes (first seed each), at the generation's
    guidance and LoRA strength, at the preview size and steps, scored by the aesthetic model."""
    tr, common = src.story.data["train"], generation_common(src.story)
    size = tr["preview_size"]
    w, h = (size, size) if isinstance(size, int) else (size or (common["width"], common["height"]))
    return {"scenes": [{"id": s["id"], "prompt": s["prompt"], "negative_prompt": s["negative_prompt"],
                        "seed": s["seeds"][0]} for s in src.scenes],
            "width": w, "height": h, "steps": tr["preview_steps"] or common["steps"],
            "cfg_scale": common["cfg_scale"], "lora_strength": common["lora_strength"], "aesthetic": src.refs["aesthetic"]}


# generation values that apply to every scene (lora_scale is hashed through lora_alpha / lora_strength)
GEN_COMMON = ("width", "height", "steps", "cfg_scale", "lora_alpha", "lora_strength", "candidates")


def generation_common(story) -> dict:
    lora, gen = story.data["lora"], story.data["generation"]
    alpha = lora["alpha"] * gen["lora_scale"]
    return {"width": gen["width"], "height": gen["height"], "steps": gen["steps"], "cfg_scale": gen["cfg_scale"],
            "lora_scale": gen["lora_scale"], "lora_alpha": alpha, "lora_strength": alpha / lora["rank"],
            "candidates": gen["candidates"]}


def _generate(src: Source):
    common = generation_common(src.story)
    out = []
    for sc in src.scenes:
        params = {**{k: sc[k] for k in ("prompt", "negative_prompt", "seeds", "file")},
                  **{k: common[k] for k in GEN_COMMON}, "model": src.refs["kolors"]}
        settings = {"index": sc["index"], "batch_size": src.story.data["generation"]["batch_size"],
                    "lora_scale": common["lora_scale"]}
        # it reads the diffsynth LoRA only: exporting another format does not re-render the images
        reads = {"train": (f"lora/{src.story.id}.diffsynth.safetensors",)}
        out.append(StageSpec(f"generate[{sc['id']}]", "generate", params, ("train",), sc["id"], settings, reads))
    return out


def _score(src: Source):
    return [StageSpec(f"score[{sc['id']}]", "score", {"model": src.refs["aesthetic"], "file": sc["file"]},
                      (f"generate[{sc['id']}]",), sc["id"]) for sc in src.scenes]


def _bundle(src: Source):
    d = src.story.data
    params = {"story": d["story"], "submission": d["submission"], "captions": [s["caption"] for s in src.scenes],
              "scenes": [{k: s[k] for k in ("id", "prompt", "negative_prompt", "file")} for s in src.scenes]}
    deps = ("train", *(f"score[{s['id']}]" for s in src.scenes))
    return [StageSpec("bundle", "bundle", params, deps)]


def _no_models(job, story):
    return ()


def _captions_font(job, story):
    """The bundle depends on the caption font only when it draws captions."""
    drawn = job.params["submission"]["storyboard"]["captions"] and any(job.params["captions"])
    return ("font",) if drawn else ()


KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("ingest", 1, _ingest,
              lambda job, story: ("dataset",) if any(p is not None for p in story.dataset_paths) else ()),
    StageKind("filter", 1, _filter, _no_models),
    StageKind("train", 1, _train,
              lambda job, story: ("kolors", "vae", "aesthetic") if "preview" in job.params else ("kolors", "vae"),
              oom_hint="set `train.gradient_checkpointing: true` (or `auto`), lower `train.batch_size` or "
                       "`train.resolution`, or cap the memory storyc plans for with STORYC_GPU_MEMORY_GIB"),
    StageKind("generate", 1, _generate,
              lambda job, story: ("kolors", "aesthetic") if job.params["candidates"] > 1 else ("kolors",),
              oom_hint="lower `generation.batch_size` (images per UNet call; `auto` sizes it from free memory), "
                       "or cap the memory storyc plans for with STORYC_GPU_MEMORY_GIB"),
    StageKind("score", 1, _score, lambda job, story: ("aesthetic",)),
    StageKind("bundle", 3, _bundle, _captions_font, verdict=True),
)}


def stage_jobs(src: Source) -> dict:
    """Every stage of the story, in pipeline order: name -> StageSpec."""
    stages = {}
    for kind in KINDS.values():
        for job in kind.jobs(src):
            assert job.name not in stages, job.name
            stages[job.name] = job
    return stages
