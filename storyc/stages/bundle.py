"""bundle: the competition submission folder, written whole and marked valid/invalid by the aesthetic gate.

submission/<story-id>/: LoRA file(s), images/ (the scene images in story order and nothing else: the folder the
competition's evaluate() scores), prompts.txt/.csv/.json, storyboard.png, scores.json, README.md, report.html
and manifest.json (sha256 of every file). Written to a temporary folder and renamed.
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

CONFIGURATION = {"framework": "Pytorch", "task": "text-to-image-synthesis"}
FORMAT_USE = {
    "diffsynth": "DiffSynth-Studio (the competition notebook's `load_lora`, peft keys)",
    "kohya": "ComfyUI's LoRA loader and the WebUIs (kohya `lora_unet_` keys)",
    "diffusers": "diffusers: `KolorsPipeline.load_lora_weights(folder, weight_name=...)`",
}


def display_name(story: dict) -> str:
    """The model's name by the competition's rule: `<team>-可图Kolors训练-<title>`."""
    from ..rules import COMPETITION_NAME

    return COMPETITION_NAME.format(team=story.get("team") or "<team>", rest=story.get("title") or story["id"])


def storyc_commit() -> str | None:
    """The git commit of the storyc checkout that built this (None for an installed release)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "storyc"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip()[:12] + ("+modified" if dirty.stdout.strip() else "")


def cjk_font(size: int):
    """(PIL font, its name or None): storyc.fonts decides which font (STORYC_FONT, the packaged Noto CJK, system)."""
    from PIL import ImageFont

    from ..fonts import find_font

    f = find_font()
    if f is None:
        return ImageFont.load_default(size=size), None
    # BASIC layout: the same pixels whether or not this Pillow has libraqm (which also rejects some odd strings)
    return ImageFont.truetype(str(f.path), size, index=f.index, layout_engine=ImageFont.Layout.BASIC), f.name


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
        mean, valid, coh, weakest, font = _write_bundle(ctx, p, tmp, scenes, lora_cfg)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed bundle (disk full, Ctrl-C) leaves no partial folder
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    outputs = [f"submission/{sid}/{rel}" for rel in _files(final)]
    yield Result("bundle", outputs, {"valid": valid, "mean_aesthetic": round(mean, 6),
                                     "min_aesthetic": p["submission"]["min_aesthetic"],
                                     "weakest": weakest, "style_coherence": round(coh, 6), "font": font})
    return f"mean aesthetic {mean:.3f} ({'valid' if valid else 'INVALID'}), style coherence {coh:.3f}"


def _write_bundle(ctx, p: dict, tmp: Path, scenes: list, lora_cfg: dict):
    """Every file of the submission into ``tmp``; returns (mean, valid, coherence, weakest, font name)."""
    from PIL import Image

    story, sub = p["story"], p["submission"]
    sid = story["id"]

    # LoRA files
    lora_names = [f"{sid}.{f}.safetensors" for f in sub["lora_formats"]]
    for n in lora_names:
        shutil.copyfile(ctx.path(f"lora/{n}"), tmp / n)
    # images, prompt records (what generate rendered; captions from this stage's own slice), scores
    recs, scores, embeds, imgs = [], [], [], []
    (tmp / "images").mkdir()
    for s in scenes:
        rec = json.loads(ctx.path(str(Path(s["file"]).with_suffix(".json"))).read_text("utf-8"))
        sc = json.loads(ctx.path(f"scores/{Path(s['file']).stem}.json").read_text("utf-8"))
        name = f"images/{Path(s['file']).name}"
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
    drawn = any(s["caption"] for s in scenes) and sub["storyboard"]["captions"]
    if font is None and drawn:
        ctx.report.line("warning: no CJK font found; storyboard captions will not show Chinese (the "
                        "noto-cjk-sans-otc package of storyc's install is missing: reinstall, or set STORYC_FONT)")

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
    from .. import __version__

    title = story.get("title") or sid
    front = {"frameworks": ["Pytorch"], "license": sub["license"], "tasks": ["text-to-image-synthesis"],
             "base_model": ["Kwai-Kolors/Kolors"], "base_model_relation": "adapter",
             "tags": ["LoRA", "Kolors", "text-to-image", "storyc", sid]}
    ctxd = dict(story=story, front_matter=front, title=title, scenes=scenes, recs=recs, scores=scores, mean=mean,
                gate=gate, valid=valid, coherence=coh, odd=scenes[odd]["id"], lora_names=lora_names,
                spec=ctx.story.rel(ctx.story.spec_path), lora=lora_cfg, gen=gen, filt=filt, train=train,
                license=sub["license"], display_name=display_name(story), storyc_version=__version__,
                storyc_commit=storyc_commit(),
                formats={f"{sid}.{f}.safetensors": FORMAT_USE[f] for f in sub["lora_formats"]})
    (tmp / "README.md").write_text(render("submission_readme.md.j2", **ctxd), "utf-8")
    # what DiffSynth-Studio's own upload writes into a model folder before pushing it to ModelScope
    (tmp / "configuration.json").write_text(canonical_json(CONFIGURATION), "utf-8")
    ctxd["loss_svg"] = _loss_svg(ctx.path("lora/train_log.csv"))
    ctxd["checkpoints_html"] = _checkpoints_html(ctx.path("lora"))
    (tmp / "report.html").write_text(_report_html(ctxd), "utf-8")
    manifest = {"format": "storyc.manifest/2", "story": sid, "valid": valid,
                "files": {f: {"sha256": _sha(tmp / f), "size": (tmp / f).stat().st_size} for f in _files(tmp)}}
    (tmp / "manifest.json").write_text(canonical_json(manifest), "utf-8")
    return mean, valid, coh, weakest, font if drawn else None


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a sorted relative posix path."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


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


def _loss_svg(log: Path, w: int = 640, h: int = 200) -> str:
    """The training loss per step as an inline SVG polyline (no plotting library)."""
    try:
        rows = [ln.split(",") for ln in log.read_text("utf-8").splitlines()[1:] if ln.strip()]
        pts = [(int(a), float(b)) for a, b in rows]
    except (OSError, ValueError):
        return ""
    pts = [(x, y) for x, y in pts if y == y]  # no NaN
    if len(pts) < 2:
        return ""
    x0, x1 = pts[0][0], pts[-1][0]
    y0, y1 = min(y for _, y in pts), max(y for _, y in pts)
    sx = (w - 20) / max(x1 - x0, 1)
    sy = (h - 20) / max(y1 - y0, 1e-12)
    line = " ".join(f"{10 + (x - x0) * sx:.1f},{h - 10 - (y - y0) * sy:.1f}" for x, y in pts)
    return (f'<figure id="loss"><svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" style="border:1px solid #ccc">'
            f'<polyline fill="none" stroke="#2a6fdb" stroke-width="1.5" points="{line}"/></svg>'
            f"<figcaption>loss per step ({pts[0][0]}-{pts[-1][0]}; {y0:.4f} to {y1:.4f})</figcaption></figure>")


def _checkpoints_html(lora: Path) -> str:
    """Each previewed checkpoint's strip (the story rendered with that checkpoint) and its scores."""
    doc = _read_json(lora / "checkpoints.json")
    if not isinstance(doc, dict):
        return ""
    rows = []
    for c in doc.get("checkpoints", []):
        strip = lora / "checkpoints" / f"step-{c['step']}.png"
        if not strip.is_file():
            continue
        src = "data:image/png;base64," + base64.b64encode(strip.read_bytes()).decode()
        chosen = " (used)" if c["step"] == doc.get("selected") else ""
        rows.append(f"<tr><td>{c['step']}{chosen}</td><td>{c['mean']:.3f}</td><td>{c['coherence']:.3f}</td>"
                    f"<td><img src='{src}' height='96'></td></tr>")
    return (f"<h3 id='checkpoints'>Checkpoints (train.select: {html.escape(str(doc.get('select')))})</h3><table>"
            "<tr><th>step</th><th>mean aesthetic</th><th>coherence</th><th>preview</th></tr>" + "".join(rows)
            + "</table>")


def _report_html(c: dict) -> str:
    """The report beside the images it shows: relative links, not a second (base64) copy of every PNG."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{i + 1}</td><td><img src='{e(r['file'])}' width='256'></td><td><b>{e(r['scene'])}</b><br>"
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
<h2>Storyboard</h2><img id="storyboard" src="storyboard.png" style="max-width:100%">
<h2>Scenes</h2><table><tr><th>#</th><th>image</th><th>prompt</th><th>seed</th><th>score</th></tr>{rows}</table>
<h2>Data</h2><p>{filt.get('input', '?')} images in, {filt.get('kept', '?')} kept.</p>
<table><tr><th>op</th><th>in</th><th>kept</th></tr>{frows}</table>
<h2>Training</h2><p>{tr.get('steps', '?')} steps, final loss {tr.get('final_loss', float('nan')):.4f}, LoRA rank {c['lora']['rank']}
alpha {c['lora']['alpha']:g}, on {e(str(tr.get('device', '?')))} ({e(str(tr.get('precision', '?')))}).</p>
{c.get('loss_svg', '')}
{c.get('checkpoints_html', '')}
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
    on_disk = set(_files(folder)) - {"manifest.json"}
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


PUBLISHED = ("README.md", "configuration.json", "storyboard.png", "prompts.txt", "scores.json")


def competition_name(story, display: str | None, dry_run: bool = False) -> str:
    """The model's display name, checked against the competition's rule `<team>-可图Kolors训练-<anything>`.
    A placeholder team stops an upload; a dry run only warns."""
    from ..rules import COMPETITION_NAME, PLACEHOLDER_TEAMS

    team = (story.data["story"].get("team") or "").strip()
    where = f"{story.rel(story.spec_path)}: story.team"
    if not team:
        raise StorycError(f"{where} is not set; the competition names the model `<team>-可图Kolors训练-<anything>`",
                          "add `team: <your team>` under `story:`")
    if team.lower() in PLACEHOLDER_TEAMS:
        if not dry_run:
            raise StorycError(f"{where} is still the placeholder `{team}`", "write your team's name there")
        print(f"warning: {where} is still the placeholder `{team}`; the upload will refuse it")
    name = display or display_name(story.data["story"])
    prefix = COMPETITION_NAME.format(team=team, rest="")
    if not name.startswith(prefix) or len(name) == len(prefix):
        raise StorycError(f"model name `{name}` does not follow the competition's rule "
                          f"`{prefix}<anything>`", f"e.g. --display-name '{prefix}{story.id}'")
    return name


def stage_upload(plan, model_id: str, display: str | None = None, dry_run: bool = False) -> tuple[Path, Path, str]:
    """Write the exact tree `storyc publish` uploads (build/<id>/publish/model/) and POST.md, the text of the
    competition's discussion post, beside it. Returns (tree, post, display name)."""
    from ..rules import modelscope_id_problem

    if modelscope_id_problem(model_id):
        raise StorycError(f"--model-id `{model_id}`: {modelscope_id_problem(model_id)}",
                          "e.g. --model-id my-team/purple-girl-story (ModelScope ids are ASCII; the Chinese "
                          "competition name is the model's display name)")
    story = plan.story
    folder, mean = check_submission(plan)
    name = competition_name(story, display, dry_run)
    manifest = _read_json(folder / "manifest.json")["files"]
    keep = [f for f in manifest if f in PUBLISHED or f.endswith(".safetensors") or f.startswith("images/")]
    out = plan.build_dir / "publish"
    tree = out / "model"
    shutil.rmtree(out, ignore_errors=True)
    for rel in keep:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, tree / rel)
    readme = (tree / "README.md").read_text("utf-8")
    missing = [t for t in _links(readme) if not (tree / t).is_file()]
    if missing:  # a model page with broken pictures is not what we upload
        raise StorycError(f"the model card links files that are not in the upload: {', '.join(missing)}",
                          "this is a storyc bug; please report it")
    prompts = _read_json(folder / "prompts.json")["scenes"]
    post = render("post.md.j2", team=story.data["story"]["team"], name=name, model_id=model_id,
                  url=f"https://modelscope.cn/models/{model_id}", title=story.data["story"].get("title") or story.id,
                  scenes=prompts, mean=mean)
    (out / "POST.md").write_text(post, "utf-8")
    return tree, out / "POST.md", name


def _links(markdown: str) -> list[str]:
    """Relative targets of the markdown's links and images."""
    import re

    return [t for t in re.findall(r"\]\(([^)\s]+)\)", markdown) if "://" not in t and not t.startswith("#")]


def _endpoint() -> str:
    """The hub modelscope's client talks to (its own MODELSCOPE_ENDPOINT setting, else the public site)."""
    return os.environ.get("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn"


def publish(plan, model_id: str, dry_run: bool = False, display: str | None = None) -> int:
    """Stage the model page (LoRA files, configuration.json, model card, storyboard, images) and upload it with
    modelscope's own hub client; --dry-run stops after staging and lists the tree."""
    import socket
    from urllib.parse import urlparse

    story = plan.story
    tree, post, name = stage_upload(plan, model_id, display, dry_run)
    files = _files(tree)
    print(f"{'would upload' if dry_run else 'uploading'} {story.rel(tree)}/ to {model_id} ({name}):")
    width = max(len(rel) for rel in files)
    for rel in files:
        print(f"  {rel:<{width}}  {(tree / rel).stat().st_size:>11,d} B")
    print(f"discussion post: {story.rel(post)}")
    if dry_run:
        print("dry run: nothing uploaded")
        return 0
    token = os.environ.get("MODELSCOPE_API_TOKEN")
    if not token:
        raise StorycError("MODELSCOPE_API_TOKEN is not set", "export your ModelScope access token in that variable")
    url = urlparse(_endpoint())
    try:  # fail fast offline instead of hanging in the client's retries
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError:
        raise StorycError(f"cannot reach ModelScope at {_endpoint()} (no network)",
                          "publish from a machine with network access; `--dry-run` stages the same tree") from None
    from modelscope.hub.api import HubApi

    from ._quiet import quiet_libraries

    quiet_libraries()
    api = HubApi()
    api.login(token)
    api.push_model(model_id=model_id, model_dir=str(tree), chinese_name=name,
                   license=story.data["submission"]["license"])
    print(f"published {story.id} to https://modelscope.cn/models/{model_id}")
    print(f"next: post {story.rel(post)} in the Kolors discussion area")
    return 0
