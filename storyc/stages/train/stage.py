"""train: Kolors LoRA training with diffsynth's Kolors parts, peft and Lightning, as a recipe
(``config`` -> ``recipe.setup_*`` -> ``recipe.fit`` -> ``recipe.export``).

Same math as diffsynth's ``LightningModelForT2ILoRA`` (the notebook's ``train_kolors_lora.py``): peft LoRA on the
UNet with fp32 adapter weights, 1100-step scheduler, one random timestep per batch, MSE on the scheduler's
training target. What differs is where the time goes:
  1. a cache pass encodes every training image with the VAE and every caption with ChatGLM once (sealed,
     content-addressed under the cache folder, reused by later runs), then releases both models (data.py);
  2. the UNet trains on cached latents and embeddings: no 6B text encoder or VAE in the loop (module.py);
  3. on one GPU the UNet's forward and backward are replayed as CUDA graphs (batch-1 steps are launch-bound);
  4. every per-sample random draw comes from a generator seeded by (seed, sample index), so a resumed run
     draws exactly what an uninterrupted one would, and N DDP ranks draw what one process at N x batch would.
The trained LoRA is a sealed cache entry (cache/train/<key>/): a story with identical data/lora/train slices
reuses it without training.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ... import cache
from ...lock import digest
from ...mutex import exclusive
from ...render import atomic_write, canonical_json
from ..registry import Result
from .config import TrainConfig


def train_key(ctx, cfg: TrainConfig) -> str:
    """The content address of a trained LoRA: what its weights depend on, nothing else (a validation folder's
    images too: early stopping reads their loss, and the run records it)."""
    params = cfg.cache_key_params()
    if "folder" in (cfg.train.validation or {}):  # only then: other keys stay as they were
        params = {**params, "validation_folder": ctx.fingerprint("validation")}
    return _key(ctx, digest(params))


def _key(ctx, params_hash: str) -> str:
    data = ctx.upstream("filter")
    return cache.key(params=params_hash, data=data.digest if data else None, kolors=ctx.fingerprint("kolors"),
                     vae=ctx.fingerprint("vae"))


def _legacy_key(ctx, cfg: TrainConfig) -> str:
    """The cache key storyc <= 0.1.0 (before the stage registry) gave the same training: it hashed the execution
    settings too. A sealed entry under it is taken over once instead of retraining."""
    train = {**cfg.slice["train"], **{k: v for k, v in cfg.train.settings().items() if k != "tensorboard"}}
    if train.get("gradient_checkpointing") == "auto":  # `auto` is new: an old spec that left it out had true
        train["gradient_checkpointing"] = True
    params = {"lora": cfg.slice["lora"], "train": train, "models": cfg.models}
    return _key(ctx, digest({"stage": "train", "version": 1, "params": params}))


def _adopt_legacy(ctx, cfg: TrainConfig, key: str, final: Path) -> bool:
    old = final.with_name(_legacy_key(ctx, cfg))
    if final.exists() or not old.exists() or not cache.entry_ok(old, ctx.report):
        return False
    work = final.with_name(key + ".adopt.partial")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(old, work)
    (work / "DONE").unlink()
    rep = json.loads((work / "train_report.json").read_text("utf-8"))
    rep["train"] = cfg.slice["train"]  # the report holds the hashed values only now
    atomic_write(work / "train_report.json", canonical_json(rep))
    cache.publish_entry(work, final, key)
    ctx.report.info(f"     took over the LoRA trained by an earlier storyc (cache entry {old.name[:12]})")
    return True


def _node(cfg: TrainConfig) -> int:
    """This machine's NODE_RANK when several train together (train.num_nodes), else 0."""
    import os

    if cfg.train.num_nodes == 1:
        return 0
    raw = os.environ.get("NODE_RANK", "")
    if not raw.isdigit() or int(raw) >= cfg.train.num_nodes or not os.environ.get("MASTER_ADDR"):
        from ...errors import StageError

        raise StageError("train", f"train.num_nodes is {cfg.train.num_nodes}: NODE_RANK (0..{cfg.train.num_nodes - 1})"
                         " and MASTER_ADDR / MASTER_PORT (node 0's address) must be set on every node",
                         "e.g. NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 storyc build story.yaml on node 0, "
                         "NODE_RANK=1 ... on node 1 (README: On GPUs)")
    return int(raw)


def output_names(story_id: str, cfg: TrainConfig) -> dict:
    """format -> file name in build/<id>/lora/ (the cache names them by format alone)."""
    fmts = ["diffsynth"] + [f for f in cfg.formats if f != "diffsynth"]
    return {f: f"{story_id}.{f}.safetensors" for f in fmts}


def run(ctx, jobs):
    """Config from the slice -> the sealed cache entry (reused, or trained now) -> the requested formats copied
    into the build."""
    from .recipe import train

    job, = jobs
    cfg = TrainConfig.from_job(job)
    ctx.model("kolors"), ctx.model("vae")  # build/download/check before fingerprinting
    import time

    t = time.monotonic()
    key = train_key(ctx, cfg)
    ctx.metric("train.key_s", time.monotonic() - t)  # fingerprints: the first build on a machine reads the weights
    final = ctx.cache_dir / "train" / key
    node = _node(cfg)
    if node and not cache.entry_ok(final):  # train.num_nodes: join node 0's run; it writes the entry
        work = final.with_name(f"{key}.partial.node{node}")
        work.mkdir(parents=True, exist_ok=True)
        train(ctx, cfg, work, node, leader=final.with_name(key + ".partial"))
        shutil.rmtree(work, ignore_errors=True)
    # one trainer per cache entry: a second story training the same LoRA waits, then reuses it
    with exclusive(final.with_name(key + ".lock"), f"the training of cache entry {key[:12]}", wait=True,
                   on_wait=lambda who: ctx.report.line(f"     waiting for another storyc process{who}, which is "
                                                       f"training the same LoRA (cache entry {key[:12]})")):
        _adopt_legacy(ctx, cfg, key, final)
        if job.name in ctx.forced and final.exists():
            ctx.report.info(f"     --force train: retraining (replacing cache entry {key[:12]})")
            shutil.rmtree(final)
        reused = cache.entry_ok(final, ctx.report)
        if not reused and node:
            from ...errors import StageError

            raise StageError("train", f"node {node}: node 0 has not written the LoRA into the shared cache "
                             f"({ctx.cache_dir})", "every node must see the same cache: --cache DIR on shared "
                             "storage; run the same command on every node again")
        if not reused:
            work = final.with_name(key + ".partial")
            work.mkdir(parents=True, exist_ok=True)
            train(ctx, cfg, work)
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
            cache.publish_entry(work, final, key)
    yield Result("train", _copy_out(ctx, cfg, final), _facts(cfg, final, key))
    rep = json.loads((final / "train_report.json").read_text("utf-8"))
    return f"reused cached LoRA {key[:12]}" if reused else f"trained {rep['steps']} steps, loss {rep['final_loss']:.4f}"


def _copy_out(ctx, cfg: TrainConfig, final: Path) -> list:
    """The entry's files this story ships, into build/<id>/lora/ (each written to a temporary name, then renamed)."""
    out = ctx.path("lora")
    out.mkdir(parents=True, exist_ok=True)
    copies = {f"{fmt}.safetensors": name for fmt, name in output_names(ctx.story.id, cfg).items()}
    copies.update({"train_log.csv": "train_log.csv", "train_report.json": "train_report.json"})
    if cfg.train.validation:  # the held-out loss beside the training loss (report.html draws both)
        copies["val_log.csv"] = "val_log.csv"
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
    return [f"lora/{f}" for f in copies.values()]


def _facts(cfg: TrainConfig, final: Path, key: str) -> dict:
    rep = json.loads((final / "train_report.json").read_text("utf-8"))
    facts = {"cache_key": key, "final_loss": rep.get("final_loss")}
    if cfg.preview:  # every checkpoint's scores, and the one the story uses
        ck = json.loads((final / "checkpoints.json").read_text("utf-8"))
        facts["checkpoints"] = {str(c["step"]): {"mean_aesthetic": c["mean"], "style_coherence": c["coherence"]}
                                for c in ck["checkpoints"]}
        facts["selected_step"] = ck["selected"]
    if "validation" in rep:  # the held-out loss at each measured step
        facts["validation"] = {str(s): v for s, v in rep["validation"]}
    if "stop" in rep:  # train.stop: where it stopped, why, and the step whose weights were exported
        facts["stop"] = rep["stop"]
        facts["steps"] = rep["steps"]
    try:  # the memory plan the LoRA was trained under (kept in the cache entry, so a reuse reports the same)
        facts["memory"] = json.loads((final / "memory_plan.json").read_text("utf-8"))
    except (OSError, ValueError):
        pass
    return facts
