"""score: the competition's aesthetic score (simple-aesthetics-predictor V2 linear head on CLIP ViT-L/14).

Same model and preprocessing as the notebook's ``get_aesthetics_score``, but batched, and only over the story's
own images (``evaluate()`` scores every file in a folder, so a storyboard there would skew the mean).
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import resources
from ..render import atomic_write, canonical_json
from ._quiet import quiet_libraries
from .registry import Result


class Scorer:
    def __init__(self, folder: Path, res: "resources.Resources | None" = None):
        from aesthetics_predictor import AestheticsPredictorV2Linear
        from transformers import CLIPProcessor

        quiet_libraries()
        from ..models.kolors import check_folder

        check_folder("aesthetic", folder)
        res = res or resources.for_score(None)
        self.device = res.device
        self.model = AestheticsPredictorV2Linear.from_pretrained(str(folder)).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(folder))
        # one image per forward: a score then never depends on which other images were scored with it (batched
        # kernels differ in the last bits), so an incremental build's scores.json is a cold build's, byte for byte
        self.batch_size = 1
        self.weights = None  # generation.select: how best-of-K candidates are ranked (None: the score alone)
        self.aligner = None  # an Aligner, when the ranking weighs prompt alignment
        self.preference = {}  # metric -> a models.preference.Preference, when the ranking weighs it
        self._references = {}  # a character reference's path -> its CLIP embedding (character likeness)

    def score_and_embed(self, images) -> tuple[list[float], list[list[float]]]:
        scores, embeds, _ = self.measure(images)
        return scores, embeds

    def measure(self, images) -> tuple[list[float], list[list[float]], list[dict]]:
        """Aesthetic scores, CLIP image embeddings and style statistics (per channel, the mean and standard
        deviation of the middle CLIP layer's patch features: AdaIN's style descriptor, read by a hook, so the
        scores are the predictor's own to the bit)."""
        import torch

        layers = self.model.vision_model.encoder.layers
        seen = []
        hook = layers[len(layers) // 2].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(
            out, tuple) else out))
        scores, embeds, styles = [], [], []
        try:
            for i in range(0, len(images), self.batch_size):
                inputs = self.processor(images=images[i:i + self.batch_size], return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                seen.clear()
                with torch.no_grad():
                    out = self.model(**inputs)
                scores += out.logits[:, 0].float().cpu().tolist()
                embeds += out.hidden_states.float().cpu().tolist()
                feats = seen[0][:, 1:].float()  # patch tokens (the class token is not a place in the image)
                for m, sd in zip(feats.mean(1).cpu().tolist(), feats.std(1).cpu().tolist()):
                    styles.append({"mean": m, "std": sd})
        finally:
            hook.remove()
        return scores, embeds, styles

    def score(self, images) -> list[float]:
        return self.score_and_embed(images)[0]

    def likeness(self, embeds: list[list[float]], characters: list[dict], root: Path) -> list[float]:
        """Each image's likeness to the characters it shows (``embeds``: the images' CLIP embeddings from
        :meth:`score_and_embed`): per character, the mean cosine with its reference images' embeddings, then the
        mean over characters. A reference is embedded once per scorer."""
        from PIL import Image

        refs = []
        for ch in characters:
            mine = []
            for rel in ch["references"]:
                if rel not in self._references:
                    with Image.open(root / rel) as im:
                        self._references[rel] = self.score_and_embed([im.convert("RGB")])[1][0]
                mine.append(self._references[rel])
            refs.append(mine)
        return [sum(sum(cosine(e, r) for r in mine) / len(mine) for mine in refs) / len(refs) for e in embeds]


class Aligner:
    """Prompt alignment: each image against its own (Chinese) prompt with transformers' ChineseCLIPModel, the
    cosine of the projected image and text embeddings (models.clip_zh)."""

    def __init__(self, folder: Path, device: str):
        from transformers import ChineseCLIPModel, ChineseCLIPProcessor

        quiet_libraries()
        self.device = device
        self.model = ChineseCLIPModel.from_pretrained(str(folder)).to(device).eval()
        self.processor = ChineseCLIPProcessor.from_pretrained(str(folder))
        self.max_len = self.model.config.text_config.max_position_embeddings

    def align(self, images, prompts) -> list[float]:
        import torch

        out = []
        for im, prompt in zip(images, prompts):
            inputs = self.processor(text=[prompt], images=[im], return_tensors="pt", padding=True, truncation=True,
                                    max_length=self.max_len)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.no_grad():  # the full forward: get_text_features of transformers 4.57 reads a pooler
                res = self.model(**inputs)  # ChineseCLIP's text model does not have (its [CLS] state is the one)
            out.append(torch.nn.functional.cosine_similarity(res.image_embeds.float(), res.text_embeds.float()).item())
        return out


def run(ctx, jobs):
    from PIL import Image

    import time

    t = time.monotonic()
    from .. import resident

    model, rs = ctx.model("aesthetic"), resources.for_score(ctx.device)
    scorer = resident.get("scorer", (str(model), ctx.fingerprint("aesthetic"), rs.device),
                          lambda: Scorer(model, rs))
    ctx.metric("score.model_load_s", time.monotonic() - t)
    files = [j.params["file"] for j in jobs]
    images = [Image.open(ctx.path(f)).convert("RGB") for f in files]
    t = time.monotonic()
    scores, embeds, styles = scorer.measure(images)
    ctx.metric("score.scoring_s", time.monotonic() - t)
    del scorer
    aligned = [j for j in jobs if "clip_zh" in j.params]
    alignment = {}
    if aligned:  # one model for every scene that asks (models.clip_zh is the story's)
        t = time.monotonic()
        clip = ctx.model("clip_zh")
        aligner = resident.get("aligner", (str(clip), ctx.fingerprint("clip_zh"), rs.device),
                               lambda: Aligner(clip, rs.device))
        vals = aligner.align([images[jobs.index(j)] for j in aligned], [j.params["prompt"] for j in aligned])
        alignment = {j.name: v for j, v in zip(aligned, vals)}
        ctx.metric("score.prompt_alignment_s", time.monotonic() - t)
    preference = {}  # job name -> {metric: value}: DiffSynth's preference models, each the story's own
    for key in sorted({k for j in jobs for k in j.params.get("preference", ())}):
        from ..models.preference import Preference

        t = time.monotonic()
        asked = [j for j in jobs if key in j.params.get("preference", ())]
        folder = ctx.model(key)
        pm = resident.get(f"preference:{key}", (str(folder), ctx.fingerprint(key), rs.device),
                          lambda: Preference(key, folder, rs.device))
        for j, v in zip(asked, pm.score([images[jobs.index(j)] for j in asked], [j.params["prompt"] for j in asked])):
            preference.setdefault(j.name, {})[key] = v
        ctx.metric(f"score.{key}_s", time.monotonic() - t)
    sims = [j for j in jobs if "dreamsim" in j.params]  # the scenes that show a character, when models.dreamsim
    dreamsim = {}
    if sims:
        from ..models.dreamsim import DreamSim

        t = time.monotonic()
        folder = ctx.model("dreamsim")
        ds = resident.get("dreamsim", (str(folder), ctx.fingerprint("dreamsim"), rs.device),
                          lambda: DreamSim(folder, rs.device))
        dreamsim = dict(zip((j.name for j in sims), ds.embed([images[jobs.index(j)] for j in sims])))
        ctx.metric("score.dreamsim_s", time.monotonic() - t)
    for job, file, sc, emb, st in zip(jobs, files, scores, embeds, styles):
        rel = f"scores/{Path(file).stem}.json"
        doc = {"format": "storyc.score/2", "scene": job.scene, "file": file, "score": sc,
               "clip_embedding": [round(x, 6) for x in emb],
               "style": {k: [round(x, 6) for x in v] for k, v in st.items()},
               "prompt_alignment": alignment.get(job.name)}  # null: not measured (no models.clip_zh)
        if job.name in preference:  # only when measured: a story without them keeps its files byte for byte
            doc["preference"] = {k: round(v, 6) for k, v in preference[job.name].items()}
        if job.name in dreamsim:
            doc["dreamsim_embedding"] = [round(x, 6) for x in dreamsim[job.name]]
        atomic_write(ctx.path(rel), canonical_json(doc))
        facts = {"score": round(sc, 6)}
        if job.name in alignment:
            facts["prompt_alignment"] = round(alignment[job.name], 6)
        facts.update(doc.get("preference", {}))
        yield Result(job.name, [rel], facts, digest_facts=round(sc, 6))
    return ", ".join(f"{j.scene} {sc:.3f}" for j, sc in zip(jobs, scores))


def cosine(a: list[float], b: list[float]) -> float:
    import math

    return sum(x * y for x, y in zip(a, b)) / ((math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
                                               or 1.0)


def coherence(embeds: list[list[float]]) -> tuple[float, int]:
    """Mean pairwise cosine similarity of (unit) CLIP embeddings, and the index of the least similar image."""
    n = len(embeds)
    if n < 2:
        return 1.0, 0
    import math

    unit = []
    for e in embeds:
        norm = math.sqrt(sum(x * x for x in e)) or 1.0
        unit.append([x / norm for x in e])
    sims = [[sum(a * b for a, b in zip(unit[i], unit[j])) for j in range(n)] for i in range(n)]
    pairs = [sims[i][j] for i in range(n) for j in range(i + 1, n)]
    per = [sum(sims[i][j] for j in range(n) if j != i) / (n - 1) for i in range(n)]
    return sum(pairs) / len(pairs), min(range(n), key=lambda i: per[i])


def character_consistency(shown: list, embeds: list[list[float]], dreamsim: list | None = None) -> dict | None:
    """Per character shown in two images or more (``shown[i]``: the ids image i shows): the mean pairwise cosine
    of those images' CLIP embeddings, and the mean over characters. None: no character to measure. ``dreamsim``:
    each image's DreamSim embedding (None where not measured): the same figures as 1 - DreamSim's distance, under
    "dreamsim" (null unless every image that shows a character has one)."""
    where: dict = {}
    for i, ids in enumerate(shown):
        for c in ids:
            where.setdefault(c, []).append(i)
    per = {c: coherence([embeds[i] for i in idx])[0] for c, idx in sorted(where.items()) if len(idx) > 1}
    if not per:
        return None
    out = {"mean": sum(per.values()) / len(per),
           "characters": {c: {"mean_pairwise_cosine": v, "images": len(where[c])} for c, v in per.items()},
           "what": "per character, the mean pairwise cosine of the CLIP image embeddings of the scenes that show it",
           "dreamsim": None}
    if dreamsim is not None and all(dreamsim[i] is not None for c in per for i in where[c]):
        sims = {c: coherence([dreamsim[i] for i in where[c]])[0] for c in per}
        out["dreamsim"] = {"mean": sum(sims.values()) / len(sims), "characters": sims,
                           "what": "per character, the mean over pairs of the scenes that show it of 1 - DreamSim's "
                                   "distance (models.dreamsim)"}
    return out


def style_distance(styles: list[dict]) -> tuple[float, int]:
    """Mean pairwise style distance of the images (AdaIN's style loss between their middle-layer CLIP feature
    statistics: the root mean square difference of the channel means and of the channel deviations; 0 for one
    look), and the index of the image farthest from the others. Lower is more coherent."""
    import math

    n = len(styles)
    if n < 2:
        return 0.0, 0

    def dist(a, b):
        d = sum((x - y) ** 2 for x, y in zip(a["mean"], b["mean"])) + sum((x - y) ** 2 for x, y in zip(a["std"], b["std"]))
        return math.sqrt(d / len(a["mean"]))

    d = [[dist(styles[i], styles[j]) for j in range(n)] for i in range(n)]
    pairs = [d[i][j] for i in range(n) for j in range(i + 1, n)]
    return sum(pairs) / len(pairs), max(range(n), key=lambda i: sum(d[i]))


def score_folder(folder: Path, model: Path, gate: float, device: str | None = None, clip_zh: Path | None = None,
                 preference: dict | None = None, dreamsim: Path | None = None) -> int:
    """`storyc score DIR`: score a folder of images standalone; print per image, the set's style figures, prompt
    alignment (a storyc submission's prompts.json and a Chinese CLIP), character consistency (by CLIP, and by
    DreamSim with the spec's models.dreamsim) and preference scores (prompts.json and the spec's models.pickscore /
    hpsv2 / hpsv2_1 / imagereward / mps), the mean and PASS/FAIL (last line)."""
    from PIL import Image

    from ..errors import StorycError
    from ..submission import Gate

    quiet_libraries()

    folder = Path(folder)
    if not folder.is_dir():
        raise StorycError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    prompts = folder / "prompts.json"  # a storyc submission: its scene images (images/) only, never the storyboard
    prompt_of, shown = {}, {}
    if prompts.is_file():
        try:
            scenes = json.loads(prompts.read_text("utf-8"))["scenes"]
            files = [folder / s["file"] for s in scenes if (folder / s["file"]).is_file()]
            prompt_of = {folder / s["file"]: s["prompt"] for s in scenes if isinstance(s.get("prompt"), str)}
            shown = {folder / s["file"]: [c["id"] for c in s.get("characters") or ()] for s in scenes}
        except (ValueError, KeyError, TypeError):
            pass
    images, kept = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
            kept.append(p)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the rest
            print(f"warning: skipped {p.name}: {type(e).__name__}: {e}")
    files = kept
    if not files:
        raise StorycError(f"no readable images in {folder}")
    scorer = Scorer(model, resources.for_score(device))
    scores, embeds, styles = scorer.measure(images)
    del scorer
    aligned = None
    if clip_zh is not None and prompt_of and all(p in prompt_of for p in files):
        aligned = Aligner(clip_zh, resources.for_score(device).device).align(images, [prompt_of[p] for p in files])
    width = max(len(p.name) for p in files)
    for i, (p, s) in enumerate(zip(files, scores)):
        print(f"{p.name:<{width}}  {s:8.4f}" + (f"  alignment {aligned[i]:.4f}" if aligned else ""))
    if len(files) > 1:
        coh, odd = coherence(embeds)
        dist, far = style_distance(styles)
        print(f"style coherence {coh:.4f} (least like the others: {files[odd].name}); style distance {dist:.4f} "
              f"(farthest: {files[far].name})")
        who = [shown.get(p, []) for p in files]
        sims = None
        if dreamsim is not None and any(who):  # the images that show a character, as the score stage embeds them
            from ..models.dreamsim import DreamSim

            sims = DreamSim(dreamsim, resources.for_score(device).device).embed_shown(images, who)
        chars = character_consistency(who, embeds, sims)
        if chars:
            per = ", ".join(f"{k} {v['mean_pairwise_cosine']:.4f} in {v['images']}" for k, v in chars["characters"].items())
            print(f"character consistency {chars['mean']:.4f} ({per})")
            if chars["dreamsim"] is not None:
                per = ", ".join(f"{k} {v:.4f} in {chars['characters'][k]['images']}"
                                for k, v in chars["dreamsim"]["characters"].items())
                print(f"character consistency by DreamSim {chars['dreamsim']['mean']:.4f} ({per})")
    why = ("no prompts.json beside the images" if not prompt_of else "no Chinese CLIP (models.clip_zh in --spec)")
    print(f"prompt alignment {sum(aligned) / len(aligned):.4f}" if aligned else f"prompt alignment: not measured ({why})")
    with_prompts = bool(prompt_of) and all(p in prompt_of for p in files)
    for key, folder in (preference or {}).items():  # the preference models the spec sets
        if not with_prompts:
            print(f"{key}: not measured (no prompts.json beside the images)")
            continue
        from ..models.preference import Preference

        vals = Preference(key, folder, resources.for_score(device).device).score(
            images, [prompt_of[p] for p in files])
        print(f"{key} {sum(vals) / len(vals):.4f} (" + ", ".join(f"{p.name} {v:.4f}" for p, v in zip(files, vals)) + ")")
    g = Gate.of(scores, gate)
    print(f"{'mean':<{width}}  {g.mean:8.4f}  {'PASS' if g.valid else 'FAIL'} (gate {gate:g})")
    return 0 if g.valid else 3  # as a build's INVALID
