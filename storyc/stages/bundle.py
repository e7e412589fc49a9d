"""bundle: the competition submission folder, written whole and marked valid/invalid by the aesthetic gate.

submission/<story-id>/: LoRA file(s), the images in story order, prompts.txt/.csv, storyboard.png, scores.json,
README.md, report.html and manifest.json (sha256 of every file). Written to a temporary folder and renamed.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import os
import shutil
from pathlib import Path

from ..errors import StorycError
from ..render import canonical_json, csv_cell, render
from .registry import Result
from .score import coherence

FONT_CANDIDATES = [
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc", "C:/Windows/Fonts/msyh.ttc",
]


def cjk_font(size: int):
    from PIL import ImageFont

    for p in [os.environ.get("STORYC_FONT", ""), *FONT_CANDIDATES]:
        if p and Path(p).is_file():
            return ImageFont.truetype(p, size), p
    return ImageFont.load_default(size=size), None


def storyboard(images, captions, columns: int, draw_captions: bool):
    """Grid in story order; each image keeps its aspect ratio inside its cell; captions under each image."""
    from PIL import Image, ImageDraw

    n = len(images)
    rows = -(-n // columns)
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
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
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text


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
        mean, valid, coh, weakest = _write_bundle(ctx, p, tmp, scenes, lora_cfg)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed bundle (disk full, Ctrl-C) leaves no partial folder
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    outputs = [f"submission/{sid}/{f}" for f in sorted(p.name for p in final.iterdir())]
    yield Result("bundle", outputs, {"valid": valid, "mean_aesthetic": round(mean, 6),
                                     "min_aesthetic": p["submission"]["min_aesthetic"],
                                     "weakest": weakest, "style_coherence": round(coh, 6)})
    return f"mean aesthetic {mean:.3f} ({'valid' if valid else 'INVALID'}), style coherence {coh:.3f}"


def _write_bundle(ctx, p: dict, tmp: Path, scenes: list, lora_cfg: dict):
    """Every file of the submission into ``tmp``; returns (mean, valid, coherence, weakest)."""
    from PIL import Image

    story, sub = p["story"], p["submission"]
    sid = story["id"]

    # LoRA files
    lora_names = [f"{sid}.{f}.safetensors" for f in sub["lora_formats"]]
    for n in lora_names:
        shutil.copyfile(ctx.path(f"lora/{n}"), tmp / n)
    # images, prompt records (what generate rendered; captions from this stage's own slice), scores
    recs, scores, embeds, imgs = [], [], [], []
    for s in scenes:
        rec = json.loads(ctx.path(str(Path(s["file"]).with_suffix(".json"))).read_text("utf-8"))
        sc = json.loads(ctx.path(f"scores/{Path(s['file']).stem}.json").read_text("utf-8"))
        name = Path(s["file"]).name
        shutil.copyfile(ctx.path(s["file"]), tmp / name)
        recs.append({**rec, "file": name, "caption": s["caption"]})
        scores.append(sc["score"])
        embeds.append(sc["clip_embedding"])
        imgs.append(Image.open(tmp / name).convert("RGB"))
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
    board.save(tmp / "storyboard.png")
    if font is None and any(s["caption"] for s in scenes) and sub["storyboard"]["captions"]:
        ctx.report.line("warning: no CJK font found; storyboard captions may not show Chinese "
                        "(install fonts-wqy-microhei or set STORYC_FONT)")

    mean = sum(scores) / len(scores)
    gate = sub["min_aesthetic"]
    valid = mean >= gate
    coh, odd = coherence(embeds)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    weakest = [[scenes[i]["id"], round(scores[i], 4)] for i in order[:3]]
    score_doc = {"format": "storyc.scores/1", "images": {recs[i]["file"]: scores[i] for i in range(len(recs))},
                 "mean": mean, "min_aesthetic": gate, "valid": valid, "weakest": weakest,
                 "style_coherence": {"mean_pairwise_cosine": coh, "least_coherent_scene": scenes[odd]["id"]}}
    (tmp / "scores.json").write_text(canonical_json(score_doc), "utf-8")

    first = recs[0]
    gen = {k: first[k] for k in ("width", "height", "steps", "cfg_scale", "lora_scale")}
    gen["lora_alpha"] = lora_cfg["alpha"] * gen["lora_scale"]
    filt = _read_json(ctx.path("data/filter_report.json"))
    train = _read_json(ctx.path("lora/train_report.json"))
    ctxd = dict(story=story, title=story.get("title") or sid, scenes=scenes, recs=recs, scores=scores, mean=mean,
                gate=gate, valid=valid, coherence=coh, odd=scenes[odd]["id"], lora_names=lora_names,
                spec=ctx.story.rel(ctx.story.spec_path), lora=lora_cfg, gen=gen, filt=filt, train=train)
    (tmp / "README.md").write_text(render("submission_readme.md.j2", **ctxd), "utf-8")
    (tmp / "report.html").write_text(_report_html(ctxd, tmp), "utf-8")
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    manifest = {"format": "storyc.manifest/1", "story": sid, "valid": valid,
                "files": {f: {"sha256": _sha(tmp / f), "size": (tmp / f).stat().st_size} for f in files}}
    (tmp / "manifest.json").write_text(canonical_json(manifest), "utf-8")
    return mean, valid, coh, weakest


def verdict(ctx, job, entry) -> tuple[int, list]:
    """The submission's verdict, recomputed from the per-scene score files (whose bytes the lock's score entries
    vouch for) and the gate in this stage's slice: never taken from a `valid` flag someone could edit."""
    folder = ctx.story.rel(ctx.path(f"submission/{job.params['story']['id']}"))
    gate = job.params["submission"]["min_aesthetic"]
    scores = {}
    for s in job.params["scenes"]:
        doc = _read_json(ctx.path(f"scores/{Path(s['file']).stem}.json"))
        if not isinstance(doc, dict) or not isinstance(doc.get("score"), (int, float)):
            return 1, [f"error: no score for scene {s['id']}: rebuild with `storyc build`"]
        scores[s["id"]] = float(doc["score"])
    mean = sum(scores.values()) / len(scores)
    if mean >= gate:
        return 0, [f"submission VALID: mean aesthetic {mean:.3f} >= {gate:g} -> {folder}/"]
    weakest = ", ".join(f"{s} ({v:.2f})" for s, v in sorted(scores.items(), key=lambda kv: kv[1])[:3])
    return 3, [f"error: submission INVALID: mean aesthetic {mean:.3f} < {gate:g} (weakest: {weakest}); "
               f"the bundle is written to {folder}/ and marked invalid",
               "hint: rework the weakest scenes (prompt, seed, or generation.candidates) and build again"]


def _read_json(p: Path):
    try:
        return json.loads(p.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _report_html(c: dict, folder: Path) -> str:
    def img64(name):
        return "data:image/png;base64," + base64.b64encode((folder / name).read_bytes()).decode()

    e = html.escape
    rows = "".join(
        f"<tr><td>{i + 1}</td><td><img src='{img64(r['file'])}' width='256'></td><td><b>{e(r['scene'])}</b><br>"
        f"{e(r['prompt'])}<br><i>negative:</i> {e(r['negative_prompt'])}<br>{e(r.get('caption', ''))}</td>"
        f"<td>{r['seed']}</td><td>{c['scores'][i]:.3f}</td></tr>" for i, r in enumerate(c["recs"]))
    filt = c["filt"] or {}
    frows = "".join(f"<tr><td>{e(o['op'])}</td><td>{o['in']}</td><td>{o['kept']}</td></tr>" for o in filt.get("ops", []))
    tr = c["train"] or {}
    verdict = "VALID" if c["valid"] else "INVALID"
    return f"""<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><title>{e(c['title'])} - storyc report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}}.valid{{color:green}}.invalid{{color:#b00}}</style></head><body>
<h1>{e(c['title'])}</h1>
<p id="verdict" class="{verdict.lower()}">Mean aesthetic score {c['mean']:.3f} (gate {c['gate']:g}): <b>{verdict}</b>.
Style coherence (mean pairwise CLIP cosine) {c['coherence']:.3f}; least like the others: {e(c['odd'])}.</p>
<h2>Storyboard</h2><img id="storyboard" src="{img64('storyboard.png')}" style="max-width:100%">
<h2>Scenes</h2><table><tr><th>#</th><th>image</th><th>prompt</th><th>seed</th><th>score</th></tr>{rows}</table>
<h2>Data</h2><p>{filt.get('input', '?')} images in, {filt.get('kept', '?')} kept.</p>
<table><tr><th>op</th><th>in</th><th>kept</th></tr>{frows}</table>
<h2>Training</h2><p>{tr.get('steps', '?')} steps, final loss {tr.get('final_loss', float('nan')):.4f}, LoRA rank {c['lora']['rank']}
alpha {c['lora']['alpha']:g}, on {e(str(tr.get('device', '?')))} ({e(str(tr.get('precision', '?')))}).</p>
</body></html>
"""


def check_submission(plan) -> tuple[Path, float]:
    """The submission folder exactly as the up-to-date bundle wrote it, and its recomputed mean score; raise a
    clear error when anything was edited, is stale or is below the gate."""
    from ..options import RunOptions
    from ..runner import decide

    story = plan.story
    folder = plan.build_dir / "submission" / story.id
    manifest = _read_json(folder / "manifest.json")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise StorycError(f"no bundle at {story.rel(folder)}", f"run `storyc build {story.rel(story.spec_path)}` first")
    stale = [d for d in decide(plan, None, RunOptions()) if d.stale]
    if stale:
        raise StorycError(f"the bundle is not up to date with {story.spec_path.name} ({stale[0].name}: "
                          f"{'; '.join(stale[0].reasons)})", f"run `storyc build {story.rel(story.spec_path)}` first")
    on_disk = {p.name for p in folder.iterdir() if p.is_file()} - {"manifest.json"}
    if on_disk != set(manifest["files"]):
        raise StorycError(f"{story.rel(folder)} holds other files than its manifest lists "
                          f"({', '.join(sorted(on_disk ^ set(manifest['files'])))})",
                          "rebuild the bundle: storyc build --force bundle")
    for name, rec in sorted(manifest["files"].items()):
        if not isinstance(rec, dict) or _sha(folder / name) != rec.get("sha256"):
            raise StorycError(f"{story.rel(folder / name)} was modified after the build (its sha256 differs from "
                              "the manifest)", "rebuild the bundle: storyc build --force bundle")
    scores = _read_json(folder / "scores.json") or {}
    values = list((scores.get("images") or {}).values())
    if not values or not all(isinstance(v, (int, float)) for v in values):
        raise StorycError(f"{story.rel(folder)}/scores.json has no scores", "rebuild the bundle")
    mean = sum(values) / len(values)
    gate = story.data["submission"]["min_aesthetic"]
    if mean < gate:
        raise StorycError(f"the submission is invalid: mean aesthetic {mean:.3f} < {gate:g}; refusing to publish",
                          "rework the weakest scenes and build again")
    return folder, mean


def publish(plan, model_id: str) -> int:
    """Upload the bundle's LoRA and README to ModelScope with modelscope's own hub client."""
    import socket

    from ..rules import modelscope_id_problem

    if modelscope_id_problem(model_id):
        raise StorycError(f"--model-id `{model_id}`: {modelscope_id_problem(model_id)}", "e.g. --model-id my-team/story")
    story = plan.story
    folder, _ = check_submission(plan)
    token = os.environ.get("MODELSCOPE_API_TOKEN")
    if not token:
        raise StorycError("MODELSCOPE_API_TOKEN is not set", "export your ModelScope access token in that variable")
    try:
        socket.create_connection(("www.modelscope.cn", 443), timeout=5).close()
    except OSError:
        raise StorycError("cannot reach ModelScope (no network)", "publish from a machine with network access") from None
    from modelscope.hub.api import HubApi

    api = HubApi()
    api.login(token)
    stage = plan.build_dir / "publish"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in folder.iterdir():
        if f.name.endswith(".safetensors") or f.name == "README.md":
            shutil.copyfile(f, stage / f.name)
    api.push_model(model_id=model_id, model_dir=str(stage))
    print(f"published {story.id} to {model_id}")
    return 0
