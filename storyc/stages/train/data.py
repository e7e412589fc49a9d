"""Training data: the cache pass (every image's VAE latent and every caption's ChatGLM embedding, encoded once
and kept in the sealed content-addressed cache) and the samples drawn from it.

Every draw for a sample comes from a generator seeded by (seed, sample index), so a resumed run, any DataLoader
worker count and N DDP ranks all draw exactly what one uninterrupted process draws.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from ... import cache
from ...errors import StageError
from ...lock import digest
from .config import TrainConfig

CACHE_VERSION = 1


def sample_seed(seed: int, index: int) -> int:
    # A fixed mix of (seed, sample index): every draw for a sample is reproducible on resume.
    return (seed * 0x9E3779B1 + index * 0x85EBCA77 + 1) % (2**63)


class Samples(torch.utils.data.Dataset):
    """Training sample ``i`` (a global sample index): a cached latent, its caption's index and its noise.

    Every draw for sample i comes from a generator seeded by (seed, i), so a resumed run, any DataLoader worker
    count and N DDP ranks all draw exactly what one uninterrupted process draws.
    """

    def __init__(self, data: dict, train, length: int):
        self.data, self.cfg, self.length = data, train, length
        if "buckets" in data:
            self.bucket_rows = [[i for i, b in enumerate(data["bucket_of"]) if b == k] for k in range(len(data["buckets"]))]

    def batch_bucket(self, micro_batch: int) -> int:
        """The bucket of micro-batch m: drawn from (seed, m), weighted by how many rows each bucket holds."""
        g = torch.Generator().manual_seed(sample_seed(self.cfg.seed + 0x2545F491, micro_batch))
        pick = int(torch.randint(0, len(self.data["bucket_of"]), (1,), generator=g))
        return self.data["bucket_of"][pick]

    def __len__(self):
        return self.length

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(sample_seed(self.cfg.seed, index))
        n = len(self.data["latents"])
        data_id = (int(torch.randint(0, n, (1,), generator=g)) + index) % n
        if "buckets" in self.data:  # train.buckets: every sample of a micro-batch from that batch's bucket
            rows = self.bucket_rows[self.batch_bucket(index // self.cfg.batch_size)]
            data_id = rows[(int(torch.randint(0, len(rows), (1,), generator=g)) + index) % len(rows)]
        rec = self.data["latents"][data_id]
        lat = rec["latent"]
        mask = rec.get("mask") if self.cfg.masked_loss else None
        if self.cfg.random_flip and torch.rand((), generator=g) < 0.5:
            lat = rec["latent_flip"]
            mask = rec.get("mask_flip") if mask is not None else None
        if self.cfg.masked_loss and mask is None:  # an image without a mask trains on all of it
            mask = torch.ones((lat.shape[0], 1, *lat.shape[2:]))
        if "buckets" not in self.data and not self.cfg.center_crop:  # random crop of the cached latent, 8-px steps
            w, h = self.data["size"]
            lh, lw = h // 8, w // 8
            y = int(torch.randint(0, lat.shape[2] - lh + 1, (1,), generator=g))
            x = int(torch.randint(0, lat.shape[3] - lw + 1, (1,), generator=g))
            lat = lat[:, :, y:y + lh, x:x + lw]
            mask = mask[:, :, y:y + lh, x:x + lw] if mask is not None else None
        noise = torch.randn(lat.shape, generator=g)
        if self.cfg.noise_offset:  # one shift per latent channel (drawn only when on: defaults draw as before)
            noise = noise + self.cfg.noise_offset * torch.randn(lat.shape[:2] + (1, 1), generator=g)
        text = self.data["text_of"][data_id]
        if self.cfg.caption_dropout and float(torch.rand((), generator=g)) < self.cfg.caption_dropout:
            text = self.data["texts"].index("")  # the empty caption's embedding (encoded in the cache pass)
        return {"latent": lat, "noise": noise, "text": text, **({"mask": mask} if mask is not None else {})}


def collate(items):
    out = {"latent": torch.cat([it["latent"] for it in items]), "noise": torch.cat([it["noise"] for it in items]),
           "text": [it["text"] for it in items]}
    if "mask" in items[0]:
        out["mask"] = torch.cat([it["mask"] for it in items])
    return out


class GlobalBatches(torch.utils.data.Sampler):
    """Micro-batch m of rank r (of W) holds samples (m*W + r)*b ... (m*W + r)*b + b-1: W ranks at batch b draw
    what one process at batch W*b draws. Starts at ``progress.micro_batches`` (restored from a checkpoint before
    Lightning iterates the loader), so a resumed run continues with the next unseen samples."""

    def __init__(self, micro_batches: int, batch_size: int, progress):
        self.total, self.b, self.progress = micro_batches, batch_size, progress

    def _rank(self):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def __len__(self):
        world, _ = self._rank()
        return -(-self.total // world)

    def __iter__(self):
        world, rank = self._rank()
        for m in range(self.progress.micro_batches, len(self)):
            first = (m * world + rank) * self.b
            yield list(range(first, first + self.b))


def make_loader(data: dict, train, micro_batches: int, progress, num_workers: int = 0):
    """The DataLoader a LoRAModule trains from (``progress`` is the module: it counts consumed micro-batches)."""
    b = train.batch_size
    return torch.utils.data.DataLoader(Samples(data, train, micro_batches * b), collate_fn=collate,
                                       batch_sampler=GlobalBatches(micro_batches, b, progress),
                                       num_workers=num_workers, persistent_workers=False)


def _cover(image, w: int, h: int, center_crop: bool):
    """Resized to cover w x h (bilinear), then centre-cropped to it when ``center_crop``: diffsynth's
    TextImageDataset's geometry, shared by the images and their loss masks."""
    import torchvision
    from torchvision import transforms

    iw, ih = image.size
    scale = max(w / iw, h / ih)
    image = torchvision.transforms.functional.resize(image, [round(ih * scale), round(iw * scale)],
                                                     interpolation=transforms.InterpolationMode.BILINEAR)
    return transforms.CenterCrop((h, w))(image) if center_crop else image


def load_image(path: Path, w: int, h: int, center_crop: bool):
    """The image as diffsynth's TextImageDataset prepares it (resize to cover, then crop), in [-1, 1]."""
    from PIL import Image
    from torchvision import transforms

    image = _cover(Image.open(path).convert("RGB"), w, h, center_crop)
    t = transforms.Normalize([0.5], [0.5])(transforms.ToTensor()(image))
    return t.unsqueeze(0).to(torch.float32)


def load_mask(path: Path, w: int, h: int, center_crop: bool, latent_hw: tuple):
    """A loss mask prepared as its image is (resize to cover, then crop), in [0, 1], area-averaged onto the latent
    grid (as kohya sd-scripts resizes its masks): shape (1, 1, *latent_hw)."""
    from PIL import Image
    from torchvision import transforms

    with Image.open(path) as im:
        mask = _cover(im.convert("L"), w, h, center_crop)
    t = transforms.ToTensor()(mask).unsqueeze(0).to(torch.float32)
    return torch.nn.functional.interpolate(t, size=tuple(latent_hw), mode="area")


def _attach_masks(train_dir: Path, rows: list, latents: list, sizes: list, crop: bool) -> tuple[list, int]:
    """train.masked_loss: each row's latent record with its mask (and the flipped one) beside it; rows without a
    mask are left as they are (they train on the whole image)."""
    out, n = [], 0
    for r, rec, (bw, bh) in zip(rows, latents, sizes):
        f = train_dir / "masks" / f"{Path(r['file_name']).stem}.png"
        if f.is_file():
            m = load_mask(f, bw, bh, crop, rec["latent"].shape[2:])
            rec = {**rec, "mask": m, "mask_flip": torch.flip(m, dims=[3])}
            n += 1
        out.append(rec)
    return out, n


def image_buckets(cfg: TrainConfig, train_dir: Path, rows: list) -> dict | None:
    """train.buckets: file name -> its bucket's (width, height), from the image's own size."""
    if not cfg.train.buckets:
        return None
    from PIL import Image

    from ...buckets import assign, bucket_sizes

    sizes = bucket_sizes(*cfg.size)
    out = {}
    for r in rows:
        if r["file_name"] not in out:
            with Image.open(train_dir / r["file_name"]) as im:
                out[r["file_name"]] = assign(im.width, im.height, sizes)
    return out


def cache_pass(ctx, cfg: TrainConfig, kolors: Path, vae: Path, device: str, dtype) -> dict:
    """Latents of every training image and embeddings of every caption, from the cache or encoded now."""
    import torch
    from safetensors.torch import load_file, save_file

    tr = cfg.train
    w, h = cfg.size
    train_dir = ctx.path("data/train")
    with open(train_dir / "metadata.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise StageError("train", "data/train/metadata.csv has no images")
    held = held_out(rows, tr)
    root = ctx.cache_dir
    vae_fp, kolors_fp = ctx.fingerprint("vae"), ctx.fingerprint("kolors")
    lat_keys, lat_missing, sizes, seen = [], [], [], set()
    buckets = image_buckets(cfg, train_dir, rows)
    for r in rows:
        bw, bh = buckets[r["file_name"]] if buckets else (w, h)  # a bucket's latent is centre-cropped to it
        crop = True if buckets else tr.center_crop
        k = digest({"v": CACHE_VERSION, "image": ctx.hasher.file(train_dir / r["file_name"]), "size": [bw, bh],
                    "center_crop": crop, "flip": tr.random_flip, "vae": vae_fp, "dtype": str(dtype)})
        lat_keys.append(k)
        sizes.append((bw, bh))
        if k not in seen and not cache.file_ok(root / "latents" / f"{k}.safetensors", ctx.report):
            lat_missing.append((r, k, (bw, bh), crop))  # a repeated row (dataset repeats) is encoded once
        seen.add(k)
    val_items = validation_folder(ctx, tr)  # train.validation.folder: (image, caption) pairs of their own
    val_keys = []
    for img, _ in val_items:  # centre-cropped at the training size, never flipped: what the loss is measured on
        k = digest({"v": CACHE_VERSION, "image": ctx.hasher.file(img), "size": [w, h], "center_crop": True,
                    "flip": False, "vae": vae_fp, "dtype": str(dtype)})
        val_keys.append(k)
        if k not in seen and not cache.file_ok(root / "latents" / f"{k}.safetensors", ctx.report):
            lat_missing.append(({"path": img}, k, (w, h), True))
        seen.add(k)
    texts = sorted({r["text"] for r in rows} | {c for _, c in val_items}
                   | ({""} if tr.caption_dropout else set()))  # "": dropped captions
    txt_keys = {t: digest({"v": CACHE_VERSION, "text": t, "kolors": kolors_fp, "dtype": str(dtype)}) for t in texts}
    txt_missing = [t for t in texts if not cache.file_ok(root / "text" / f"{txt_keys[t]}.safetensors", ctx.report)]

    if lat_missing:
        from ...models.kolors import load_vae

        enc = load_vae(vae / "diffusion_pytorch_model.safetensors" if vae.is_dir() else vae, "encoder", dtype, device)
        with torch.no_grad():
            for i, (r, k, (bw, bh), crop) in enumerate(lat_missing):
                img = load_image(r.get("path") or train_dir / r["file_name"], bw, bh, crop).to(device, dtype)
                out = {"latent": enc(img).to("cpu", torch.float16).contiguous()}
                if tr.random_flip and "path" not in r:  # (a validation image is never flipped)
                    out["latent_flip"] = enc(torch.flip(img, dims=[3])).to("cpu", torch.float16).contiguous()
                _save(save_file, out, root / "latents" / f"{k}.safetensors")
                ctx.report.update(i + 1, len(lat_missing), "encoding images")
        del enc
    if txt_missing:
        from ...models.kolors import load_prompter

        prompter = load_prompter(kolors, dtype, device)
        with torch.no_grad():
            for t in txt_missing:
                pooled, emb = prompter.encode_prompt(t, device=device, positive=True)
                _save(save_file, {"encoder_hidden_states": emb.to("cpu", torch.float16).contiguous(),
                                  "add_text_embeds": pooled.to("cpu", torch.float16).contiguous()},
                      root / "text" / f"{txt_keys[t]}.safetensors")
        del prompter
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the text encoder and VAE are gone before the UNet trains

    latents = [load_file(str(root / "latents" / f"{k}.safetensors")) for k in lat_keys]
    if tr.masked_loss:  # masks prepared beside the latents, as each image was (cheap: no VAE, done every run)
        latents, n_masked = _attach_masks(train_dir, rows, latents, sizes, True if buckets else tr.center_crop)
        ctx.report.line(f"masked loss: {n_masked} of {len(rows)} training rows have a mask"
                        + ("" if n_masked == len(rows) else " (the others train on the whole image)"))
    emb = {t: load_file(str(root / "text" / f"{txt_keys[t]}.safetensors")) for t in texts}
    keep = [i for i, r in enumerate(rows) if r["file_name"] not in held]  # what is trained on
    out = {"latents": [latents[i] for i in keep], "texts": texts, "text_of": [texts.index(rows[i]["text"]) for i in keep],
           "emb": emb, "n_images": len(keep), "encoded_images": len(lat_missing), "encoded_texts": len(txt_missing),
           "size": (w, h)}
    if val_items:  # train.validation.folder: its images' latents and captions
        out["val"] = [{"latent": load_file(str(root / "latents" / f"{k}.safetensors"))["latent"],
                       "text": texts.index(c)} for k, (_, c) in zip(val_keys, val_items)]
        out["held_out"] = [ctx.story.rel(p) for p, _ in val_items]
    if held:  # train.validation: the held-out images' latents (centre-cropped to the training size) and captions
        out["val"] = [{"latent": center(latents[i]["latent"], w, h), "text": texts.index(rows[i]["text"]),
                       **({"mask": center(latents[i]["mask"], w, h)} if "mask" in latents[i] else {})}
                      for i, r in enumerate(rows) if r["file_name"] in held]
        out["held_out"] = sorted(held)
    if buckets:  # which rows share a latent size: a batch is drawn from one of them
        used = sorted({sizes[i] for i in keep})
        out["buckets"] = used
        out["bucket_of"] = [used.index(sizes[i]) for i in keep]
    return out


def validation_folder(ctx, tr) -> list:
    """train.validation.folder: (image path, caption) of every image in it, sorted; the caption is a same-name
    .txt, else the first source's caption."""
    folder = (tr.validation or {}).get("folder")
    if not folder:
        return []
    from ...lock import walk_files
    from ...project import inside
    from ..ingest import EXTS

    out = []
    for rel, p in walk_files(ctx.project_path(folder)):
        if p.suffix.lower() not in EXTS:
            continue
        if not inside(p, ctx.story.root.resolve()):  # as ingest refuses it for a dataset folder
            raise StageError("train", f"validation image {folder}/{rel} links to a file outside the project",
                             "copy the image into the validation folder instead of linking to it")
        txt = p.with_suffix(".txt")
        try:
            own = txt.read_text("utf-8-sig").strip() if txt.is_file() else ""
        except UnicodeDecodeError:
            raise StageError("train", f"caption file {folder}/{Path(rel).with_suffix('.txt')} is not UTF-8 text",
                             "save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None
        out.append((p, own or tr.validation.get("caption") or ""))
    if not out:
        raise StageError("train", f"the validation folder {folder} holds no images",
                         "add images to it, or use `train.validation: {images: N}`")
    return out


def held_out(rows: list, tr) -> set:
    """train.validation: the file names held out, ``images`` of them chosen by train.seed (by digest, so the choice
    does not depend on the rows' order); at least one image is left to train on."""
    if not tr.validation or "images" not in tr.validation:
        return set()
    n = tr.validation["images"]
    names = sorted({r["file_name"] for r in rows}, key=lambda f: digest({"seed": tr.seed, "file": f}))
    if n >= len(names):
        raise StageError("train", f"train.validation holds out {n} of the {len(names)} training images: none would "
                         "be left to train on", "hold out fewer (`train.validation.images`), or add images")
    return set(names[:n])


def center(latent, w: int, h: int):
    """The latent centre-cropped to the training size (a cached latent may be larger when random crops are on)."""
    lh, lw = h // 8, w // 8
    y, x = (latent.shape[2] - lh) // 2, (latent.shape[3] - lw) // 2
    return latent[:, :, max(y, 0):max(y, 0) + lh, max(x, 0):max(x, 0) + lw]


def _save(save_file, tensors, path: Path) -> None:
    """A cache file written, renamed into place and sealed with its digest (checked before every use)."""
    cache.save_file(path, lambda tmp: save_file(tensors, str(tmp)))
