"""Pure compile: Story -> Plan. No I/O here; ``write_plan`` puts the artifacts on disk.

The stages and the files each kind compiles come from the registry (``KINDS``); compile adds the plan itself and
the resolved spec. Every artifact is deterministic (sorted keys, no timestamps, paths relative to the project) so
the same spec compiles to byte-identical files and a change shows up as a small diff.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import StorycError
from .model import Story, join_negative, plain, refine_for, splice
from .render import atomic_write, canonical_json
from .stages.registry import FORMAT, KINDS, Compiled, generation_common, scene_file, stage_jobs


@dataclass(frozen=True)
class Plan:
    story: Story
    build_dir: Path
    artifacts: dict  # relative path -> text
    stages: dict  # name -> StageSpec, in run order
    notes: tuple


def model_ref(story: Story, key: str) -> str:
    """A model reference as written into artifacts: a local folder relative to the project, else as written."""
    ref = story.models.get(key)
    if ref is None:
        return story.spec.models[key]
    return ref.raw if ref.scheme != "local" else story.rel(ref.path)


def compiled(story: Story, build_dir: Path) -> Compiled:
    spec = story.spec
    scenes = [{"index": s.index, "id": s.id, "file": scene_file(s.index, s.id),
               "prompt": spec.style.prefix + splice(s.prompt, spec.characters),
               "negative_prompt": join_negative(spec.style.negative, s.negative),
               "seed": s.seed, "seeds": [s.seed + k for k in range(spec.generation.candidates)],
               "caption": s.caption} for s in spec.scenes]
    for rec, s in zip(scenes, spec.scenes):
        if s.characters:  # only then: a story without characters compiles exactly as before they existed
            rec["characters"] = list(s.characters)
    if any(refine_for(spec, s) for s in spec.scenes):  # the hi-res pass, per scene (only when any scene has one)
        for rec, s in zip(scenes, spec.scenes):
            rec["refine"] = refine_for(spec, s)
    refs = {k: model_ref(story, k) for k in story.spec.models}
    return Compiled(story, scenes, refs, story.rel(story.spec_path), story.rel(build_dir))


def notes(story: Story) -> list[str]:
    lora, gen = story.spec.lora, story.spec.generation
    if gen.lora_scale == 1.0:
        return []
    common = generation_common(story.spec)
    return [f"generation.lora_scale {gen.lora_scale:g}: the LoRA trained at alpha {lora.alpha:g} is applied at alpha "
            f"{common['lora_alpha']:g} (rank {lora.rank}, update scale {common['lora_strength']:g})"]


def compile(story: Story, build_dir: Path | None = None) -> Plan:  # noqa: A001 - the verb is the point
    build_dir = Path(build_dir).resolve() if build_dir else story.root / "build" / story.id  # -o DIR: from here
    c = compiled(story, build_dir)
    stages = stage_jobs(c)
    artifacts = {}
    for kind in KINDS.values():
        jobs = [j for j in stages.values() if j.kind == kind.name]
        for rel, text in kind.artifacts(c, jobs).items():
            assert rel not in artifacts, rel
            artifacts[rel] = text
    said = notes(story)
    plan_doc = {
        "format": f"storyc.plan/{FORMAT}", "storyc": __version__, "spec": c.spec_rel,
        "sources": [story.rel(p) for p in story.files], "story": plain(story.spec.story), "notes": said,
        "stages": {n: {"kind": s.kind, "deps": list(s.deps), "params_hash": s.params_hash,
                       **({"settings": s.settings} if s.settings else {})} for n, s in stages.items()},
    }
    artifacts["plan.json"] = canonical_json(plan_doc)
    artifacts["spec.resolved.json"] = canonical_json({"format": f"storyc.spec/{FORMAT}", "spec": story.resolved})
    return Plan(story, build_dir, dict(sorted(artifacts.items(), key=lambda kv: _ORDER.get(kv[0], 99))), stages,
                tuple(said))


# the order `storyc compile` lists them in
_ORDER = {rel: i for i, rel in enumerate(("plan.json", "spec.resolved.json", "data/ingest.json", "data/data_juicer.yaml",
                                          "train/train_config.json", "train/train.sh",
                                          "generate/generation_plan.json", "submission_manifest.json"))}


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


OWNER = ".storyc-spec"  # in a build folder: the spec it is the build of


def owner(plan: Plan) -> str | None:
    """The spec (project-relative) whose build folder this is, if another spec still exists and claimed it first;
    None when the folder is this spec's or nobody's."""
    try:
        other = (plan.build_dir / OWNER).read_text("utf-8").strip()
    except OSError:
        return None
    me = plan.story.rel(plan.story.spec_path)
    return other if other and other != me and (plan.story.root / other).is_file() else None


def check_owner(plan: Plan) -> None:
    """Two specs never share a build folder: a spec that extends another inherits its story.id, and building it
    would overwrite the other's images, lock records and submission."""
    other = owner(plan)
    if other is not None:
        me, folder = plan.story.rel(plan.story.spec_path), plan.story.rel(plan.build_dir)
        raise StorycError(f"{folder}/ is the build folder of {other}; {me} has the same story.id `{plan.story.id}`",
                          f"give {me} a story.id of its own (`story: {{id: ...}}`: a spec that `extends` another "
                          "inherits its id), or build it into another folder with -o DIR")


def write_plan(plan: Plan) -> list[str]:
    """Write every changed artifact (atomically); return the paths written. Claims the build folder for the spec
    (refused when another spec's build is there)."""
    check_owner(plan)
    me = plan.story.rel(plan.story.spec_path) + "\n"
    if not (plan.build_dir / OWNER).is_file() or (plan.build_dir / OWNER).read_text("utf-8") != me:
        atomic_write(plan.build_dir / OWNER, me)
    written = changed_artifacts(plan)
    for rel in written:
        atomic_write(plan.build_dir / rel, plan.artifacts[rel])
    return written
