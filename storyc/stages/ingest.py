"""ingest: dataset -> data/input/metadata.jsonl + images, in Data-Juicer's {text, image: [path]} layout.

Replaces the notebook's MsDataset loop. Images are normalised to RGB once; an unreadable image is skipped and
reported by name and reason, never fatal for the rest.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import StageError
from ..lock import sha256_file
from ..project import inside
from ..render import canonical_json
from .registry import Result

EXTS = {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}  # what Pillow reads
SIDECARS = {".txt"}  # same-name captions
OUT = "data/input"


def _folder_records(root: Path, caption: str, project: Path, skipped: list):
    if not root.is_dir():
        raise StageError("ingest", f"dataset folder {root} does not exist")
    from ..lock import walk_files

    for rel, p in walk_files(root):  # the same files the dataset fingerprint covers
        if p.suffix.lower() not in EXTS:
            if p.suffix.lower() not in SIDECARS:  # said per file, never dropped without a word
                skipped.append({"source": rel, "reason": f"not an image type storyc reads "
                                                         f"({', '.join(sorted(EXTS))})"})
            continue
        if not inside(p, project.resolve()):
            raise StageError("ingest", f"{rel} links to a file outside the project ({p.resolve()})",
                             "copy the image into the dataset folder instead of linking to it")
        txt = p.with_suffix(".txt")
        try:
            own = txt.read_text("utf-8-sig").strip() if txt.is_file() else ""
        except UnicodeDecodeError:
            raise StageError("ingest", f"caption file {txt.relative_to(root)} is not UTF-8 text",
                             "save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None
        yield rel, p, own or caption, bool(own)


def _jsonl_records(path: Path, caption: str):
    if not path.is_file():
        raise StageError("ingest", f"dataset file {path} does not exist")
    base = path.parent  # the folder the dataset fingerprint covers: every image must be in it
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise StageError("ingest", f"{path.name}:{n}: not UTF-8 text", "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError("ingest", f"{path.name}:{n}: not valid JSON ({e.msg})",
                                 "each line must be one {\"text\": ..., \"image\": [path]} object") from None
            imgs = rec.get("image") if isinstance(rec, dict) else None
            if isinstance(imgs, str):
                imgs = [imgs]
            if not isinstance(imgs, list) or not imgs or not all(isinstance(i, str) for i in imgs):
                raise StageError("ingest", f"{path.name}:{n}: expected {{\"text\": ..., \"image\": [path]}}")
            img = Path(imgs[0])
            if img.is_absolute() or not inside(base / img, base.resolve()):
                raise StageError("ingest", f"{path.name}:{n}: image `{imgs[0]}` is outside the dataset folder",
                                 f"image paths are relative to {path.name} and stay inside its folder")
            if not (base / img).is_file():
                raise StageError("ingest", f"{path.name}:{n}: image `{imgs[0]}` is not a regular file",
                                 "check the path (a missing file, a folder, a device or a pipe)")
            own = isinstance(rec.get("text"), str) and bool(rec.get("text"))
            yield f"{path.name}:{n}", (base / img).resolve(), rec["text"] if own else caption, own


def _modelscope_records(ds: dict, cache: Path):
    import os

    from ..models.download import require_modelscope

    local = ("download it where you have network, then use `dataset: {source: folder, path: ...}` "
             "or `source: jsonl` to point at the local copy")
    require_modelscope(f"load dataset `{ds['id']}`", local, lambda msg, hint: StageError("ingest", msg, hint))
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    from modelscope.msdatasets import MsDataset

    try:
        data = MsDataset.load(ds["id"], subset_name=ds["subset"], split=ds["split"], cache_dir=str(cache),
                              **({"version": ds["revision"]} if ds.get("revision") else {}))
    except (OSError, ConnectionError) as e:  # a proxy, a dropped connection, a timeout half-way
        raise StageError("ingest", f"loading dataset `{ds['id']}` from ModelScope failed: {type(e).__name__}: "
                         f"{str(e)[:200]}", f"check the network and run the same command again, or {local}") from None
    for i, rec in enumerate(data):
        yield f"{ds['id']}[{i}]", rec["image"], ds["caption"], False


def to_rgb(im):
    """8-bit RGB as the image looks: 16-bit values scaled (not clipped to white), transparency over white."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit greyscale PNGs open as I;16 or I
        import numpy as np

        arr = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


MASK_ORDER = (".png", ".webp", ".jpg", ".jpeg", ".jfif", ".bmp", ".tif", ".tiff", ".gif")  # first found wins


def alpha_mask(im):
    """The image's alpha channel as an L mask, or None when it has none."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None


def _mask_file(folder: Path, rel: str) -> Path | None:
    """The mask of the image at ``rel`` (relative to its source): the same relative path and stem, any image type."""
    stem = Path(rel).with_suffix("")
    return next((m for m in (folder / f"{stem}{ext}" for ext in MASK_ORDER) if m.is_file()), None)


def _save_mask(ctx, ds: dict, im, rel_in_source: str, dst: Path) -> bool:
    """The record's loss mask (``masks``: alpha, or a folder matched by name) as an L PNG the image's size."""
    from PIL import Image

    if ds.get("masks") == "alpha":
        mask = alpha_mask(im)
    else:
        f = _mask_file(ctx.project_path(ds["masks"]), rel_in_source)
        if f is None:
            return False
        with Image.open(f) as m:
            mask = m.convert("L")
            mask.load()
    if mask is None:
        return False
    if mask.size != im.size:  # a mask drawn at another size: stretched onto the image
        mask = mask.resize(im.size, Image.Resampling.BILINEAR)
    mask.save(dst, compress_level=1)
    return True


def _ingest_source(ctx, ds: dict, tmp: Path, lines: list, skipped: list, origins: list | None = None) -> int:
    """One source's records into ``tmp`` (images numbered on from ``lines``), each with its source's caption and,
    with ``masks``, its loss mask under masks/ (same number). Returns how many records got a mask."""
    from PIL import Image, UnidentifiedImageError

    source = ctx.project_path(ds["path"]) if ds.get("path") else None
    if ds["source"] == "folder":
        records = _folder_records(source, ds["caption"], ctx.story.root, skipped)
    elif ds["source"] == "jsonl":
        records = _jsonl_records(source, ds["caption"])
    else:
        records = _modelscope_records(ds, ctx.story.root / ".storyc" / "datasets")
    limit, first, masked = ds.get("limit"), len(lines), 0
    for name, src, text, own in records:
        if limit and len(lines) - first >= limit:
            break
        dst_stem = f"images/{len(lines):06d}"
        mask_dst = tmp / "masks" / f"{len(lines):06d}.png"
        # the image's path inside its source, as a masks folder mirrors it
        in_source = name if ds["source"] == "folder" else (
            Path(src).relative_to(source.parent.resolve()).as_posix() if isinstance(src, Path) else name)
        try:
            if isinstance(src, Path):
                with Image.open(src) as im:
                    im.load()
                    if im.mode == "RGB" and im.format == "JPEG":  # already RGB JPEG: keep the bytes
                        rel = dst_stem + ".jpg"
                        shutil.copyfile(src, tmp / rel)
                    else:
                        rel = dst_stem + ".png"
                        to_rgb(im).save(tmp / rel, compress_level=1)
                    has_mask = bool(ds.get("masks")) and _save_mask(ctx, ds, im, in_source, mask_dst)
            else:  # a PIL image from a dataset
                rel = dst_stem + ".png"
                to_rgb(src).save(tmp / rel, compress_level=1)
                has_mask = bool(ds.get("masks")) and _save_mask(ctx, ds, src, in_source, mask_dst)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            skipped.append({"source": name, "reason": f"{type(e).__name__}: {e}"})
            mask_dst.unlink(missing_ok=True)
            continue
        masked += has_mask
        lines.append(json.dumps({"text": text, "image": [rel]}, ensure_ascii=False))
        if ds.get("recaption") is not None and origins is not None:  # what recaption needs to know of the record
            origins.append({"line": len(lines) - 1, "source": ds.get("path") or ds.get("id"), "image": in_source,
                            "sha256": sha256_file(src if isinstance(src, Path) else tmp / rel), "text": text,
                            "own": own, "file": rel})
    n = len(lines) - first
    if ds.get("masks") and masked < n:
        ctx.report.line(f"warning: {n - masked} of the {n} images of {ds.get('path') or ds.get('id')} have no mask "
                        f"({'no alpha channel' if ds['masks'] == 'alpha' else 'none of that name in ' + ds['masks']}):"
                        " they train on the whole image")
    return masked


# ---------------------------------------------------------------- recaption

def compose(rc: dict, model_text: str, source_text: str, own: bool) -> str:
    """The caption recaption gives an image: the template with the captioner's words and the source caption, by
    mode (replace: the template; append: the source caption, then the template; keep: an own caption stays)."""
    if rc.get("mode", "replace") == "keep" and own:
        return source_text
    import re

    fields = {"caption": model_text, "source": source_text}  # one pass: the captioner's words are never re-read
    made = re.sub(r"\{(caption|source)\}", lambda m: fields[m.group(1)], rc.get("template", "{caption}"))
    return f"{source_text}，{made}" if rc.get("mode", "replace") == "append" else made


def read_captions(path: Path) -> dict:
    """(source, image) -> entry of a captions file; a line that is not a JSON object with those keys is an error
    that names the line (it may have been edited by hand)."""
    out = {}
    if not path.is_file():
        return out
    for n, line in enumerate(path.read_text("utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise StageError("ingest", f"{path.name}:{n}: not valid JSON ({err.msg})",
                             "fix the line (one {\"source\", \"image\", \"caption\", ...} object a line), or "
                             "delete it to caption that image again") from None
        if not (isinstance(e, dict) and isinstance(e.get("caption"), str) and "image" in e and "source" in e):
            raise StageError("ingest", f"{path.name}:{n}: expected an object with `source`, `image` and a text "
                             "`caption`", "fix the line, or delete it to caption that image again")
        out[(e["source"], e["image"])] = e
    return out


def _caption_new(ctx, model_dir: Path, rc: dict, todo: list, tmp: Path) -> dict:
    """The captioner's words for each image in ``todo`` (origins), through Data-Juicer's image_captioning_mapper:
    one image per call, its sampling seeded by (seed, the image's bytes), so a caption never depends on which other
    images were captioned with it."""
    import random

    import torch
    from data_juicer.ops.mapper import ImageCaptioningMapper
    from data_juicer.utils.mm_utils import SpecialTokens, remove_special_tokens

    from ..lock import digest
    from ._quiet import quiet_libraries

    quiet_libraries()
    cuda = torch.cuda.is_available()
    op = ImageCaptioningMapper(hf_img2seq=str(model_dir), accelerator="cuda" if cuda else "cpu", num_proc=1,
                               keep_original_sample=False, caption_num=1, prompt=rc.get("prompt"))
    prompt = (rc.get("prompt") or "").strip()
    out = {}
    for i, o in enumerate(todo):
        seed = int(digest({"seed": rc.get("seed", 0), "sha256": o["sha256"]})[:15], 16)
        random.seed(seed)
        torch.manual_seed(seed)
        res = op.process({"images": [[str(tmp / o["file"])]], "text": [f"{SpecialTokens.image} {SpecialTokens.eoc}"]})
        text = " ".join(remove_special_tokens(res["text"][0]).split()) if res.get("text") else ""
        if prompt and text.startswith(prompt):  # BLIP-2 continues the prompt: the caption is what it added
            text = text[len(prompt):].strip()
        out[o["line"]] = text
        ctx.report.update(i + 1, len(todo), "captioning images")
    return out


def recaption(ctx, ds: dict, tmp: Path, lines: list, origins: list) -> int:
    """Recaption one source's records (``origins``) into ``lines``: each image's captioner words come from the
    captions file when its bytes are unchanged there, else from the captioner; a caption edited by hand (it differs
    from what storyc composed, `auto`) wins. The file is rewritten, sorted, atomically. Returns how many images the
    captioner saw."""
    from ..render import atomic_write

    rc = ds["recaption"]
    path = ctx.project_path(rc["file"])
    where = ds.get("path") or ds.get("id")
    known = read_captions(path)
    todo = [o for o in origins if known.get((o["source"], o["image"]), {}).get("sha256") != o["sha256"]
            or not isinstance(known.get((o["source"], o["image"]), {}).get("model"), str)]
    fresh = _caption_new(ctx, ctx.model("captioner"), rc, todo, tmp) if todo else {}
    entries, edited = {}, 0
    for o in origins:
        old = known.get((o["source"], o["image"]))
        words = fresh[o["line"]] if o["line"] in fresh else old["model"]
        auto = compose(rc, words, o["text"], o["own"])
        caption = auto
        if old is not None and o["line"] not in fresh and old.get("caption") != old.get("auto"):
            caption, edited = old["caption"], edited + 1  # a hand edit: kept, whatever the template says now
        entries[(o["source"], o["image"])] = {"source": o["source"], "image": o["image"], "sha256": o["sha256"],
                                              "model": words, "auto": auto, "caption": caption}
        rec = json.loads(lines[o["line"]])
        rec["text"] = caption
        lines[o["line"]] = json.dumps(rec, ensure_ascii=False)
    # entries of other sources sharing the file stay; this source's are exactly its images now
    keep = {k: v for k, v in known.items() if k[0] != where}
    text = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n"
                   for _, e in sorted({**keep, **entries}.items()))
    if not path.is_file() or path.read_text("utf-8-sig") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    if edited:
        ctx.report.line(f"recaption: {edited} caption(s) of {where} edited by hand in {path.name}: kept")
    return len(todo)


def run(ctx, jobs):
    job, = jobs
    many = job.params.get("datasets") or [job.params["dataset"]]
    out = ctx.path(OUT)
    tmp = out.with_name("input.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    any_masks = any(ds.get("masks") for ds in many)
    if any_masks:
        (tmp / "masks").mkdir()
    lines, skipped, repeats, per_source, masked, recaptioned = [], [], {}, [], 0, 0
    for ds in many:
        first = len(lines)
        origins = [] if ds.get("recaption") is not None else None
        got = _ingest_source(ctx, ds, tmp, lines, skipped, origins)
        if origins:
            recaptioned += recaption(ctx, ds, tmp, lines, origins)
        masked += got
        per_source.append({"source": ds["source"], "where": ds.get("path") or ds.get("id"),
                           "records": len(lines) - first, "repeats": ds.get("repeats", 1),
                           **({"masks": got} if ds.get("masks") else {})})
        if ds.get("repeats", 1) > 1:
            for line in lines[first:]:
                repeats[Path(json.loads(line)["image"][0]).name] = ds["repeats"]
    for s in skipped:
        ctx.report.line(f"warning: ingest skipped {s['source']}: {s['reason']}")
    if not lines:
        raise StageError("ingest", f"the dataset has no usable images ({len(skipped)} unreadable)"
                         if skipped else "the dataset is empty", "check `dataset.path` / `dataset.id`")
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    report = {"format": "storyc.ingest_report/1", "records": len(lines), "skipped": skipped}
    if any_masks:
        report["masks"] = masked
    if "captioner" in job.params:  # said, not written: a rebuild that captions nothing makes the same outputs
        ctx.report.line(f"recaption: {recaptioned} image(s) captioned by the captioner, the rest from the captions "
                        "files")
    if len(many) > 1 or repeats or any_masks:
        report["sources"] = per_source
    (tmp / "ingest_report.json").write_text(canonical_json(report), "utf-8")
    outputs = [f"{OUT}/metadata.jsonl", f"{OUT}/ingest_report.json", f"{OUT}/images"]
    if repeats:  # image -> times it counts per epoch; the filter stage writes the training rows that often
        (tmp / "repeats.json").write_text(canonical_json(repeats), "utf-8")
        outputs.append(f"{OUT}/repeats.json")
    if any_masks:
        outputs.append(f"{OUT}/masks")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the whole folder appears at once
    yield Result("ingest", outputs, {"records": len(lines), "skipped": len(skipped)})
    return f"{len(lines)} records, {len(skipped)} skipped"

