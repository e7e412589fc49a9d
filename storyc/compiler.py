"""Pure compile: Story -> Plan. No I/O here; ``write_plan`` puts the artifacts on disk.

Every artifact is deterministic (sorted keys, no timestamps, paths relative to the project) so the same spec
compiles to byte-identical files and a change shows up as a small diff.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .model import Story
from .render import canonical_json, render, write_if_changed
from .rules import join_negative

FORMAT = 1
# Bumped when a stage's code changes what it produces, so old outputs become stale.
STAGE_VERSIONS = {"ingest": 1, "filter": 1, "train": 1, "generate": 1, "score": 1, "bundle": 1}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class StageSpec:
    name: str  # e.g. "generate[bored-at-home]"
    kind: str  # ingest | filter | train | generate | score | bundle
    params: dict  # the slice of the spec this stage reads
    deps: tuple  # names of upstream stages
    scene: str | None = None

    @property
    def params_hash(self) -> str:
        return digest({"stage": self.kind, "version": STAGE_VERSIONS[self.kind], "params": self.params})


@dataclass(frozen=True)
class Plan:
    story: Story
    build_dir: Path
    artifacts: dict  # relative path -> text
    stages: dict  # name -> StageSpec, in run order
    notes: tuple


def _model_ref(story: Story, key: str) -> str:
    ref = story.models.get(key)
    if ref is None:
        return story.data["models"][key]
    return ref.raw if ref.scheme != "local" else story.rel(ref.path)


def scene_file(index: int, scene_id: str) -> str:
    return f"images/{index + 1:02d}-{scene_id}.png"


def resolution(train: dict) -> tuple[int, int]:
    r = train["resolution"]
    return (r, r) if isinstance(r, int) else (r[0], r[1])


def compile(story: Story, build_dir: Path | None = None) -> Plan:  # noqa: A001 - the verb is the point
    d = story.data
    build_dir = Path(build_dir) if build_dir else story.root / "build" / story.id
    spec_rel = story.rel(story.spec_path)
    build_rel = story.rel(build_dir)
    lora, train, gen, style, sub = d["lora"], d["train"], d["generation"], d["style"], d["submission"]
    notes = []

    # ---- ingest
    ds = dict(d["dataset"])
    if story.dataset_path is not None:
        ds["path"] = story.rel(story.dataset_path)
    ingest = {"format": f"storyc.ingest/{FORMAT}", "dataset": ds,
              "output": {"metadata": "data/input/metadata.jsonl", "images": "data/input/images/"}}

    # ---- filter (Data-Juicer)
    dj = render("data_juicer.yaml.j2", storyc_version=__version__, spec=spec_rel, build_dir=build_rel,
                project_name=f"storyc-{story.id}", np=d["processing"]["workers"],
                executor=d["processing"]["executor"],
                process=[{k: (v or {}) for k, v in op.items()} for op in d["filters"]])

    # ---- train
    w, h = resolution(train)
    kolors, vae = _model_ref(story, "kolors"), _model_ref(story, "vae")
    train_cfg = {
        "format": f"storyc.train/{FORMAT}",
        "models": {"kolors": kolors, "vae": vae},
        "dataset": "data/train/metadata.csv",
        "lora": lora, "train": {**train, "width": w, "height": h},
        "total_steps": train["epochs"] * train["steps_per_epoch"],
        "lora_scaling": lora["alpha"] / lora["rank"],
        "outputs": {f: f"lora/{story.id}.{f}.safetensors" for f in sub["lora_formats"]},
    }
    train_sh = render(
        "train.sh.j2", storyc_version=__version__, spec=spec_rel,
        unet=f"{kolors}/unet/diffusion_pytorch_model.safetensors", text_encoder=f"{kolors}/text_encoder",
        vae=f"{vae}/diffusion_pytorch_model.safetensors", rank=lora["rank"], alpha=lora["alpha"],
        target_modules=",".join(lora["target_modules"]), init=lora["init"],
        dataset=f"{build_rel}/data/train", output=f"{build_rel}/lora", epochs=train["epochs"],
        steps_per_epoch=train["steps_per_epoch"], height=h, width=w, center_crop=train["center_crop"],
        random_flip=train["random_flip"], batch_size=train["batch_size"], num_workers=train["num_workers"],
        learning_rate=train["learning_rate"], accumulate=train["accumulate_grad_batches"],
        strategy=train["strategy"], gradient_checkpointing=train["gradient_checkpointing"],
        precision=train["precision"])

    # ---- generate
    eff_alpha = lora["alpha"] * gen["lora_scale"]
    strength = eff_alpha / lora["rank"]
    if gen["lora_scale"] != 1.0:
        notes.append(f"generation.lora_scale {gen['lora_scale']:g}: the LoRA trained at alpha {lora['alpha']:g} "
                     f"is applied at alpha {eff_alpha:g} (rank {lora['rank']}, update scale {strength:g})")
    scenes = []
    for s in story.scenes:
        scenes.append({
            "index": s.index, "id": s.id, "file": scene_file(s.index, s.id),
            "prompt": style["prefix"] + s.prompt,
            "negative_prompt": join_negative(style["negative"], s.negative),
            "seed": s.seed, "seeds": [s.seed + k for k in range(gen["candidates"])],
            "caption": s.caption,
        })
    gen_common = {"width": gen["width"], "height": gen["height"], "steps": gen["steps"],
                  "cfg_scale": gen["cfg_scale"], "lora_scale": gen["lora_scale"], "lora_alpha": eff_alpha,
                  "lora_strength": strength, "candidates": gen["candidates"]}
    gen_plan = {"format": f"storyc.generation/{FORMAT}", "model": kolors, "batch_size": gen["batch_size"],
                **gen_common, "scenes": scenes}

    # ---- bundle
    lora_files = [f"{story.id}.{f}.safetensors" for f in sub["lora_formats"]]
    images = [Path(s["file"]).name for s in scenes]
    manifest = {
        "format": f"storyc.submission/{FORMAT}", "story": d["story"], "folder": f"submission/{story.id}",
        "min_aesthetic": sub["min_aesthetic"], "storyboard": sub["storyboard"],
        "files": sorted(lora_files + images + ["prompts.txt", "prompts.csv", "storyboard.png", "scores.json",
                                              "README.md", "manifest.json", "report.html"]),
    }

    # ---- stage graph (each hashes only the slice it reads)
    stages = {}

    def add(name, kind, params, deps, scene=None):
        stages[name] = StageSpec(name, kind, params, tuple(deps), scene)

    add("ingest", "ingest", {"dataset": ds}, [])
    add("filter", "filter", {"filters": d["filters"], "processing": d["processing"]}, ["ingest"])
    add("train", "train", {"lora": lora, "train": train, "models": {"kolors": kolors, "vae": vae}}, ["filter"])
    for sc in scenes:
        p = {k: sc[k] for k in ("prompt", "negative_prompt", "seeds", "file")}
        add(f"generate[{sc['id']}]", "generate", {**p, **{k: v for k, v in gen_common.items() if k != "lora_scale"},
                                                    "model": kolors}, ["train"], sc["id"])
    for sc in scenes:
        add(f"score[{sc['id']}]", "score", {"model": _model_ref(story, "aesthetic"), "file": sc["file"]},
            [f"generate[{sc['id']}]"], sc["id"])
    add("bundle", "bundle", {"story": d["story"], "submission": sub, "captions": [s["caption"] for s in scenes],
                             "scenes": [{k: s[k] for k in ("id", "prompt", "negative_prompt", "file")} for s in scenes]},
        ["train", *(f"score[{s['id']}]" for s in scenes)])

    plan_doc = {
        "format": f"storyc.plan/{FORMAT}", "storyc": __version__, "spec": spec_rel,
        "sources": [story.rel(p) for p in story.sources], "story": d["story"], "notes": notes,
        "stages": {n: {"kind": s.kind, "deps": list(s.deps), "params_hash": s.params_hash} for n, s in stages.items()},
    }
    artifacts = {
        "plan.json": canonical_json(plan_doc),
        "spec.resolved.json": canonical_json({"format": f"storyc.spec/{FORMAT}", "spec": d}),
        "data/ingest.json": canonical_json(ingest),
        "data/data_juicer.yaml": dj,
        "train/train_config.json": canonical_json(train_cfg),
        "train/train.sh": train_sh,
        "generate/generation_plan.json": canonical_json(gen_plan),
        "submission_manifest.json": canonical_json(manifest),
    }
    return Plan(story, build_dir, artifacts, stages, tuple(notes))


def write_plan(plan: Plan) -> list[str]:
    """Write every artifact (atomically, only when changed); return the paths written."""
    written = []
    for rel, text in plan.artifacts.items():
        if write_if_changed(plan.build_dir / rel, text):
            written.append(rel)
    return written
