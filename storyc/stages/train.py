"""train: Kolors LoRA training with diffsynth's Kolors parts, peft and Lightning.

Same math as diffsynth's ``LightningModelForT2ILoRA`` (the notebook's ``train_kolors_lora.py``): peft LoRA on the
UNet with fp32 adapter weights, 1100-step scheduler, one random timestep per batch, MSE on the scheduler's
training target. What differs is where the time goes:
  1. a cache pass encodes every training image with the VAE and every caption with ChatGLM once (content-hash
     keyed under the cache folder, reused by later runs), then releases both models;
  2. the UNet trains on cached latents and embeddings: no 6B text encoder or VAE in the loop;
  3. on one GPU the UNet's forward and backward are replayed as CUDA graphs (batch-1 steps are launch-bound);
  4. every per-sample random draw comes from a generator seeded by (seed, sample index), so a resumed run
     draws exactly what an uninterrupted one would, and N DDP ranks draw what one process at N x batch would.
Outputs are stored content-addressed (cache/train/<key>/), so a story with identical data/lora/train slices
reuses them without training.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

from .. import resources
from ..errors import StageError
from ..lock import digest, sha256_file
from ..locks import exclusive
from ..render import atomic_write, canonical_json
from .registry import Result
from .train_config import TrainConfig

CACHE_VERSION = 1
FORMATS = ("diffsynth", "diffusers", "kohya")  # the cache holds all three: stories sharing it may ship any


def train_key(ctx, cfg: TrainConfig) -> str:
    """The content address of a trained LoRA: what its weights depend on, nothing else."""
    return _key(ctx, digest(cfg.cache_key_params()))


def _key(ctx, params_hash: str) -> str:
    data = ctx.upstream("filter")
    return digest({"params": params_hash, "data": data.digest if data else None,
                   "kolors": ctx.fingerprint("kolors"), "vae": ctx.fingerprint("vae")})


# ---------------------------------------------------------------- cache integrity
# A cache entry is used only while its bytes match the digests recorded when it was written: cheap through the
# fingerprint cache (size + mtime), a full read when those changed. A corrupt entry is dropped and rebuilt.

def _seal(ctx, work: Path, key: str) -> None:
    files = {f.relative_to(work).as_posix(): {"sha256": ctx.hasher.file(f), "size": f.stat().st_size}
             for f in sorted(work.rglob("*")) if f.is_file() and f.name != "DONE"}  # previews/ too
    atomic_write(work / "DONE", canonical_json({"format": "storyc.train_cache/1", "key": key, "files": files}))


def _entry_ok(ctx, final: Path) -> bool:
    try:
        done = json.loads((final / "DONE").read_text("utf-8"))
    except ValueError:  # written by storyc <= 0.1.0 (the key alone): record its digests now
        _seal(ctx, final, final.name)
        return True
    except OSError:
        return False
    bad = [name for name, rec in (done.get("files") or {}).items() if not (final / name).is_file()
           or (final / name).stat().st_size != rec.get("size") or ctx.hasher.file(final / name) != rec.get("sha256")]
    if bad or not done.get("files"):
        ctx.report.line(f"warning: training cache entry {final.name[:12]} is corrupt ({', '.join(bad) or 'no digests'} "
                        "changed since it was written); dropping it and training again")
        shutil.rmtree(final, ignore_errors=True)
        return False
    return True


def _cache_file_ok(ctx, path: Path) -> bool:
    """A cached latent / prompt embedding exists and its bytes are the ones written (else it is removed)."""
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        return False
    try:
        want = side.read_text("utf-8").strip()
    except OSError:
        want = None
    if want is None:  # written by storyc <= 0.1.0: keep it if it reads as safetensors, and record it
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
            side.write_text(ctx.hasher.file(path) + "\n", "utf-8")
            return True
        except Exception:  # noqa: BLE001 - any unreadable file is rebuilt
            want = "unreadable"
    if ctx.hasher.file(path) == want:
        return True
    ctx.report.line(f"warning: cache file {path.parent.name}/{path.name[:12]}… is corrupt; encoding it again")
    path.unlink(missing_ok=True)
    side.unlink(missing_ok=True)
    return False


def _legacy_key(ctx, cfg: TrainConfig) -> str:
    """The cache key storyc <= 0.1.0 (before the stage registry) gave the same training: it hashed the execution
    settings too. Entries under it are taken over once instead of retraining."""
    train = {**cfg.train, **{k: v for k, v in cfg.settings.items() if k != "tensorboard"}}  # newer than 0.1.0
    if train.get("gradient_checkpointing") == "auto":  # `auto` is new: an old spec that left it out had true
        train["gradient_checkpointing"] = True
    params = {"lora": cfg.lora, "train": train, "models": cfg.models}
    return _key(ctx, digest({"stage": "train", "version": 1, "params": params}))


def _adopt_legacy(ctx, cfg: TrainConfig, key: str, final: Path) -> bool:
    old = final.with_name(_legacy_key(ctx, cfg))
    if final.exists() or not (old / "DONE").exists():
        return False
    work = final.with_name(key + ".adopt.partial")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(old, work)
    rep = json.loads((work / "train_report.json").read_text("utf-8"))
    rep["train"] = cfg.train  # the report holds the hashed values only now
    atomic_write(work / "train_report.json", canonical_json(rep))
    _seal(ctx, work, key)
    work.rename(final)
    ctx.report.info(f"     took over the LoRA trained by an earlier storyc (cache entry {old.name[:12]})")
    return True


def output_names(story_id: str, cfg: TrainConfig) -> dict:
    """format -> file name in build/<id>/lora/ (the cache names them by format alone)."""
    fmts = ["diffsynth"] + [f for f in cfg.formats if f != "diffsynth"]
    return {f: f"{story_id}.{f}.safetensors" for f in fmts}


def run(ctx, jobs):
    """The recipe: config from the slice -> (cached) train -> export the requested formats into the build."""
    job, = jobs
    cfg = TrainConfig.from_job(job)
    ctx.model("kolors"), ctx.model("vae")  # build/download/check before fingerprinting
    key = train_key(ctx, cfg)
    final = ctx.cache_dir / "train" / key
    # one trainer per cache entry: a second story training the same LoRA waits, then reuses it
    with exclusive(final.with_name(key + ".lock"), f"the training of cache entry {key[:12]}", wait=True,
                   on_wait=lambda who: ctx.report.line(f"     waiting for another storyc process{who}, which is "
                                                       f"training the same LoRA (cache entry {key[:12]})")):
        _adopt_legacy(ctx, cfg, key, final)
        if job.name in ctx.forced and final.exists():
            ctx.report.info(f"     --force train: retraining (replacing cache entry {key[:12]})")
            shutil.rmtree(final)
        reused = (final / "DONE").exists() and _entry_ok(ctx, final)
        if not reused:
            work = final.with_name(key + ".partial")
            work.mkdir(parents=True, exist_ok=True)
            train(ctx, cfg, work)
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
            _seal(ctx, work, key)
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
    out = ctx.path("lora")
    out.mkdir(parents=True, exist_ok=True)
    copies = {f"{fmt}.safetensors": name for fmt, name in output_names(ctx.story.id, cfg).items()}
    copies.update({"train_log.csv": "train_log.csv", "train_report.json": "train_report.json"})
    if cfg.preview:  # each checkpoint's LoRA and preview strip, and the choice
        copies["checkpoints.json"] = "checkpoints.json"
        for f in sorted((final / "previews").glob("step-*")):
            copies[f"previews/{f.name}"] = f"checkpoints/{f.name}"
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # no strips of an earlier run beside this one's
    if cfg.preview:
        (out / "checkpoints").mkdir()
    for src, dst in copies.items():
        tmp = (out / dst).with_name(f".{Path(dst).name}.tmp")
        shutil.copyfile(final / src, tmp)
        tmp.replace(out / dst)
    rep = json.loads((final / "train_report.json").read_text("utf-8"))
    facts = {"cache_key": key, "final_loss": rep.get("final_loss")}
    if cfg.preview:  # every checkpoint's scores, and the one the story uses
        ck = json.loads((final / "checkpoints.json").read_text("utf-8"))
        facts["checkpoints"] = {str(c["step"]): {"mean_aesthetic": c["mean"], "style_coherence": c["coherence"]}
                                for c in ck["checkpoints"]}
        facts["selected_step"] = ck["selected"]
    try:  # the memory plan the LoRA was trained under (kept in the cache entry, so a reuse reports the same)
        facts["memory"] = json.loads((final / "memory_plan.json").read_text("utf-8"))
    except (OSError, ValueError):
        pass
    yield Result("train", [f"lora/{f}" for f in copies.values()], facts)
    return f"reused cached LoRA {key[:12]}" if reused else f"trained {rep['steps']} steps, loss {rep['final_loss']:.4f}"


# ---------------------------------------------------------------- training

def train(ctx, cfg: TrainConfig, work: Path):
    """setup (resources, cached data) -> fit -> export, into the cache entry's work folder."""
    res = resources.for_train(ctx.device, cfg["precision"], cfg["batch_size"])
    if res.note:
        ctx.report.line(f"warning: {res.note}")
    kolors, vae = ctx.model("kolors"), ctx.model("vae")
    t0 = time.monotonic()
    data = cache_pass(ctx, cfg, kolors, vae, res.device, res.torch_dtype())
    cache_s = time.monotonic() - t0
    ctx.report.info(f"     cache: {data['n_images']} latents, {len(data['texts'])} prompt embeddings "
                    f"({data['encoded_images']} images and {data['encoded_texts']} prompts encoded now) in {cache_s:.1f}s")
    previews = None
    if cfg.preview:
        from .generate import encode_all

        t = time.monotonic()
        items = [{"prompt": s["prompt"], "negative_prompt": s["negative_prompt"]} for s in cfg.preview["scenes"]]
        previews = {"table": encode_all(kolors, items, cfg.preview["cfg_scale"], res.torch_dtype(), res.device),
                    "kolors": kolors, "aesthetic": ctx.model("aesthetic")}
        ctx.metric("train.preview_encode_s", time.monotonic() - t)
    t1 = time.monotonic()
    steps, final_loss = fit(ctx, cfg, work, kolors, data, res, previews)
    train_s = time.monotonic() - t1
    ctx.metric("train.cache_pass_s", cache_s)
    ctx.metric("train.fit_s", train_s)  # UNet load, CUDA-graph capture and every step
    ctx.metric("train.steps", steps)
    import math

    if final_loss is None or not math.isfinite(final_loss):
        raise StageError("train", f"training diverged: the loss is {final_loss} after {steps} steps (the LoRA would be "
                         "NaN and every image black)", "lower `train.learning_rate`, or use `precision: bf16-mixed`")
    if cfg.preview:  # the checkpoint the story uses: the last, or the one whose previews scored best
        from .previews import load_records, select

        records = load_records(work / "previews")
        chosen = select(records, cfg["select"])
        shutil.copyfile(work / "previews" / f"step-{chosen}.safetensors", work / "lora.tmp.safetensors")
        atomic_write(work / "checkpoints.json", canonical_json({
            "format": "storyc.checkpoints/1", "select": cfg["select"], "selected": chosen,
            "checkpoints": [records[k] for k in sorted(records, key=int)]}))
        ctx.report.info(f"     checkpoint: step {chosen} ({cfg['select']}), mean aesthetic {records[str(chosen)]['mean']:.3f}")
    export(cfg, work, kolors)
    # the hashed slice only: execution settings must not change the outputs' bytes
    atomic_write(work / "train_report.json", canonical_json({
        "format": "storyc.train_report/1", "steps": steps, "final_loss": final_loss, "device": res.device,
        "precision": res.precision, "lora": cfg.lora, "train": cfg.train, "images": data["n_images"],
        "encoded_images": data["encoded_images"], "encoded_texts": data["encoded_texts"]}))
    # timings go to the console, not into outputs: outputs must be byte-identical run to run
    ctx.report.info(f"     cache pass {cache_s:.1f}s, training {train_s:.1f}s ({steps / max(train_s, 1e-9):.2f} steps/s)")


def _load_image(path: Path, w: int, h: int, center_crop: bool):
    """The image as diffsynth's TextImageDataset prepares it (resize to cover, then crop), in [-1, 1]."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    image = Image.open(path).convert("RGB")
    iw, ih = image.size
    scale = max(w / iw, h / ih)
    image = torchvision.transforms.functional.resize(image, [round(ih * scale), round(iw * scale)],
                                                     interpolation=transforms.InterpolationMode.BILINEAR)
    if center_crop:
        image = transforms.CenterCrop((h, w))(image)
    t = transforms.Normalize([0.5], [0.5])(transforms.ToTensor()(image))
    return t.unsqueeze(0).to(torch.float32)


def _buckets(cfg: TrainConfig, train_dir: Path, rows: list) -> dict | None:
    """train.buckets: file name -> its bucket's (width, height), from the image's own size."""
    if not cfg["buckets"]:
        return None
    from PIL import Image

    from ..buckets import assign, bucket_sizes

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
    root = ctx.cache_dir
    vae_fp, kolors_fp = ctx.fingerprint("vae"), ctx.fingerprint("kolors")
    lat_keys, lat_missing, sizes, seen = [], [], [], set()
    buckets = _buckets(cfg, train_dir, rows)
    for r in rows:
        bw, bh = buckets[r["file_name"]] if buckets else (w, h)  # a bucket's latent is centre-cropped to it
        crop = True if buckets else tr["center_crop"]
        k = digest({"v": CACHE_VERSION, "image": ctx.hasher.file(train_dir / r["file_name"]), "size": [bw, bh],
                    "center_crop": crop, "flip": tr["random_flip"], "vae": vae_fp, "dtype": str(dtype)})
        lat_keys.append(k)
        sizes.append((bw, bh))
        if k not in seen and not _cache_file_ok(ctx, root / "latents" / f"{k}.safetensors"):
            lat_missing.append((r, k, (bw, bh), crop))  # a repeated row (dataset repeats) is encoded once
        seen.add(k)
    texts = sorted({r["text"] for r in rows} | ({""} if cfg["caption_dropout"] else set()))  # "": dropped captions
    txt_keys = {t: digest({"v": CACHE_VERSION, "text": t, "kolors": kolors_fp, "dtype": str(dtype)}) for t in texts}
    txt_missing = [t for t in texts if not _cache_file_ok(ctx, root / "text" / f"{txt_keys[t]}.safetensors")]

    if lat_missing:
        from ..models.kolors import load_vae

        enc = load_vae(vae / "diffusion_pytorch_model.safetensors" if vae.is_dir() else vae, "encoder", dtype, device)
        with torch.no_grad():
            for i, (r, k, (bw, bh), crop) in enumerate(lat_missing):
                img = _load_image(train_dir / r["file_name"], bw, bh, crop).to(device, dtype)
                out = {"latent": enc(img).to("cpu", torch.float16).contiguous()}
                if tr["random_flip"]:
                    out["latent_flip"] = enc(torch.flip(img, dims=[3])).to("cpu", torch.float16).contiguous()
                _save_atomic(ctx, save_file, out, root / "latents" / f"{k}.safetensors")
                ctx.report.update(i + 1, len(lat_missing), "encoding images")
        del enc
    if txt_missing:
        import contextlib
        import io

        from diffsynth import ModelManager
        from diffsynth.models.kolors_text_encoder import ChatGLMModel
        from diffsynth.prompters import KolorsPrompter

        mm = ModelManager(torch_dtype=dtype, device=device)
        with contextlib.redirect_stdout(io.StringIO()):
            mm.load_model_from_huggingface_folder(str(kolors / "text_encoder"), ["kolors_text_encoder"], [ChatGLMModel])
        prompter = KolorsPrompter()
        with contextlib.redirect_stdout(io.StringIO()):
            prompter.fetch_models(mm.fetch_model("kolors_text_encoder"))
        with torch.no_grad():
            for t in txt_missing:
                pooled, emb = prompter.encode_prompt(t, device=device, positive=True)
                _save_atomic(ctx, save_file, {"encoder_hidden_states": emb.to("cpu", torch.float16).contiguous(),
                                         "add_text_embeds": pooled.to("cpu", torch.float16).contiguous()},
                             root / "text" / f"{txt_keys[t]}.safetensors")
        del mm, prompter
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the text encoder and VAE are gone before the UNet trains

    latents = [load_file(str(root / "latents" / f"{k}.safetensors")) for k in lat_keys]
    emb = {t: load_file(str(root / "text" / f"{txt_keys[t]}.safetensors")) for t in texts}
    out = {"latents": latents, "texts": texts, "text_of": [texts.index(r["text"]) for r in rows], "emb": emb,
           "n_images": len(rows), "encoded_images": len(lat_missing), "encoded_texts": len(txt_missing),
           "size": (w, h)}
    if buckets:  # which rows share a latent size: a batch is drawn from one of them
        used = sorted(set(sizes))
        out["buckets"] = used
        out["bucket_of"] = [used.index(sz) for sz in sizes]
    return out


def _save_atomic(ctx, save_file, tensors, path: Path):
    """Write a cache file and, beside it, the digest it is checked against before every use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    sha = sha256_file(tmp)
    tmp.replace(path)
    atomic_write(path.with_name(path.name + ".sha256"), sha + "\n")


def fit(ctx, cfg: TrainConfig, work: Path, kolors: Path, data: dict, res, previews=None) -> tuple[int, float]:
    """Train the LoRA with Lightning; resume from work/checkpoints/last.ckpt when present.

    With ``strategy: ddp`` and several devices, Lightning's ddp_spawn runs one process per device; each builds its
    own UNet (``LoRAModule.configure_model``), rank 0 writes the LoRA and the fit result, this process reads them.
    """
    import lightning as L

    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    accel = "gpu" if res.cuda else "cpu"
    strategy, devices, world = setup_strategy(cfg, accel)
    export_file, result = work / "lora.tmp.safetensors", work / "fit_result.json"
    for f in (export_file, result):
        f.unlink(missing_ok=True)
    free = resources.free_gib(res.device)
    mem = resources.plan_train(free, cfg["gradient_checkpointing"], cfg["cuda_graphs"], cfg["batch_size"],
                               *cfg.size, world)
    ctx.report.info(f"     memory: {mem.reason}; CUDA graphs {'on' if mem.cuda_graphs else 'off'}")
    atomic_write(work / "memory_plan.json", canonical_json(
        {"gradient_checkpointing": mem.gradient_checkpointing, "cuda_graphs": mem.cuda_graphs}))
    module = setup_module(cfg, kolors, data, res, export_file, mem)
    resume = _resume_point(ctx, work / "checkpoints" / "last.ckpt")
    total = cfg.optimizer_steps(world)
    if world > 1:
        ctx.report.info(f"     {strategy} on {world} {'GPUs' if accel == 'gpu' else 'CPU processes'}: "
                        f"{total} optimizer steps of {world} x {cfg['batch_size']} images")
    trainer = setup_trainer(cfg, accel, devices, strategy, res.precision, total,
                            setup_callbacks(ctx, cfg, work, result, total, resume is not None, previews), work,
                            setup_logger(ctx, cfg, resume is not None))
    loader = setup_data(cfg, data, module)  # the module's own config (with the memory plan) drives sampling
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its own clean-up
        if trainer.interrupted:
            import signal

            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning set it to ignore
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    if not export_file.exists() or not result.exists():
        _export_from_checkpoint(work, total, export_file, result, cfg)
    out = json.loads(result.read_text("utf-8"))
    if out.get("s_per_step"):
        ctx.metric("train.s_per_step", out["s_per_step"])
    return int(out["steps"]), out["final_loss"]


def _export_from_checkpoint(work: Path, total: int, export_file: Path, result: Path, cfg: TrainConfig) -> None:
    """A run stopped after its last step but before the LoRA was written (a kill at the very end): the last
    checkpoint holds the finished LoRA, so write it from there instead of failing on every later build."""
    import torch

    from .. import lora as lora_mod

    from .lightning_lora import load_sealed

    last = work / "checkpoints" / "last.ckpt"
    try:
        ckpt = load_sealed(last) if last.exists() else {}
    except ValueError:
        ckpt = {}
    if int(ckpt.get("global_step", -1)) < total:
        raise StageError("train", "training ended without writing the LoRA (a rank failed?)",
                         "run the same command again: training resumes from its last checkpoint")
    state = {k.removeprefix("unet."): v.to(torch.float32).contiguous() for k, v in ckpt["state_dict"].items()
             if ".lora_" in k}
    lora_mod.save(export_file, state, {"rank": cfg.lora["rank"], "alpha": cfg.lora["alpha"]})
    loss = None
    log = work / "train_log.csv"
    if log.exists():
        rows = [ln.split(",") for ln in log.read_text("utf-8").splitlines()[1:] if ln.strip()]
        loss = float(rows[-1][1]) if rows else None
    atomic_write(result, json.dumps({"steps": int(ckpt["global_step"]), "final_loss": loss, "world_size": 1}))


def setup_module(cfg: TrainConfig, kolors: Path, data: dict, res, export_file: Path, mem=None):
    """The UNet (loaded per process) with a LoRA, the objective and the optimizer: lightning_lora.LoRAModule."""
    import functools

    from ..models.kolors import load_unet_for
    from .lightning_lora import LoRAModule

    loader = functools.partial(load_unet_for, kolors, res.torch_dtype(), "cpu")
    train = cfg.module_config()
    if mem is not None:  # the memory plan's decisions replace `auto`
        train.update(gradient_checkpointing=mem.gradient_checkpointing, cuda_graphs=mem.cuda_graphs)
    return LoRAModule(loader, data, lora=cfg.lora, train=train, export=export_file)


def setup_data(cfg: TrainConfig, data: dict, module):
    """The loader: global sample indices in micro-batches, resumable from the module's progress."""
    from .lightning_lora import make_loader

    return make_loader(data, module.cfg, cfg.micro_batches, module, cfg["num_workers"])


def setup_callbacks(ctx, cfg: TrainConfig, work: Path, result: Path, total: int, resumed: bool,
                    previews: dict | None = None) -> list:
    """Checkpoints every ``checkpoint_every`` steps, storyc's log/progress, the story previews."""
    import lightning as L

    from .lightning_lora import StoryCallbacks

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=work / "checkpoints", filename="step-{step}",
                                               every_n_train_steps=cfg["checkpoint_every"], save_last=True,
                                               save_top_k=0, save_on_train_epoch_end=False)
    out = [ckpt, StoryCallbacks(ctx.report, work / "train_log.csv", result, total, resumed)]
    if cfg["tensorboard"] and _tensorboard_available():
        out.append(L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"))
    if previews is not None:
        from .previews import StoryPreviews

        if not resumed:
            shutil.rmtree(work / "previews", ignore_errors=True)
        out.append(StoryPreviews(cfg.preview, cfg["preview_every"], total, previews["table"], previews["kolors"],
                                 previews["aesthetic"], work / "previews", ctx.report))
    return out


def _tensorboard_available() -> bool:
    from importlib.util import find_spec

    return find_spec("tensorboard") is not None or find_spec("tensorboardX") is not None


def setup_logger(ctx, cfg: TrainConfig, resumed: bool):
    """Lightning's TensorBoard logger in build/<story>/train/logs/ (`tensorboard --logdir` that folder): this
    run's curves only (a resumed run continues its own)."""
    import shutil

    if not cfg["tensorboard"]:
        return False
    if not resumed:
        shutil.rmtree(ctx.path("train/logs"), ignore_errors=True)
    if not _tensorboard_available():
        ctx.report.line("warning: train.tensorboard is on but the tensorboard package is missing; not logging")
        return False
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(ctx.path("train")), name="logs", version="", default_hp_metric=False)


def setup_trainer(cfg: TrainConfig, accel, devices, strategy, precision, total: int, callbacks: list, work: Path,
                  logger=False):
    import logging

    import lightning as L

    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning resets these to INFO on import
        logging.getLogger(name).setLevel(logging.ERROR)
    from .lightning_lora import SealedCheckpointIO

    return L.Trainer(accelerator=accel, devices=devices, strategy=strategy, precision=precision, max_epochs=1,
                     plugins=[SealedCheckpointIO()],
                     max_steps=total, accumulate_grad_batches=cfg["accumulate_grad_batches"], callbacks=callbacks,
                     logger=logger, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(work), deterministic=False, use_distributed_sampler=False)


def _resume_point(ctx, last: Path) -> str | None:
    """The checkpoint to resume from: only one this storyc sealed, whose bytes match the seal, loaded as plain
    data (never pickle code). Anything else is removed and training starts over, with a warning."""
    from .lightning_lora import load_sealed, seal_path

    if not last.exists():
        return None
    try:
        load_sealed(last)
        return str(last)
    except Exception as e:  # noqa: BLE001 - unsealed, corrupt, cut off or not plain data: never trusted
        why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {str(e)[:120]}"
        ctx.report.line(f"warning: checkpoint {last.parent.parent.name[:12]}…/{last.name} not used ({why}); "
                        "training from step 0")
        last.unlink(missing_ok=True)
        seal_path(last).unlink(missing_ok=True)
        return None


def setup_strategy(cfg: TrainConfig, accel: str):
    """(Lightning strategy, devices, world size) for train.strategy / train.devices."""
    import torch

    strategy, devices = cfg["strategy"], cfg["devices"]
    if strategy.startswith("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise StageError("train", f"train.strategy {strategy} needs the deepspeed package, which is not installed",
                             "pip install deepspeed, or use strategy ddp (one process per GPU) or auto")
    if accel == "cpu":  # on the CPU only ddp runs several processes (how the tests check DDP without GPUs)
        n = devices if isinstance(devices, int) and strategy == "ddp" else 1
        return ("ddp_spawn" if n > 1 else "auto"), n, n
    world = cfg.world_size(torch.cuda.device_count())
    if devices == "auto":
        devices = world
    if strategy == "ddp":
        strategy = "ddp_spawn"  # a plain ddp launcher would re-run the whole storyc command in every rank
    elif strategy == "auto" and world > 1:
        strategy = "ddp_spawn"
    return strategy, devices, world


def export(cfg: TrainConfig, work: Path, kolors: Path):
    """Every LoRA format into the cache entry (stories sharing the entry may ship any of them)."""
    from .. import lora as L

    lo = cfg.lora
    state, _ = L.load(work / "lora.tmp.safetensors")
    unet_file = kolors / "unet" / "diffusion_pytorch_model.safetensors"
    for fmt in FORMATS:
        if fmt == "diffsynth":
            tensors = state
        elif fmt == "diffusers":
            tensors = L.to_diffusers(state, lo["rank"], lo["alpha"], unet_file)
        else:
            tensors = L.to_kohya(state, lo["rank"], lo["alpha"], unet_file)
        L.save(work / f"{fmt}.safetensors", tensors,
               L.metadata(lo["rank"], lo["alpha"], cfg.models["kolors"], fmt, lo["target_modules"]))
    (work / "lora.tmp.safetensors").unlink()
