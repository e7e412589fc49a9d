"""report.html: the submission's human-readable report (scenes, scores, data, training, checkpoints), beside the
images it shows. Every text from a spec goes through html.escape."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from .model import PREFERENCE, select_text
from .submission import read_json


def _curve(log: Path) -> list:
    try:
        rows = [ln.split(",") for ln in log.read_text("utf-8").splitlines()[1:] if ln.strip()]
        pts = [(int(a), float(b)) for a, b in rows]
    except (OSError, ValueError):
        return []
    return [(x, y) for x, y in pts if y == y]  # no NaN


def loss_svg(log: Path, w: int = 640, h: int = 200) -> str:
    """The training loss per step as an inline SVG polyline (no plotting library), with the held-out loss
    (val_log.csv beside it, train.validation) on the same axes."""
    pts, val = _curve(log), _curve(Path(log).with_name("val_log.csv"))
    if len(pts) < 2:
        return ""
    x0, x1 = pts[0][0], max(pts[-1][0], val[-1][0] if val else 0)
    y0, y1 = min(y for _, y in pts + val), max(y for _, y in pts + val)
    sx = (w - 20) / max(x1 - x0, 1)
    sy = (h - 20) / max(y1 - y0, 1e-12)

    def line(points):
        return " ".join(f"{10 + (x - x0) * sx:.1f},{h - 10 - (y - y0) * sy:.1f}" for x, y in points)

    held = (f'<polyline id="val-loss" fill="none" stroke="#d2691e" stroke-width="2" points="{line(val)}"/>'
            if val else "")
    what = (f"; held-out loss (orange) at {len(val)} step(s), last {val[-1][1]:.4f}" if val else "")
    return (f'<figure id="loss"><svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" style="border:1px solid #ccc">'
            f'<polyline fill="none" stroke="#2a6fdb" stroke-width="1.5" points="{line(pts)}"/>{held}</svg>'
            f"<figcaption>loss per step ({pts[0][0]}-{pts[-1][0]}; {y0:.4f} to {y1:.4f}){what}</figcaption></figure>")


def checkpoints_html(lora: Path) -> str:
    """Each previewed checkpoint's strip (the story rendered with that checkpoint) and its scores."""
    doc = read_json(lora / "checkpoints.json")
    if not isinstance(doc, dict):
        return ""
    rows = []
    more = [k for k in CHECKPOINT_FIGURES if any(k in c for c in doc.get("checkpoints", []))]
    for c in doc.get("checkpoints", []):
        strip = lora / "checkpoints" / f"step-{c['step']}.png"
        if not strip.is_file():
            continue
        src = "data:image/png;base64," + base64.b64encode(strip.read_bytes()).decode()
        chosen = " (used)" if c["step"] == doc.get("selected") else ""
        cells = "".join(f"<td>{c[k]:.3f}</td>" if k in c else "<td></td>" for k in more)
        rows.append(f"<tr><td>{c['step']}{chosen}</td><td>{c['mean']:.3f}</td><td>{c['coherence']:.3f}</td>{cells}"
                    f"<td><img src='{src}' height='96'></td></tr>")
    heads = "".join(f"<th>{html.escape(CHECKPOINT_FIGURES[k])}</th>" for k in more)
    return (f"<h3 id='checkpoints'>Checkpoints (train.select: {html.escape(select_text(doc.get('select')))})</h3><table>"
            f"<tr><th>step</th><th>mean aesthetic</th><th>coherence</th>{heads}<th>preview</th></tr>" + "".join(rows)
            + "</table>")


def report_html(c: dict) -> str:
    """The report beside the images it shows: relative links, not a second (base64) copy of every PNG."""
    e = html.escape
    pref = c.get("preference") or {}
    measured = [k for k, v in pref.items() if v is not None]
    rows = "".join(
        f"<tr><td>{i + 1}</td><td><img src='{e(r['file'])}' width='256'></td><td><b>{e(r['scene'])}</b><br>"
        f"{e(r['prompt'])}<br><i>negative:</i> {e(r['negative_prompt'])}<br>{e(r.get('caption', ''))}</td>"
        f"<td>{r['seed']}</td><td>{c['scores'][i]:.3f}</td><td>{_num(c['aligned'][i])}</td>"
        + "".join(f"<td>{_num(c['prefs'][i].get(k))}</td>" for k in measured) + "</tr>"
        for i, r in enumerate(c["recs"]))
    filt = c["filt"] or {}
    frows = "".join(f"<tr><td>{e(o['op'])}</td><td>{o['in']}</td><td>{o['kept']}</td></tr>" for o in filt.get("ops", []))
    tr = c["train"] or {}
    verdict = "VALID" if c["valid"] else "INVALID"
    return f"""<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><title>{e(c['title'])} - storyc report</title>
<style>{c.get('font_face', '')}body{{font-family:{'storyc-cjk,' if c.get('font_face') else ''}sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}}.valid{{color:green}}.invalid{{color:#b00}}</style></head><body>
<h1>{e(c['title'])}</h1>
<p id="verdict" class="{verdict.lower()}">Mean aesthetic score {c['mean']:.3f} (gate {c['gate']:g}): <b>{verdict}</b>.
Style coherence (mean pairwise CLIP cosine) {c['coherence']:.3f}; least like the others: {e(c['odd'])}.</p>
<p id="metrics">Style distance (AdaIN style loss of middle-layer CLIP features, lower is more coherent)
{c['style_distance']:.3f}; farthest from the others: {e(c['farthest'])}. Prompt alignment (Chinese CLIP, image against
its own prompt): {'not measured (set models.clip_zh)' if c['alignment'] is None else format(c['alignment'], '.3f')}.
Preference (DiffSynth's ImageQualityMetric, image against its own prompt): {_preference(pref)}.</p>
{_characters(c.get('characters'))}
<h2>Storyboard</h2><img id="storyboard" src="storyboard.png" style="max-width:100%">
<h2>Scenes</h2><table><tr><th>#</th><th>image</th><th>prompt</th><th>seed</th><th>score</th><th>prompt alignment</th>{''.join(f'<th>{e(PREFERENCE_NAMES[k])}</th>' for k in measured)}</tr>{rows}</table>
<h2>Data</h2><p>{filt.get('input', '?')} images in, {filt.get('kept', '?')} kept.</p>
<table><tr><th>op</th><th>in</th><th>kept</th></tr>{frows}</table>
<h2>Training</h2><p>{tr.get('steps', '?')} steps, final loss {tr.get('final_loss', float('nan')):.4f}, LoRA rank {c['lora']['rank']}
alpha {c['lora']['alpha']:g}, on {e(str(tr.get('device', '?')))} ({e(str(tr.get('precision', '?')))}).</p>
{c.get('loss_svg', '')}
{c.get('checkpoints_html', '')}
</body></html>
"""


PREFERENCE_NAMES = {"pickscore": "PickScore", "hpsv2": "HPS v2", "hpsv2_1": "HPS v2.1", "imagereward": "ImageReward",
                    "mps": "MPS"}
# a preview record's figures beyond the mean aesthetic and the coherence (key -> label), those some records have
CHECKPOINT_FIGURES = {"characters": "character consistency", "character_dreamsim": "character consistency by DreamSim",
                      "alignment": "prompt alignment",
                      **{k: PREFERENCE_NAMES[k] for k in PREFERENCE}}


def _preference(pref: dict) -> str:
    """Each preference model's mean, or that it was not measured (its model is not set)."""
    return ", ".join(f"{PREFERENCE_NAMES[k]} " + (f"not measured (set models.{k})" if v is None else f"{v['mean']:.3f}")
                     for k, v in pref.items()) or "not measured"


def _characters(m: dict | None) -> str:
    """Character consistency, per character (only in a story with characters)."""
    if m is None:
        return ""
    e = html.escape
    per = ", ".join(f"{e(k)} {v['mean_pairwise_cosine']:.3f} ({v['images']} scenes)" for k, v in m["characters"].items())
    ds = m.get("dreamsim")
    dream = "not measured (set models.dreamsim)" if ds is None else f"{ds['mean']:.3f}: " + ", ".join(
        f"{e(k)} {v:.3f}" for k, v in ds["characters"].items())
    return (f'<p id="characters">Character consistency (mean pairwise CLIP cosine of the scenes that show each '
            f"character) {m['mean']:.3f}: {per}. By DreamSim (1 - its distance): {dream}.</p>")


def _num(v) -> str:
    return "not measured" if v is None else f"{v:.3f}"


def font_face(page: str, font, cache_dir: Path) -> str | None:
    """The page's own font: the caption font (Noto Sans CJK by default) cut down to the characters the page holds,
    embedded as a small WOFF (tens of kB, not the 15 MB collection; a font file beside the page would not load
    from disk: browsers treat file:// fonts as cross-origin), so its Chinese shows on a machine without CJK fonts.
    The cut is cached by content: a page with the same characters reuses it. The CSS rule, or None without a font."""
    if font is None:
        return None
    from . import cache
    from .lock import digest

    chars = "".join(sorted(set(page) | set(" ?.0123456789")))
    key = digest({"font": font.name, "face": font.index, "sha": cache.sha256(font.path), "chars": chars})
    path = cache_dir / "fonts" / f"{key}.woff"
    if not cache.file_ok(path):
        cache.save_file(path, lambda tmp: _subset(font, chars, tmp))
    data = base64.b64encode(path.read_bytes()).decode()
    return f"@font-face{{font-family:storyc-cjk;src:url(data:font/woff;base64,{data}) format('woff')}}"


def _subset(font, chars: str, out: Path) -> None:
    from fontTools import subset
    from fontTools.ttLib import TTFont

    tt = TTFont(str(font.path), fontNumber=font.index, lazy=True, recalcTimestamp=False)
    opts = subset.Options()
    opts.flavor, opts.layout_features, opts.name_IDs = "woff", ["*"], ["*"]
    sub = subset.Subsetter(opts)
    sub.populate(text=chars)
    sub.subset(tt)
    tt.flavor = "woff"
    tt.save(str(out))
