"""The validated story as frozen, typed sections, built once after validation.

No default is written here: the schema fills them in before a section is built (``schema.defaults``), and each
field's hashing policy is the schema's ``x-hash`` (``Section.hashed`` / ``Section.settings`` read it). A test checks
that every section has exactly the schema's keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar


def plain(v):
    """Typed values back to plain JSON data (tuples as lists, sections as mappings): what stages hash and the lock
    stores."""
    if isinstance(v, Section):
        return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


def _frozen(v):
    if isinstance(v, list):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, dict):
        return {k: _frozen(x) for k, x in v.items()}
    return v


class Section:
    """A mapping of the spec as a frozen dataclass; ``PATH`` is where the schema declares its keys."""

    PATH: ClassVar[tuple] = ()

    @classmethod
    def build(cls, data: dict, **typed):
        own = {f.name for f in fields(cls)} - set(typed)
        return cls(**{k: _frozen(data[k]) for k in own}, **typed)

    def _policy(self) -> dict:
        from .schema import fields as schema_fields

        return schema_fields(self.PATH)

    def hashed(self) -> dict:
        """The values that change what a stage makes: `always` fields, and `when-set` ones that differ from their
        default (so a lock written before such a field existed stays valid)."""
        out = {}
        for name, (policy, default) in self._policy().items():
            v = plain(getattr(self, name))
            if policy == "always" or (policy == "when-set" and v != default):
                out[name] = v
        return out

    def settings(self) -> dict:
        """The execution settings (`never` hashed): how fast or resumably a stage runs, never what it makes."""
        return {n: plain(getattr(self, n)) for n, (policy, _) in self._policy().items() if policy == "never"}


@dataclass(frozen=True)
class StoryInfo(Section):
    PATH = ("story",)
    id: str
    title: str | None
    team: str | None


@dataclass(frozen=True)
class Source(Section):
    """One training data source (`dataset`, or an item of `datasets`)."""

    PATH = ("dataset",)
    source: str  # modelscope | folder | jsonl
    id: str | None
    subset: str
    split: str
    revision: str | None
    path: str | None  # as written, relative to the spec that wrote it (Story.dataset_paths holds it resolved)
    caption: str
    limit: int | None
    repeats: int
    masks: str | None  # alpha | a folder as written (Story.mask_paths holds it resolved)
    recaption: dict | None  # {mode, template, prompt, seed, file} (Story.caption_paths holds file resolved)


@dataclass(frozen=True)
class Processing(Section):
    PATH = ("processing",)
    workers: int
    executor: str


@dataclass(frozen=True)
class LoRA(Section):
    PATH = ("lora",)
    rank: int
    alpha: float
    target_modules: tuple
    init: str
    type: str  # lora | dora | loha | lokr
    factor: int  # lokr only: LyCORIS' decompose factor (-1: near the square root)
    decompose_both: bool  # lokr only: the first Kronecker factor a rank-r product too


@dataclass(frozen=True)
class Train(Section):
    PATH = ("train",)
    epochs: int
    steps_per_epoch: int
    batch_size: int
    learning_rate: float
    resolution: int | tuple
    center_crop: bool
    random_flip: bool
    precision: str
    gradient_checkpointing: bool | str
    accumulate_grad_batches: int
    strategy: str
    devices: str | int | tuple
    num_nodes: int
    seed: int
    checkpoint_every: int
    num_workers: int
    compile: bool
    cuda_graphs: bool
    min_snr_gamma: float | None
    noise_offset: float
    caption_dropout: float
    ema: float | None
    optimizer: str
    lr_scheduler: str
    lr_warmup_steps: int
    tensorboard: bool
    preview_every: int | None
    preview_steps: int | None
    preview_size: int | tuple | None
    select: str | dict  # last | best_score | {weights: {figure: weight}}
    buckets: bool
    validation: dict | None
    stop: dict | None
    masked_loss: bool

    @property
    def size(self) -> tuple[int, int]:
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[0], r[1])

    @property
    def micro_batches(self) -> int:
        return micro_batches(self.epochs, self.steps_per_epoch, self.batch_size)

    def optimizer_steps(self, world: int) -> int:
        return optimizer_steps(self.micro_batches, self.accumulate_grad_batches, world)

    def world_size(self, gpus: int | None = None) -> int | None:
        """Processes that train: 1 unless ddp/deepspeed on several devices; None when it depends on the GPU
        count and ``gpus`` is not known (compile time)."""
        if isinstance(self.devices, (list, tuple)):
            per = len(self.devices) if self.strategy != "auto" or len(self.devices) > 1 else 1
        elif isinstance(self.devices, int):
            per = self.devices
        else:
            per = 1 if self.strategy == "auto" else gpus
        return None if per is None else per * self.num_nodes


@dataclass(frozen=True)
class Style(Section):
    PATH = ("style",)
    prefix: str
    negative: str


@dataclass(frozen=True)
class Generation(Section):
    PATH = ("generation",)
    width: int
    height: int
    steps: int
    cfg_scale: float
    guidance_interval: tuple | None  # the noise levels that are guided (null: every step)
    lora_scale: float
    candidates: int
    select: dict  # how candidates are ranked: {aesthetic, prompt_alignment} weights
    batch_size: int | str
    allow_duplicate_seeds: bool
    refine: dict | None  # the hi-res refine pass of every scene (null: off); scenes may override it


@dataclass(frozen=True)
class Scene(Section):
    PATH = ("scenes", 0)
    index: int  # its place in the story (not a spec key)
    id: str
    prompt: str
    seed: int
    negative: str
    caption: str
    refine: dict | bool | None  # None: as generation.refine; False: not refined; a mapping: some settings over it
    characters: tuple  # ids of the characters it shows


@dataclass(frozen=True)
class Character(Section):
    PATH = ("characters", "_")
    reference: tuple  # image paths as written (one string is a list of one)
    scale: float
    description: str

    @classmethod
    def build(cls, data: dict, **typed):
        ref = data["reference"]
        return super().build(data, reference=(ref,) if isinstance(ref, str) else tuple(ref), **typed)


@dataclass(frozen=True)
class Storyboard(Section):
    PATH = ("submission", "storyboard")
    columns: int
    captions: bool


@dataclass(frozen=True)
class Submission(Section):
    PATH = ("submission",)
    images: int
    min_aesthetic: float
    storyboard: Storyboard
    lora_formats: tuple
    license: str
    rules: str  # competition | none


@dataclass(frozen=True)
class Spec:
    """The whole validated spec, typed. ``datasets`` holds every training source; ``many_datasets`` says whether
    the spec wrote them as `datasets:` (a list) or as the one `dataset:`."""

    story: StoryInfo
    models: dict  # kolors | vae | aesthetic -> the reference as written
    datasets: tuple  # of Source
    many_datasets: bool
    filters: tuple  # of (Data-Juicer op name, params mapping), in order
    processing: Processing
    lora: LoRA
    train: Train
    style: Style
    generation: Generation
    scenes: tuple  # of Scene
    submission: Submission
    characters: dict  # id -> Character

    @classmethod
    def build(cls, d: dict) -> "Spec":
        """From the merged, defaulted, validated spec data."""
        many = isinstance(d.get("datasets"), list)
        sources = d["datasets"] if many else [d["dataset"]]
        sub = d["submission"]
        return cls(
            story=StoryInfo.build(d["story"]), models=dict(d["models"]),
            datasets=tuple(Source.build(s) for s in sources), many_datasets=many,
            filters=tuple(next(iter(op.items())) for op in d["filters"]),
            processing=Processing.build(d["processing"]), lora=LoRA.build(d["lora"]), train=Train.build(d["train"]),
            style=Style.build(d["style"]), generation=Generation.build(d["generation"]),
            scenes=tuple(Scene.build(s, index=i) for i, s in enumerate(d["scenes"])),
            submission=Submission.build(sub, storyboard=Storyboard.build(sub["storyboard"])),
            characters={k: Character.build(v) for k, v in d["characters"].items()})


def join_negative(style_neg: str, scene_neg: str) -> str:
    """The negative prompt of a scene: style negative, then the scene's own (joined with a Chinese comma)."""
    parts = [p for p in (style_neg.strip(), scene_neg.strip()) if p]
    return "，".join(parts)


def refine_for(spec, scene) -> dict | None:
    """The refine settings of ``scene`` (None: not refined): generation.refine with the scene's own settings over
    it; a scene may refine on its own (its settings over the schema's defaults). cfg_scale resolved."""
    from .schema import resolve

    if scene.refine is False:
        return None
    base = plain(spec.generation.refine)
    if isinstance(scene.refine, dict):
        props = resolve({"$ref": "#/$defs/refine"})["properties"]
        defaults = {k: v.get("default") for k, v in props.items()} if base is None else base
        base = {**defaults, **{k: v for k, v in plain(scene.refine).items() if v is not None}}
    if base is None:
        return None
    return {**base, "cfg_scale": base["cfg_scale"] if base["cfg_scale"] is not None else spec.generation.cfg_scale}



def select_text(how) -> str:
    """``train.select`` in words: `last`, `best_score`, or its weights."""
    if isinstance(how, dict):
        return "weights " + ", ".join(f"{k} x {w:g}" for k, w in how.get("weights", {}).items())
    return str(how)


SPLICE = r"\{([a-z0-9][a-z0-9-]*)\}"  # `{girl}` in a prompt: the character's description
# models.<name> that measure human preference through DiffSynth's ImageQualityMetric (storyc.models.preference)
PREFERENCE = ("pickscore", "hpsv2", "hpsv2_1", "imagereward", "mps")


def splice(text: str, characters: dict) -> str:
    """``text`` with each `{id}` of a declared character replaced by its description (other braces stay)."""
    import re

    return re.sub(SPLICE, lambda m: characters[m.group(1)].description if m.group(1) in characters else m.group(0),
                  text)


def micro_batches(epochs: int, steps_per_epoch: int, batch_size: int) -> int:
    """Batches over the whole run, as diffsynth counts them (steps_per_epoch samples per epoch)."""
    return epochs * -(-steps_per_epoch // batch_size)


def optimizer_steps(micro: int, accumulate: int, world: int) -> int:
    """Optimizer steps of a run of ``micro`` batches on ``world`` ranks (each takes every world-th batch)."""
    return max(1, -(-micro // world) // accumulate)


@dataclass(frozen=True)
class ModelRef:
    """A model location: a local folder, ``modelscope:<id>`` or ``tiny:<name>``."""

    raw: str
    scheme: str  # local | modelscope | tiny
    path: Path | None  # resolved local folder (for tiny: where it is built)
    name: str = ""  # modelscope id or tiny name


@dataclass(frozen=True)
class Story:
    spec_path: Path  # the top spec file (absolute)
    root: Path  # project folder: paths may not escape it
    files: tuple  # the spec files read, top first (the `extends` chain)
    spec: Spec  # the validated spec, typed
    resolved: dict  # the same, merged and defaulted as plain data: written to spec.resolved.json, read by no stage
    models: dict  # kolors | vae | aesthetic -> ModelRef
    dataset_paths: tuple  # per training source: its local path resolved, None for ModelScope
    warnings: tuple = ()
    character_paths: dict = field(default_factory=dict)  # character id -> its reference images, resolved
    mask_paths: tuple = ()  # per training source: its masks folder resolved (None: none, or `alpha`)
    caption_paths: tuple = ()  # per training source: its recaption file resolved (None: no recaption)
    validation_path: Path | None = None  # train.validation.folder resolved

    @property
    def id(self) -> str:
        return self.spec.story.id

    @property
    def title(self) -> str:
        return self.spec.story.title or self.id

    @property
    def scenes(self) -> tuple:
        return self.spec.scenes

    def rel(self, p: Path) -> str:
        """A path as written into artifacts: relative to the project folder, POSIX style."""
        try:
            return Path(p).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return Path(p).as_posix()
