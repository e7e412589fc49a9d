"""Story previews during training (train.preview_every) and the checkpoint choice (train.select).

Every N optimizer steps and at the end, the story's own scenes are rendered with the LoRA being trained (the
training UNet itself, at the generation's LoRA strength; EMA weights when train.ema is on), scored with the
competition's aesthetic predictor and the style-coherence figure, and the checkpoint's LoRA and a preview strip
are kept. Prompt embeddings come from a table encoded before training: ChatGLM is never on the GPU with the UNet.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning as L
import torch

from ... import lora as lora_mod
from ...model import PREFERENCE
from ...render import atomic_write, canonical_json
from ...report import CHECKPOINT_FIGURES

STRIP_HEIGHT = 128  # preview strip thumbnails: one row of the story, small enough to embed in report.html


class StoryPreviews(L.Callback):
    def __init__(self, preview: dict, every: int, total: int, table: dict, kolors: Path, aesthetic: Path,
                 folder: Path, report, ip_adapter: Path | None = None, root: Path | None = None,
                 measures: dict | None = None):
        self.p, self.every, self.total, self.table = preview, every, total, table
        self.kolors, self.aesthetic, self.folder, self.report = kolors, aesthetic, folder, report
        self.ip_adapter, self.root, self.measures = ip_adapter, root, measures or {}
        self.records = load_records(folder)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = int(trainer.global_step)
        if not trainer.is_global_zero or str(step) in self.records:
            return
        if step % self.every and step != self.total:
            return
        self.records[str(step)] = preview_checkpoint(module, step, self.p, self.table, self.kolors, self.aesthetic,
                                                     self.folder, self.ip_adapter, self.root, self.measures)
        atomic_write(self.folder / "records.json", canonical_json(self.records))
        r = self.records[str(step)]
        _log_to_tensorboard(trainer, step, self.folder / f"step-{step}.png", r)
        more = "".join(f", {label} {r[key]:.3f}" for key, label in CHECKPOINT_FIGURES.items() if key in r)
        self.report.info(f"     preview at step {step}: mean aesthetic {r['mean']:.3f}, coherence {r['coherence']:.3f}"
                         + more)


def _log_to_tensorboard(trainer, step: int, strip_png: Path, rec: dict) -> None:
    """The preview strip and its scores beside the loss curve (when train.tensorboard is on)."""
    exp = getattr(trainer.logger, "experiment", None) if trainer.logger else None
    if exp is None or not hasattr(exp, "add_image"):
        return
    import numpy as np
    from PIL import Image

    exp.add_image("preview", np.asarray(Image.open(strip_png).convert("RGB")), step, dataformats="HWC")
    for name, key in FIGURES.items():
        if key in rec:
            exp.add_scalar(f"preview/{name}", rec[key], step)


def load_records(folder: Path) -> dict:
    try:
        return json.loads((folder / "records.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _preview_weights(module, strength: float):
    """The training UNet as generation would use the LoRA: eval mode, the generation's strength (alpha/rank x
    lora_scale) instead of the training scaling, EMA weights swapped in when train.ema is on."""
    from .callbacks import EMA

    unet = module.unet
    layers = [m for m in unet.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    scalings = [dict(m.scaling) for m in layers]
    ema = next((cb for cb in module.trainer.callbacks if isinstance(cb, EMA)), None)
    was_training = unet.training
    unet.eval()
    for m in layers:
        for k in m.scaling:
            m.scaling[k] = strength
    try:
        with ema.swapped(module) if ema is not None else contextlib.nullcontext():
            yield unet
    finally:
        for m, s in zip(layers, scalings):
            m.scaling.update(s)
        unet.train(was_training)


def preview_checkpoint(module, step: int, p: dict, table: dict, kolors: Path, aesthetic: Path, folder: Path,
                       ip_adapter: Path | None = None, root: Path | None = None, measures: dict | None = None) -> dict:
    """Render, score and keep one checkpoint: its LoRA (step-N.safetensors) and preview strip (step-N.png). Scenes
    that show characters are conditioned on their references through the IP-Adapter, as generation does, and the
    record then holds their character consistency. ``measures``: the models of the figures train.select also
    weighs (``clip_zh``: prompt alignment; ``preference``: {name: folder}), each a mean over the scenes, every
    image against its own prompt as the score stage measures it."""
    from ... import resources
    from ...models.kolors import load_pipeline
    from ..generate import cached_encoder, load_characters, render_iter
    from ..score import Scorer, character_consistency, coherence

    folder.mkdir(parents=True, exist_ok=True)
    lo = module.lora_cfg
    lora_mod.save(folder / f"step-{step}.safetensors", module.lora_state(), {"rank": lo.rank, "alpha": lo.alpha})
    dev = module.device
    dtype = next(q for q in module.unet.parameters() if not q.requires_grad).dtype
    items = [{"prompt": s["prompt"], "negative_prompt": s["negative_prompt"], "seed": s["seed"],
              **({"characters": s["characters"]} if s.get("characters") else {})} for s in p["scenes"]]
    gen = {k: p[k] for k in ("width", "height", "steps", "cfg_scale")}
    gen["guidance_interval"] = p.get("guidance_interval")
    autocast = torch.autocast("cuda", dtype=dtype) if dev.type == "cuda" else contextlib.nullcontext()
    with _preview_weights(module, p["lora_strength"]) as unet, autocast:
        pipe = load_pipeline(kolors, dtype, dev, text_encoder=False, unet=unet)
        if ip_adapter is not None:
            load_characters(ip_adapter, pipe, items, root)
        batch, _ = resources.plan_generate(resources.free_gib(str(dev)), "auto", gen["width"], gen["height"], len(items))
        images = list(render_iter(pipe, items, gen, batch, encode=cached_encoder(table)))
        del pipe
    scorer = Scorer(aesthetic, resources.for_score(str(dev)))
    scores, embeds = scorer.score_and_embed(images)
    del scorer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    coh, _ = coherence(embeds)
    shown = [[c["id"] for c in s.get("characters", ())] for s in p["scenes"]]
    measures = measures or {}
    chars = character_consistency(shown, embeds, _dreamsim(images, shown, measures.get("dreamsim"), str(dev)))
    more = _measure(images, [s["prompt"] for s in p["scenes"]], measures, resources.for_score(str(dev)).device)
    if chars and chars["dreamsim"]:
        more["character_dreamsim"] = round(chars["dreamsim"]["mean"], 6)
    strip(images).save(folder / f"step-{step}.png")
    return {"step": step, "mean": round(sum(scores) / len(scores), 6), "coherence": round(coh, 6),
            **({"characters": round(chars["mean"], 6)} if chars else {}), **more,
            "scores": {s["id"]: round(v, 6) for s, v in zip(p["scenes"], scores)}}


def _measure(images, prompts, measures: dict, device: str) -> dict:
    """The mean prompt alignment and preference scores of a checkpoint's previews (each model loaded for this
    preview and freed: the training UNet keeps the card between previews)."""
    out = {}
    if measures.get("clip_zh"):
        from ..score import Aligner

        out["alignment"] = _mean(Aligner(measures["clip_zh"], device).align(images, prompts))
    for name, folder in (measures.get("preference") or {}).items():
        from ...models.preference import Preference

        out[name] = _mean(Preference(name, folder, device).score(images, prompts))
    if out and device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def _dreamsim(images, shown: list, folder: Path | None, device: str) -> list | None:
    """Each preview's DreamSim embedding where it shows a character (None elsewhere), as the score stage embeds the
    built set; None without ``folder`` (train.select does not weigh character_dreamsim)."""
    if folder is None or not any(shown):
        return None
    from ... import resources
    from ...models.dreamsim import DreamSim

    model = DreamSim(folder, resources.for_score(device).device)
    embeds = model.embed_shown(images, shown)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the training UNet keeps the card between previews
    return embeds


def _mean(values) -> float:
    return round(sum(values) / len(values), 6)


def strip(images):
    """The story's images side by side, each scaled to STRIP_HEIGHT."""
    from PIL import Image

    thumbs = [im.resize((max(1, round(im.width * STRIP_HEIGHT / im.height)), STRIP_HEIGHT)) for im in images]
    out = Image.new("RGB", (sum(t.width for t in thumbs), STRIP_HEIGHT), "white")
    x = 0
    for t in thumbs:
        out.paste(t, (x, 0))
        x += t.width
    return out


# objective name -> a preview record's key
FIGURES = {"mean_aesthetic": "mean", "style_coherence": "coherence", "character_consistency": "characters",
           "character_dreamsim": "character_dreamsim", "prompt_alignment": "alignment", **{k: k for k in PREFERENCE}}


def objective(record: dict, how) -> float | None:
    """A checkpoint's objective under ``train.select`` (None for `last`, which ranks nothing)."""
    if how == "best_score":
        return record["mean"]
    if isinstance(how, dict):
        return sum(w * record[FIGURES[k]] for k, w in how["weights"].items())
    return None


def select(records: dict, how) -> int:
    """The checkpoint the story uses: the last, or the best mean aesthetic, or the best weighted objective of the
    previews' figures (a tie goes to the later step)."""
    steps = sorted(int(s) for s in records)
    if how == "last":
        return steps[-1]
    return max(steps, key=lambda s: (objective(records[str(s)], how), s))
