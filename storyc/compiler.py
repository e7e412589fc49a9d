"""Pure compile: Story -> Plan. No I/O here; ``write_plan`` puts the artifacts on disk.

Every artifact is deterministic (sorted keys, no timestamps, paths relative to the project) so the same spec
compiles to byte-identical files and a change shows up as a small diff.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .model import Story
from .render import atomic_write, canonical_json, render, yaml_file
from .rules import join_negative
from .stages.registry import Source, generation_common, stage_jobs
from .stages.train_config import TrainConfig

FORMAT = 1


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


def compile(story: Story, build_dir: Path | None = None) -> Plan:  # noqa: A001 - the verb is the point
    d = story.data
    build_dir = Path(build_dir) if build_dir else story.root / "build" / story.id
    spec_rel = story.rel(story.spec_path)
    build_rel = story.rel(build_dir)
    lora, train, gen, style, sub = d["lora"], d["train"], d["generation"], d["style"], d["submission"]
    notes = []

    # ---- every stage, from the registry (each hashes only the slice it reads)
    scenes = []
    for s in story.scenes:
        scenes.append({
            "index": s.index, "id": s.id, "file": scene_file(s.index, s.id),
            "prompt": style["prefix"] + s.prompt,
            "negative_prompt": join_negative(style["negative"], s.negative),
            "seed": s.seed, "seeds": [s.seed + k for k in range(gen["candidates"])],
            "caption": s.caption,
        })
    kolors, vae = _model_ref(story, "kolors"), _model_ref(story, "vae")
    refs = {"kolors": kolors, "vae": vae, "aesthetic": _model_ref(story, "aesthetic")}
    stages = stage_jobs(Source(story, scenes, refs))

    # ---- ingest
    ingest = {"format": f"storyc.ingest/{FORMAT}", **stages["ingest"].params,
              "output": {"metadata": "data/input/metadata.jsonl", "images": "data/input/images/"}}

    # ---- filter (Data-Juicer)
    dj = dj_config(story, spec_rel)

    # ---- train
    tc = TrainConfig.from_job(stages["train"])
    w, h = tc.size
    world = tc.world_size()
    train_cfg = {
        "format": f"storyc.train/{FORMAT}",
        "models": {"kolors": kolors, "vae": vae},
        "dataset": "data/train/metadata.csv",
        "lora": lora, "train": {**train, "width": w, "height": h},
        "world_size": world if world is not None else "one process per GPU found at run time",
        "total_steps": tc.optimizer_steps(world or 1),  # optimizer steps, as fit counts them
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
    gen_common = generation_common(story)
    if gen["lora_scale"] != 1.0:
        notes.append(f"generation.lora_scale {gen['lora_scale']:g}: the LoRA trained at alpha {lora['alpha']:g} "
                     f"is applied at alpha {gen_common['lora_alpha']:g} (rank {lora['rank']}, update scale "
                     f"{gen_common['lora_strength']:g})")
    gen_plan = {"format": f"storyc.generation/{FORMAT}", "model": kolors, "batch_size": gen["batch_size"],
                **gen_common, "scenes": scenes}

    # ---- bundle
    lora_files = [f"{story.id}.{f}.safetensors" for f in sub["lora_formats"]]
    images = [Path(s["file"]).name for s in scenes]
    manifest = {
        "format": f"storyc.submission/{FORMAT}", "story": d["story"], "folder": f"submission/{story.id}",
        "min_aesthetic": sub["min_aesthetic"], "storyboard": sub["storyboard"],
        "files": sorted(lora_files + images + ["prompts.txt", "prompts.csv", "prompts.json", "storyboard.png",
                                              "scores.json", "README.md", "manifest.json", "report.html"]),
    }

    plan_doc = {
        "format": f"storyc.plan/{FORMAT}", "storyc": __version__, "spec": spec_rel,
        "sources": [story.rel(p) for p in story.sources], "story": d["story"], "notes": notes,
        "stages": {n: {"kind": s.kind, "deps": list(s.deps), "params_hash": s.params_hash,
                       **({"settings": s.settings} if s.settings else {})} for n, s in stages.items()},
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


def dj_config(story: Story, spec_rel: str) -> str:
    """Data-Juicer's config, written by the YAML emitter (comments included): a spec's file name or values can
    only ever be values here, never keys such as `custom_operator_paths`."""
    d = story.data
    cfg = {"project_name": f"storyc-{story.id}", "dataset_path": "data/input/metadata.jsonl",
           "np": d["processing"]["workers"], "text_keys": "text", "image_key": "image",
           "image_special_token": "<__dj__image>", "export_path": "data/output/result.jsonl",
           "executor_type": d["processing"]["executor"]}
    if d["processing"]["executor"] == "ray":
        cfg["ray_address"] = "auto"
    cfg["process"] = [{k: (v or {}) for k, v in op.items()} for op in d["filters"]]
    return yaml_file([f"Data-Juicer config compiled by storyc {__version__} from {spec_rel} (format "
                      "storyc.data_juicer/2).",
                      "Do not edit: edit the spec and run `storyc compile`. Paths are relative to the build folder "
                      "that holds data/;",
                      "to run it by hand from there:  dj-process --config data/data_juicer.yaml"], cfg)


def changed_artifacts(plan: Plan) -> list[str]:
    """The artifacts whose file differs from what the plan would write (status and --dry-run write nothing)."""
    out = []
    for rel, text in plan.artifacts.items():
        try:
            same = (plan.build_dir / rel).read_bytes() == text.encode("utf-8")
        except OSError:
            same = False
        if not same:
            out.append(rel)
    return out


def write_plan(plan: Plan) -> list[str]:
    """Write every changed artifact (atomically); return the paths written."""
    written = changed_artifacts(plan)
    for rel in written:
        atomic_write(plan.build_dir / rel, plan.artifacts[rel])
    return written
