"""The training recipe, top to bottom: ``train`` = setup (resources, the cache pass, the preview prompts) ->
``fit`` (module, data, callbacks, logger, trainer; resumes from a sealed checkpoint) -> ``export`` (every LoRA
format into the cache entry's work folder). Every device, precision and memory choice comes from ``resources``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ... import resources
from ...errors import StageError
from ...model import select_text
from ...render import atomic_write, canonical_json
from .config import TrainConfig
from .data import cache_pass

FORMATS = ("diffsynth", "diffusers", "kohya")  # the cache holds all three: stories sharing it may ship any


# ---------------------------------------------------------------- training

def train(ctx, cfg: TrainConfig, work: Path, node: int = 0, leader: Path | None = None):
    """setup (resources, cached data) -> fit -> export, into the cache entry's work folder. ``node`` > 0: this
    machine joins node 0's run (train.num_nodes), resuming from ``leader``'s checkpoint when it has one; node 0
    alone exports."""
    res = resources.for_train(ctx.device, cfg.train.precision, cfg.train.batch_size)
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
        from ..generate import encode_all

        t = time.monotonic()
        items = [{"prompt": s["prompt"], "negative_prompt": s["negative_prompt"]} for s in cfg.preview["scenes"]]
        table = encode_all(kolors, items, cfg.preview["cfg_scale"], res.torch_dtype(), res.device, ctx)
        previews = {"table": table, "kolors": kolors, "aesthetic": ctx.model("aesthetic"), "root": ctx.story.root,
                    "ip_adapter": ctx.model("ip_adapter") if "ip_adapter" in cfg.preview else None,
                    "measures": {"clip_zh": ctx.model("clip_zh") if "clip_zh" in cfg.preview else None,
                                 "dreamsim": ctx.model("dreamsim") if "dreamsim" in cfg.preview else None,
                                 "preference": {k: ctx.model(k) for k in cfg.preview.get("preference", ())}}}
        ctx.metric("train.preview_encode_s", time.monotonic() - t)
    t1 = time.monotonic()
    steps, final_loss = fit(ctx, cfg, work, kolors, data, res, previews, node, leader)
    if node:
        ctx.report.info(f"     node {node} of {cfg.train.num_nodes}: trained with node 0, which writes the LoRA")
        return
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
        chosen = select(records, cfg.train.select)
        shutil.copyfile(work / "previews" / f"step-{chosen}.safetensors", work / "lora.tmp.safetensors")
        atomic_write(work / "checkpoints.json", canonical_json({
            "format": "storyc.checkpoints/1", "select": cfg.train.select, "selected": chosen,
            "checkpoints": [records[k] for k in sorted(records, key=int)]}))
        ctx.report.info(f"     checkpoint: step {chosen} ({select_text(cfg.train.select)}), mean aesthetic "
                        f"{records[str(chosen)]['mean']:.3f}")
    report = {"format": "storyc.train_report/1", "steps": steps, "final_loss": final_loss, "device": res.device,
              "precision": res.precision, "lora": cfg.slice["lora"], "train": cfg.slice["train"],
              "images": data["n_images"], "encoded_images": data["encoded_images"],
              "encoded_texts": data["encoded_texts"]}
    if cfg.train.validation:
        report["held_out"] = data["held_out"]
        report["validation"] = _val_history(work / "val_log.csv")
    if cfg.train.stop:
        from .validation import read_stop

        stop = read_stop(work / "stop")
        if stop is not None:  # the best measured weights are what the story uses
            shutil.copyfile(work / "stop" / "best.safetensors", work / "lora.tmp.safetensors")
            report["stop"] = stop
            ctx.report.info(f"     exported the best checkpoint by {stop['metric']}: step {stop['best_step']} "
                            f"({stop['why']})")
    export(cfg, work, kolors)
    # the hashed slice only: execution settings must not change the outputs' bytes
    atomic_write(work / "train_report.json", canonical_json(report))
    # timings go to the console, not into outputs: outputs must be byte-identical run to run
    ctx.report.info(f"     cache pass {cache_s:.1f}s, training {train_s:.1f}s ({steps / max(train_s, 1e-9):.2f} steps/s)")


def _val_history(log: Path) -> list:
    if not log.exists():
        return []
    return [[int(a), float(b)] for a, b in (ln.split(",") for ln in log.read_text("utf-8").splitlines()[1:] if ln)]


def fit(ctx, cfg: TrainConfig, work: Path, kolors: Path, data: dict, res, previews=None, node: int = 0,
        leader: Path | None = None) -> tuple[int, float]:
    """Train the LoRA with Lightning; resume from work/checkpoints/last.ckpt when present.

    With ``strategy: ddp`` and several devices, Lightning's ddp_spawn runs one process per device; each builds its
    own UNet (``LoRAModule.configure_model``), rank 0 writes the LoRA and the fit result, this process reads them.
    """
    import lightning as L

    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    accel = "gpu" if res.cuda else "cpu"
    strategy, devices, world = setup_strategy(cfg, accel)
    export_file, result = work / "lora.tmp.safetensors", work / "fit_result.json"
    for f in (export_file, result):
        f.unlink(missing_ok=True)
    free = resources.free_gib(res.device)
    mem = resources.plan_train(free, cfg.train.gradient_checkpointing, cfg.train.cuda_graphs, cfg.train.batch_size,
                               *cfg.size, world, adapter=cfg.lora.type)
    ctx.report.info(f"     memory: {mem.reason}; CUDA graphs {'on' if mem.cuda_graphs else 'off'}")
    atomic_write(work / "memory_plan.json", canonical_json(
        {"gradient_checkpointing": mem.gradient_checkpointing, "cuda_graphs": mem.cuda_graphs}))
    module = setup_module(cfg, kolors, data, res, export_file, mem)
    resume = _resume_point(ctx, (leader or work) / "checkpoints" / "last.ckpt", remove=not node)
    total = cfg.optimizer_steps(world)
    if world > 1:
        ctx.report.info(f"     {strategy} on {world} {'GPUs' if accel == 'gpu' else 'CPU processes'}: "
                        f"{total} optimizer steps of {world} x {cfg.train.batch_size} images")
    trainer = setup_trainer(cfg, accel, devices, strategy, res.precision, total,
                            setup_callbacks(ctx, cfg, work, result, total, resume is not None, previews), work,
                            setup_logger(ctx, cfg, resume is not None))
    loader = setup_data(cfg, data, module)  # the module's own config (with the memory plan) drives sampling
    t_fit = time.monotonic()
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
    if node:  # global rank 0 (on node 0) wrote the LoRA and the fit result
        return total, None
    if not export_file.exists() or not result.exists():
        _export_from_checkpoint(work, total, export_file, result, cfg)
    out = json.loads(result.read_text("utf-8"))
    if out.get("s_per_step"):
        ctx.metric("train.s_per_step", out["s_per_step"])
    m = out.get("marks") or {}
    if all(m.get(k) for k in ("train_start", "first_step_end", "last_step_end", "train_end")):
        ctx.metric("train.fit_setup_s", m["train_start"] - t_fit)  # Lightning's set-up, the UNet's load and move
        ctx.metric("train.first_step_s", m["first_step_end"] - m["train_start"])  # CUDA-graph capture
        ctx.metric("train.steps_s", m["last_step_end"] - m["first_step_end"])
        ctx.metric("train.fit_end_s", time.monotonic() - m["last_step_end"])  # export, Lightning's teardown
    return int(out["steps"]), out["final_loss"]


def _export_from_checkpoint(work: Path, total: int, export_file: Path, result: Path, cfg: TrainConfig) -> None:
    """A run stopped after its last step but before the LoRA was written (a kill at the very end): the last
    checkpoint holds the finished LoRA, so write it from there instead of failing on every later build."""
    import torch

    from ... import lora as lora_mod
    from .callbacks import load_sealed

    last = work / "checkpoints" / "last.ckpt"
    try:
        ckpt = load_sealed(last) if last.exists() else {}
    except ValueError:
        ckpt = {}
    if int(ckpt.get("global_step", -1)) < total:
        raise StageError("train", "training ended without writing the LoRA (a rank failed?)",
                         "run the same command again: training resumes from its last checkpoint")
    state = {k.removeprefix("unet."): v.to(torch.float32).contiguous() for k, v in ckpt["state_dict"].items()
             if lora_mod.is_adapter_key(k)}
    ema = next((s["weights"] for k, s in (ckpt.get("callbacks") or {}).items() if k.startswith("EMA")), None)
    if ema is not None:  # train.ema: what is exported is the average, in the trained tensors' order
        state = {k: w.to(torch.float32).contiguous() for k, w in zip(state, ema)}
    lora_mod.save(export_file, state, {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha})
    loss = None
    log = work / "train_log.csv"
    if log.exists():
        rows = [ln.split(",") for ln in log.read_text("utf-8").splitlines()[1:] if ln.strip()]
        loss = float(rows[-1][1]) if rows else None
    atomic_write(result, json.dumps({"steps": int(ckpt["global_step"]), "final_loss": loss, "world_size": 1}))


def setup_module(cfg: TrainConfig, kolors: Path, data: dict, res, export_file: Path, mem=None):
    """The UNet (loaded per process) with a LoRA, the objective and the optimizer: module.LoRAModule."""
    import dataclasses
    import functools

    from ...models.kolors import load_unet_for
    from .module import LoRAModule

    loader = functools.partial(load_unet_for, kolors, res.torch_dtype(), "cpu")
    train = cfg.train
    if mem is not None:  # the memory plan's decisions replace `auto`
        train = dataclasses.replace(train, gradient_checkpointing=mem.gradient_checkpointing,
                                    cuda_graphs=mem.cuda_graphs)
    return LoRAModule(loader, data, lora=cfg.lora, train=train, export=export_file)


def setup_data(cfg: TrainConfig, data: dict, module):
    """The loader: global sample indices in micro-batches, resumable from the module's progress."""
    from .data import make_loader

    return make_loader(data, module.cfg, cfg.micro_batches, module, cfg.train.num_workers)


def setup_callbacks(ctx, cfg: TrainConfig, work: Path, result: Path, total: int, resumed: bool,
                    previews: dict | None = None) -> list:
    """storyc's log/progress, the EMA (train.ema), the story previews, checkpoints every ``checkpoint_every``
    steps. In this order: a preview at step N renders the EMA through step N, and Lightning runs the checkpoint
    last, so a checkpoint holds everything of its step."""
    import lightning as L

    from .callbacks import EMA, StoryCallbacks

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=work / "checkpoints", filename="step-{step}",
                                               every_n_train_steps=cfg.train.checkpoint_every, save_last=True,
                                               save_top_k=0, save_on_train_epoch_end=False)
    out = [StoryCallbacks(ctx.report, work / "train_log.csv", result, total, resumed)]  # loss and LR logging
    if cfg.train.ema:
        out.append(EMA(cfg.train.ema))
    story = None
    if previews is not None:
        from .previews import StoryPreviews

        if not resumed:
            shutil.rmtree(work / "previews", ignore_errors=True)
        story = StoryPreviews(cfg.preview, cfg.train.preview_every, total, previews["table"], previews["kolors"],
                              previews["aesthetic"], work / "previews", ctx.report, previews["ip_adapter"],
                              previews["root"], previews["measures"])
        out.append(story)
    if cfg.train.validation or cfg.train.stop:
        from .validation import EarlyStop, Validation

        if not resumed:
            shutil.rmtree(work / "stop", ignore_errors=True)
        val = Validation(cfg.train.validation, total, work / "val_log.csv", ctx.report) if cfg.train.validation else None
        out += [val] if val else []
        if cfg.train.stop:  # after what it reads (the validation, the previews) at the same step
            source = val if cfg.train.stop["metric"] == "val_loss" else story
            out.append(EarlyStop(cfg.train.stop, source, work / "stop", ctx.report,
                                 {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha}))
    return out + [ckpt]


def _tensorboard_available() -> bool:
    from importlib.util import find_spec

    return find_spec("tensorboard") is not None or find_spec("tensorboardX") is not None


def setup_logger(ctx, cfg: TrainConfig, resumed: bool):
    """Lightning's TensorBoard logger in build/<story>/train/logs/ (`tensorboard --logdir` that folder): this
    run's curves only (a resumed run continues its own)."""
    import shutil

    if not cfg.train.tensorboard:
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
    from .callbacks import SealedCheckpointIO

    return L.Trainer(accelerator=accel, devices=devices, num_nodes=cfg.train.num_nodes, strategy=strategy,
                     precision=precision, max_epochs=1,
                     plugins=[SealedCheckpointIO()],
                     max_steps=total, accumulate_grad_batches=cfg.train.accumulate_grad_batches, callbacks=callbacks,
                     logger=logger, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(work), deterministic=False, use_distributed_sampler=False)


def _resume_point(ctx, last: Path, remove: bool = True) -> str | None:
    """The checkpoint to resume from: only one this storyc sealed, whose bytes match the seal, loaded as plain
    data (never pickle code). Anything else is removed and training starts over, with a warning."""
    from .callbacks import load_sealed, seal_path

    if not last.exists():
        return None
    try:
        load_sealed(last)
        return str(last)
    except Exception as e:  # noqa: BLE001 - unsealed, corrupt, cut off or not plain data: never trusted
        why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {str(e)[:120]}"
        ctx.report.line(f"warning: checkpoint {last.parent.parent.name[:12]}…/{last.name} not used ({why}); "
                        "training from step 0")
        if remove:  # (another node's checkpoint is that node's to remove)
            last.unlink(missing_ok=True)
            seal_path(last).unlink(missing_ok=True)
        return None


def setup_strategy(cfg: TrainConfig, accel: str):
    """(Lightning strategy, devices, world size) for train.strategy / train.devices."""
    import torch

    strategy, devices = cfg.train.strategy, cfg.train.devices
    if strategy.startswith("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise StageError("train", f"train.strategy {strategy} needs the deepspeed package, which is not installed",
                             "pip install deepspeed, or use strategy ddp (one process per GPU) or auto")
    nodes = cfg.train.num_nodes
    if accel == "cpu":  # on the CPU only ddp runs several processes (how the tests check DDP without GPUs)
        n = devices if isinstance(devices, int) and strategy == "ddp" else 1
        return ("ddp_spawn" if n > 1 else "ddp" if nodes > 1 else "auto"), n, n * nodes
    world = cfg.world_size(torch.cuda.device_count())
    per_node = world // nodes
    if devices == "auto":
        devices = per_node
    # ddp_spawn starts this node's processes; one process per node needs no launcher (plain ddp): a ddp launcher
    # of several would re-run the whole storyc command in every rank
    if per_node > 1 and strategy in ("ddp", "auto"):
        strategy = "ddp_spawn"
    elif nodes > 1 and strategy in ("ddp", "auto"):
        strategy = "ddp"
    return strategy, devices, world


def export(cfg: TrainConfig, work: Path, kolors: Path):
    """Every LoRA format into the cache entry (stories sharing the entry may ship any of them)."""
    from ... import lora as L

    lo = cfg.lora
    state, _ = L.load(work / "lora.tmp.safetensors")
    unet_file = kolors / "unet" / "diffusion_pytorch_model.safetensors"
    for fmt in FORMATS:
        if fmt == "kohya" and L.is_dora(state):  # no kohya layout holds peft's DoRA (the rules say so)
            continue
        if fmt == "diffsynth":
            tensors = state
        elif fmt == "diffusers":
            tensors = L.to_diffusers(state, lo.rank, lo.alpha, unet_file)
        else:
            tensors = L.to_kohya(state, lo.rank, lo.alpha, unet_file)
        L.save(work / f"{fmt}.safetensors", tensors,
               L.metadata(lo.rank, lo.alpha, cfg.models["kolors"], fmt, list(lo.target_modules), lo.type))
    (work / "lora.tmp.safetensors").unlink()
