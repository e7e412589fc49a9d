"""bundle: the competition submission folder, written whole and marked valid/invalid by the aesthetic gate.

submission/<story-id>/: LoRA file(s), images/ (the scene images in story order and nothing else: the folder the
competition's evaluate() scores), prompts.txt/.csv/.json, storyboard.png, scores.json, README.md, report.html
and manifest.json (sha256 of every file). Written to a temporary folder and renamed.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from .. import png, reproduce
from ..errors import StorycError
from ..fonts import find_font
from ..lock import sha256_file
from ..model import PREFERENCE
from ..render import canonical_json, csv_cell, link_or_copy, render
from ..report import checkpoints_html, font_face, loss_svg, report_html
from ..submission import Gate, display_name, files, read_json
from .registry import Result
from .score import character_consistency, coherence, style_distance

CONFIGURATION = {"framework": "Pytorch", "task": "text-to-image-synthesis"}
FORMAT_USE = {
    "diffsynth": "DiffSynth-Studio (the competition notebook's `load_lora`, peft keys)",
    "kohya": "ComfyUI's LoRA loader and the WebUIs (kohya `lora_unet_` keys)",
    "diffusers": "diffusers: `KolorsPipeline.load_lora_weights(folder, weight_name=...)`",
}


def cjk_font(size: int):
    """(PIL font, its name or None): storyc.fonts decides which font (STORYC_FONT, the packaged Noto CJK, system)."""
    from PIL import ImageFont

    from ..fonts import find_font

    f = find_font()
    if f is None:
        return ImageFont.load_default(size=size), None
    # BASIC layout: the same pixels whether or not this Pillow has libraqm (which also rejects some odd strings)
    return ImageFont.truetype(str(f.path), size, index=f.index, layout_engine=ImageFont.Layout.BASIC), f.name


BOARD_CELL = 1024


def storyboard(images, captions, columns: int, draw_captions: bool):
    """Grid in story order; each image keeps its aspect ratio inside its cell; captions under each image."""
    from PIL import Image, ImageDraw

    n = len(images)
    rows = -(-n // columns)
    cw = min(max(im.width for im in images), BOARD_CELL)  # refined 2048-px images: the board keeps 1024-px cells
    ch = min(max(im.height for im in images), BOARD_CELL)
    font, font_path = cjk_font(max(12, cw // 24))
    cap_h = (font.size * 2 + 8) if draw_captions and any(captions) else 0
    board = Image.new("RGB", (cw * columns, (ch + cap_h) * rows), "white")
    draw = ImageDraw.Draw(board)
    for i, (im, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, columns)
        scale = min(cw / im.width, ch / im.height)
        w, h = round(im.width * scale), round(im.height * scale)
        x0, y0 = c * cw, r * (ch + cap_h)
        board.paste(im.resize((w, h)) if (w, h) != im.size else im, (x0 + (cw - w) // 2, y0 + (ch - h) // 2))
        if cap_h and cap:
            text = _fit(draw, cap, font, cw - 8)
            tw = draw.textlength(text, font=font)
            draw.text((x0 + (cw - tw) / 2, y0 + ch + 4), text, fill="black", font=font)
    return board, font_path


def _fit(draw, text, font, width):
    """The caption on one line (a `caption: |` block's line breaks become spaces), cut with … to ``width``: the
    longest prefix that fits, found by bisection (log n measurements, not one per dropped character)."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "…", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…" if lo else ""


def run(ctx, jobs):
    job, = jobs
    p = job.params
    sid = p["story"]["id"]
    scenes = [{**s, "caption": cap} for s, cap in zip(p["scenes"], p["captions"])]
    train_entry = ctx.upstream("train")
    if train_entry is None:
        raise StorycError("stage bundle: the train stage has no record in the lock", "run the train stage first")
    lora_cfg = train_entry.params["lora"]
    final = ctx.path(f"submission/{sid}")
    tmp = final.with_name(f".{sid}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        m = _write_bundle(ctx, p, tmp, scenes, lora_cfg)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed bundle (disk full, Ctrl-C) leaves no partial folder
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    outputs = [f"submission/{sid}/{rel}" for rel in files(final)]
    yield Result("bundle", outputs, {"valid": m.valid, "mean_aesthetic": round(m.mean, 6),
                                     "min_aesthetic": p["submission"]["min_aesthetic"],
                                     "weakest": m.weakest, "style_coherence": round(m.coherence, 6),
                                     "style_distance": round(m.style_distance, 6),
                                     "prompt_alignment": None if m.alignment is None else round(m.alignment, 6),
                                     "character_consistency": None if m.characters is None
                                     else round(m.characters["mean"], 6),
                                     "character_dreamsim": None if (m.characters or {}).get("dreamsim") is None
                                     else round(m.characters["dreamsim"]["mean"], 6),
                                     **{k: None if v is None else round(v, 6) for k, v in m.preference.items()},
                                     "font": m.font})
    align = "not measured" if m.alignment is None else f"{m.alignment:.3f}"
    chars = "" if m.characters is None else f", character consistency {m.characters['mean']:.3f}"
    chars += "".join(f", {k} {v:.3f}" for k, v in m.preference.items() if v is not None)
    return (f"mean aesthetic {m.mean:.3f} ({'valid' if m.valid else 'INVALID'}), style coherence {m.coherence:.3f}, "
            f"style distance {m.style_distance:.3f}, prompt alignment {align}{chars}")


PREFERENCE_WHAT = ("human-preference models through DiffSynth-Studio's ImageQualityMetric, each image against its "
                   "own prompt (models.pickscore, models.hpsv2, models.hpsv2_1, models.imagereward, models.mps); they read "
                   "English prompts")


class Measured(NamedTuple):
    mean: float
    valid: bool
    coherence: float
    style_distance: float
    alignment: float | None
    characters: dict | None
    preference: dict  # metric -> the mean over the images, None: not measured
    weakest: list
    font: str | None


def _write_bundle(ctx, p: dict, tmp: Path, scenes: list, lora_cfg: dict):
    """Every file of the submission into ``tmp``; returns what was measured."""
    from PIL import Image

    story, sub = p["story"], p["submission"]
    sid = story["id"]

    # LoRA files
    lora_names = [f"{sid}.{f}.safetensors" for f in sub["lora_formats"]]
    linked = {}  # submission file -> the build output it links: its hash is known (the fingerprint cache)
    for n in lora_names:  # linked, not copied: the same bytes
        linked[n] = ctx.output("train", n)
        link_or_copy(linked[n], tmp / n)
    # images, prompt records (what generate rendered; captions from this stage's own slice), scores
    recs, scores, embeds, styles, aligned, prefs, sims = [], [], [], [], [], [], []
    (tmp / "images").mkdir()
    for s in scenes:
        last = f"refine[{s['id']}]" if f"refine[{s['id']}]" in ctx.plan.stages else f"generate[{s['id']}]"
        rec = json.loads(ctx.output(last, ".json").read_text("utf-8"))  # what the scene's last stage rendered
        sc = json.loads(ctx.output(f"score[{s['id']}]", ".json").read_text("utf-8"))
        name = f"images/{Path(s['file']).name}"
        linked[name] = ctx.output(last, ".png")
        link_or_copy(linked[name], tmp / name)
        recs.append({**rec, "file": name, "caption": s["caption"]})
        scores.append(sc["score"])
        embeds.append(sc["clip_embedding"])
        styles.append(sc["style"])
        aligned.append(sc["prompt_alignment"])
        prefs.append(sc.get("preference") or {})
        sims.append(sc.get("dreamsim_embedding"))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PNG decoding releases the GIL
        imgs = list(pool.map(lambda r: Image.open(tmp / r["file"]).convert("RGB"), recs))
    (tmp / "prompts.json").write_text(canonical_json({"format": "storyc.prompts/1", "scenes": recs}), "utf-8")
    (tmp / "prompts.txt").write_text("".join(
        f"{i + 1}. {r['file']}\nprompt: {r['prompt']}\nnegative prompt: {r['negative_prompt']}\nseed: {r['seed']}\n\n"
        for i, r in enumerate(recs)), "utf-8")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["scene", "file", "prompt", "negative_prompt", "seed", "caption"])
    for r in recs:
        w.writerow([csv_cell(v) for v in (r["scene"], r["file"], r["prompt"], r["negative_prompt"], r["seed"],
                                          r["caption"])])
    (tmp / "prompts.csv").write_text(buf.getvalue(), encoding="utf-8-sig")

    board, font = storyboard(imgs, [s["caption"] for s in scenes], sub["storyboard"]["columns"],
                             sub["storyboard"]["captions"])
    # the bundle's largest cost: deflated on every core (storyc.png), zlib level 1 (bench/RESULTS.md)
    (tmp / "storyboard.png").write_bytes(png.encode(board, level=1))
    drawn = any(s["caption"] for s in scenes) and sub["storyboard"]["captions"]
    if font is None and drawn:
        ctx.report.line("warning: no CJK font found; storyboard captions will not show Chinese (the "
                        "noto-cjk-sans-otc package of storyc's install is missing: reinstall, or set STORYC_FONT)")

    g = Gate.of(scores, sub["min_aesthetic"])
    mean, gate, valid = g.mean, g.minimum, g.valid
    coh, odd = coherence(embeds)
    dist, far = style_distance(styles)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    weakest = [[scenes[i]["id"], round(scores[i], 4)] for i in order[:3]]
    align = None if None in aligned else sum(aligned) / len(aligned)  # a metric never guessed: null = not measured
    chars = character_consistency([[c["id"] for c in r.get("characters", ())] for r in recs], embeds, sims)
    pref = {k: None for k in PREFERENCE}  # each mean over all the images, or null: not measured (never 0)
    for k in PREFERENCE:
        if all(k in pr for pr in prefs):
            pref[k] = {"mean": sum(pr[k] for pr in prefs) / len(prefs),
                       "images": {recs[i]["file"]: prefs[i][k] for i in range(len(recs))}}
    score_doc = {"format": "storyc.scores/2", "images": {recs[i]["file"]: scores[i] for i in range(len(recs))},
                 "mean": mean, "min_aesthetic": gate, "valid": valid, "weakest": weakest,
                 "style_coherence": {"mean_pairwise_cosine": coh, "least_coherent_scene": scenes[odd]["id"]},
                 "style_distance": {"mean_pairwise": dist, "farthest_scene": scenes[far]["id"],
                                    "what": "AdaIN style loss between middle-layer CLIP feature statistics; lower is "
                                            "more coherent"},
                 "prompt_alignment": None if align is None else {
                     "mean": align, "images": {recs[i]["file"]: aligned[i] for i in range(len(recs))},
                     "what": "Chinese CLIP cosine of each image and its own prompt (models.clip_zh)"},
                 "character_consistency": chars,
                 "preference": {**pref, "what": PREFERENCE_WHAT}}
    (tmp / "scores.json").write_text(canonical_json(score_doc), "utf-8")

    first = recs[0]
    gen = {k: first[k] for k in ("width", "height", "steps", "cfg_scale", "lora_scale")}
    gen["lora_alpha"] = lora_cfg["alpha"] * gen["lora_scale"]
    filt = read_json(ctx.output("filter", "filter_report.json"))
    train = read_json(ctx.output("train", "train_report.json"))
    from .. import __version__

    title = story.get("title") or sid
    rp = reproduce.plan(ctx.story, ctx.opts.lock_for(ctx.story))
    front = {"frameworks": ["Pytorch"], "license": sub["license"], "tasks": ["text-to-image-synthesis"],
             "base_model": ["Kwai-Kolors/Kolors"], "base_model_relation": "adapter",
             "tags": ["LoRA", "Kolors", "text-to-image", "storyc", sid]}
    ctxd = dict(story=story, front_matter=front, title=title, scenes=scenes, recs=recs, scores=scores, mean=mean,
                gate=gate, valid=valid, coherence=coh, odd=scenes[odd]["id"], lora_names=lora_names,
                style_distance=dist, farthest=scenes[far]["id"], alignment=align, aligned=aligned, characters=chars,
                preference=pref, prefs=prefs,
                spec=ctx.story.rel(ctx.story.spec_path), lora=lora_cfg, gen=gen, filt=filt, train=train,
                steps=rp.steps, notes=rp.notes, files=len(ctx.story.files) + 1,
                datasets=rp.datasets_included,
                license=sub["license"], display_name=display_name(story), storyc_version=__version__,
                storyc_commit=reproduce.storyc_commit(),
                formats={f"{sid}.{f}.safetensors": FORMAT_USE[f] for f in sub["lora_formats"]})
    (tmp / "README.md").write_text(render("submission_readme.md.j2", **ctxd), "utf-8")
    # what DiffSynth-Studio's own upload writes into a model folder before pushing it to ModelScope
    (tmp / "configuration.json").write_text(canonical_json(CONFIGURATION), "utf-8")
    ctxd["loss_svg"] = loss_svg(ctx.output("train", "train_log.csv"))
    ctxd["checkpoints_html"] = checkpoints_html(ctx.path("lora"))
    page = report_html(ctxd)
    ctxd["font_face"] = font_face(page, find_font(), ctx.cache_dir)
    if ctxd["font_face"]:  # the page with its own font: Chinese shows without system CJK fonts
        page = report_html(ctxd)
    (tmp / "report.html").write_text(page, "utf-8")
    manifest = {"format": "storyc.manifest/2", "story": sid, "valid": valid,
                "files": {f: {"sha256": ctx.hasher.file(linked[f]) if f in linked else sha256_file(tmp / f),
                              "size": (tmp / f).stat().st_size} for f in files(tmp)}}
    (tmp / "manifest.json").write_text(canonical_json(manifest), "utf-8")
    return Measured(mean, valid, coh, dist, align, chars, {k: v and v["mean"] for k, v in pref.items()}, weakest,
                    font if drawn else None)
