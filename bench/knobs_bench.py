#!/usr/bin/env python3
"""Per-step cost of the training knobs (issue 13, "speed stays") and the cost of story previews.

One process, one GPU. The full-size Kolors UNet (random weights, written in the download layout by
bench/fullsize.py and loaded by storyc's own loader) is trained through storyc's train stage exactly as
`storyc build` sets it up: ``train.setup_module`` (LoRAModule, the UNet loaded per fit by ``load_unet_for``),
``train.setup_trainer`` (Lightning, 16-mixed), ``train.setup_data`` (Samples / GlobalBatches), the memory plan of
``resources.plan_train`` with gradient checkpointing off and CUDA graphs on; the spec is specs/camp.yaml's (rank 16,
alpha 4, to_q/to_k/to_v/to_out, 1024x1024, batch 1). Cached data are synthetic (random latents and embeddings in
the cache pass's structure): speed does not depend on their values.

Variants, each a fresh module + trainer (the UNet is read from disk again for each):
  base, min_snr_gamma=5, noise_offset=0.1, caption_dropout=0.1, ema=0.999, all four together,
  optimizer adamw8bit / prodigy (only where bitsandbytes / prodigyopt import), and base again (run-to-run noise);
  plus ema=0.999 with a bench-only foreach EMA update patched in (what a multi-tensor EMA would cost; not storyc's).
A step is timed from one on_train_batch_start to the next (CUDA synchronised), so it holds everything the loop does:
loader, forward/backward (graph replay), optimizer, the module's EMA hook (which runs after the callbacks' batch end)
and storyc's own StoryCallbacks (loss CSV, progress). s/step = median of --steps steps after --warmup steps (the
first step holds the CUDA-graph capture).

Previews: storyc.stages.train.previews.preview_checkpoint called from inside a base training run (as the StoryPreviews
callback calls it), for the camp story's 8 scenes with a random embedding table keyed like generate.encode_all's:
(a) 1024x1024, 50 steps, cfg 4 (the generation's settings), (b) 512x512, 20 steps; each after a warm-up call at
the same size with 2 steps. Training steps after the previews are timed too (the CUDA graph must still replay).

  python3 bench/knobs_bench.py --tiny        # CPU plumbing check with tiny models under /tmp (not a measurement)
  bash bench/gpu.sh knobs                    # on the GPU machine; KNOBS_ARGS="--steps 20" etc.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
# Optional extra packages for the optimizer variants (bitsandbytes stripped to its CUDA 13 library, prodigyopt),
# carried as an ignored folder: see bench/RESULTS.md. Appended: never shadows the image's or .whl's packages.
if (ROOT / ".knobs_site").is_dir():
    sys.path.append(str(ROOT / ".knobs_site"))

import common  # noqa: E402,F401  (stubs modelscope where the image lacks it)

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--tiny", action="store_true", help="CPU, tiny models, few steps: checks the plumbing only")
ap.add_argument("--steps", type=int, default=30, help="timed steps per variant (after warm-up)")
ap.add_argument("--warmup", type=int, default=6, help="untimed steps first (>= 5: the CUDA-graph capture is step 0)")
ap.add_argument("--models", default=None, help="where the random-weight model folders are written")
ap.add_argument("--only", default="", help="comma list of variants to run (default: all)")
ap.add_argument("--no-previews", action="store_true")
ap.add_argument("--planned", action="store_true", help="gradient checkpointing `auto` (the memory planner decides, "
                "e.g. under STORYC_GPU_MEMORY_GIB=22) instead of off")
ap.add_argument("--preview-reps", default="2,2", help="timed preview calls for (a) 1024/50 and (b) 512/20")
args = ap.parse_args()
if args.tiny:
    args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 2)

import torch  # noqa: E402
import lightning as L  # noqa: E402

from storyc import resources  # noqa: E402
from storyc.progress import Reporter  # noqa: E402
from storyc.spec import load_story  # noqa: E402
from storyc.model import LoRA, plain  # noqa: E402
from storyc.stages.registry import generation_common  # noqa: E402
from storyc.stages.train import callbacks as train_callbacks  # noqa: E402
from storyc.stages.train import recipe as train_stage  # noqa: E402
from storyc.stages.train.callbacks import EMA, StoryCallbacks  # noqa: E402
from storyc.stages.train.config import TrainConfig, train_section  # noqa: E402
from storyc.stages.train.previews import preview_checkpoint  # noqa: E402

TINY = args.tiny
CUDA = not TINY
DEV = "cuda" if CUDA else "cpu"
RES = resources.Resources(DEV, "float16" if CUDA else "float32", precision="16-mixed" if CUDA else "32-true")
DT = RES.torch_dtype()
SIZE = 64 if TINY else 1024  # training resolution (the camp spec's 1024)
MODELS = Path(args.models or ("/tmp/knobs_tiny" if TINY else "/tmp/knobs_models"))
OUT = common.out_dir()
WORK = Path("/tmp/knobs_work")
T0 = time.perf_counter()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


# ---------------------------------------------------------------- model folders (only the parts used)
def write_models() -> tuple[Path, Path, dict]:
    kolors, aesthetic = MODELS / "kolors", MODELS / "aesthetic"
    times = {}
    if TINY:
        from storyc.models import tiny

        tiny.tiny_kolors(kolors)
        tiny.tiny_aesthetic(aesthetic)
        return kolors, aesthetic, times
    import fullsize

    # the kolors folder check wants a text encoder; previews never load it (embeddings come from the table), so a
    # tiny ChatGLM in the same layout stands in for the 12 GB one
    plan = [("kolors/unet", lambda f: fullsize.write_unet(f, "full", "cuda")),
            ("kolors/vae", lambda f: fullsize.write_vae(f, "cuda", "float16")),
            ("kolors/text_encoder", lambda f: fullsize.write_text_encoder(f, "tiny", "cuda")),
            ("aesthetic", lambda f: fullsize.write_aesthetic(f, "full", "cuda"))]
    times.update(fullsize.write_folders(MODELS, plan, "random weights, written by bench/knobs_bench.py"))
    return kolors, aesthetic, times


# ---------------------------------------------------------------- the spec, cached data, embeddings
STORY = load_story(ROOT / "specs" / "camp.yaml")
SPEC = STORY.spec


def unet_dims(kolors: Path) -> tuple[int, int, int]:
    cfg = json.loads((kolors / "unet" / "config.json").read_text("utf-8"))
    ehs = cfg["encoder_hid_dim"]
    ate = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return ehs, ate, (16 if TINY else 256)  # ChatGLM's 256 tokens (KolorsPrompter's max_length)


def make_data(kolors: Path, caption_dropout: bool, n_images: int = 8) -> dict:
    """What train.cache_pass returns: fp16 CPU latents and per-caption embeddings (random values)."""
    dim, pooled, length = unet_dims(kolors)
    g = torch.Generator().manual_seed(0)
    lat = lambda: torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g).to(torch.float16)  # noqa: E731
    captions = [f"二次元，caption {i}" for i in range(n_images)]
    texts = sorted(set(captions) | ({""} if caption_dropout else set()))
    emb = {t: {"encoder_hidden_states": torch.randn((1, length, dim), generator=g).to(torch.float16),
               "add_text_embeds": torch.randn((1, pooled), generator=g).to(torch.float16)} for t in texts}
    return {"latents": [{"latent": lat(), "latent_flip": lat()} for _ in range(n_images)], "texts": texts,
            "text_of": [texts.index(c) for c in captions], "emb": emb, "n_images": n_images, "encoded_images": 0,
            "encoded_texts": 0, "size": (SIZE, SIZE)}


def train_config(knobs: dict, steps: int) -> TrainConfig:
    """The camp spec's train slice as the registry splits it (hashed values vs settings), with this run's steps,
    checkpointing off and CUDA graphs on (what the memory plan picks on an H200), tensorboard off."""
    knobs = dict(knobs)
    lora = LoRA.build({**plain(SPEC.lora), **knobs.pop("lora", {})})  # {"lora": {"type": "dora"}}: the adapter
    tr = train_section({**plain(SPEC.train), **knobs, "epochs": 1, "steps_per_epoch": steps, "resolution": SIZE,
                        "gradient_checkpointing": "auto" if args.planned else False, "cuda_graphs": True,
                        "tensorboard": False})
    return TrainConfig({"lora": lora.hashed(), "train": tr.hashed()}, lora, tr, ("diffsynth",), {})


# ---------------------------------------------------------------- timing
class StepClock(L.Callback):
    """Start-to-start step times (synchronised): the whole loop iteration, the module's hooks included."""

    def __init__(self, sync_each: bool = True, sync_at=()):
        self.starts, self.losses, self.graphed, self.end = [], [], None, None
        # sync_each False (the logging variants): synchronise only at the starts in sync_at (the first timed step
        # and the last), so the loop runs as the build's does and the mean over that span is exact
        self.sync_each, self.sync_at = sync_each, set(sync_at)

    def on_train_batch_start(self, trainer, module, batch, idx):
        if self.sync_each or len(self.starts) in self.sync_at:
            sync()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        if self.sync_each and isinstance(outputs, dict):
            self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, module):
        sync()
        self.end = time.perf_counter()  # the last step + the end of the fit: reported apart, never a step time
        self.graphed = bool(getattr(module, "graphed", None))

    def steps(self):
        """Step i's time: batch start i to batch start i+1 (a run of n steps gives n-1 times)."""
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


class PerStepRead(L.Callback):
    """The logging before issue 25's fix, for the logging variants: the loss read back to the host after every step
    (storyc's CSV line) and handed to the logger as a number (Lightning's TensorBoard logging of self.log)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        v = float(outputs["loss"])
        for lg in trainer.loggers:
            lg.log_metrics({"loss_per_step": v}, step=trainer.global_step)


class SyncCounter(L.Callback):
    """Counts the host syncs of the timed steps (torch.cuda.set_sync_debug_mode("warn"): PyTorch warns on every
    synchronising call - a read-back, a blocking copy - but not on the clock's own torch.cuda.synchronize)."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.count, self.where, self._rec = first, last, 0, {}, None

    def on_train_batch_start(self, trainer, module, batch, idx):
        import warnings

        if idx == self.first and CUDA:
            self._rec = warnings.catch_warnings(record=True)
            self._log = self._rec.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif idx == self.last and self._rec is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._rec.__exit__(None, None, None)
            hits = [w for w in self._log if "synchronizing" in str(w.message)]
            self.count = len(hits)
            for w in hits:
                key = f"{Path(w.filename).name}:{w.lineno}"
                self.where[key] = self.where.get(key, 0) + 1
            self._rec = None


def fit(name: str, knobs: dict, kolors: Path, steps: int, extra_callbacks=()):
    knobs = dict(knobs)
    log_mode = knobs.pop("_log", None)  # the logging variants: quiet | build | per_step (see VARIANTS)
    cfg = train_config(knobs, steps)
    data = make_data(kolors, bool(cfg.train.caption_dropout))
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    accel = "gpu" if CUDA else "cpu"
    strategy, devices, world = train_stage.setup_strategy(cfg, accel)
    mem = resources.plan_train(resources.free_gib(RES.device), cfg.train.gradient_checkpointing,
                               cfg.train.cuda_graphs, cfg.train.batch_size, *cfg.size, world,
                               adapter=cfg.lora.type)
    t = time.perf_counter()
    module = train_stage.setup_module(cfg, kolors, data, RES, work / "lora.tmp.safetensors", mem)
    clock = StepClock(sync_each=log_mode is None, sync_at=(args.warmup, steps - 1))
    total = cfg.optimizer_steps(world)
    story = StoryCallbacks(Reporter(quiet=True, live=False), work / "train_log.csv", work / "fit_result.json", total,
                           False)
    logger = False
    if log_mode in ("build", "per_step"):  # as `storyc build` logs: TensorBoard (loss and LR from StoryCallbacks)
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(save_dir=str(work), name="logs", version="", default_hp_metric=False)
        if log_mode == "per_step":  # before the fix: Lightning's LR monitor and a loss read-back every step
            extra_callbacks = (*extra_callbacks, L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"),
                               PerStepRead())
    syncs = SyncCounter(args.warmup, steps - 1) if log_mode else None
    callbacks = [clock, *([syncs] if syncs else []), *([] if log_mode == "quiet" else [story]),
                 *([EMA(cfg.train.ema)] if cfg.train.ema else []), *extra_callbacks]
    if cfg.train.validation:  # train.validation: held-out latents and the callback that measures them
        from storyc.stages.train.validation import Validation

        g = torch.Generator().manual_seed(1)
        data["val"] = [{"latent": torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g).to(torch.float16), "text": 0}
                       for _ in range(cfg.train.validation["images"])]
        callbacks.append(Validation(cfg.train.validation, total, work / "val_log.csv", Reporter(quiet=True, live=False)))
    trainer = train_stage.setup_trainer(cfg, accel, devices, strategy, RES.precision, total, callbacks, work, logger)
    loader = train_stage.setup_data(cfg, data, module)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - t
    st = clock.steps()
    fr = json.loads((work / "fit_result.json").read_text("utf-8")) if (work / "fit_result.json").exists() else {}
    rec = {"knobs": knobs, "module_cfg": {k: getattr(module.cfg, k, None) for k in ("min_snr_gamma", "noise_offset",
                                                                          "caption_dropout", "ema", "optimizer",
                                                                          "gradient_checkpointing", "cuda_graphs")},
           "graphed": clock.graphed, "steps_run": len(clock.starts), "mem_plan": mem.reason,
           "last_step_and_fit_end_s": clock.end - clock.starts[-1], "first_steps": st[:args.warmup], "fit_wall_s": wall,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
           "losses_finite": all(math.isfinite(x) for x in clock.losses), "last_loss": clock.losses[-1] if clock.losses else None,
           "story_callbacks_s_per_step": fr.get("s_per_step")}
    if syncs is not None:  # host syncs over the timed steps, and where PyTorch saw them
        rec.update(host_syncs=syncs.count, host_syncs_per_step=syncs.count / max(steps - 1 - args.warmup, 1),
                   host_sync_sites=syncs.where)
    del module, trainer, loader
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return rec, st


VARIANTS = [("base", {}), ("min_snr_gamma_5", {"min_snr_gamma": 5.0}), ("noise_offset_0.1", {"noise_offset": 0.1}),
            ("caption_dropout_0.1", {"caption_dropout": 0.1}), ("ema_0.999", {"ema": 0.999}),
            ("all_four", {"min_snr_gamma": 5.0, "noise_offset": 0.1, "caption_dropout": 0.1, "ema": 0.999}),
            ("ema_0.999_foreach_patch", {"ema": 0.999}),
            ("adamw8bit", {"optimizer": "adamw8bit"}), ("prodigy", {"optimizer": "prodigy"}),
            # issue 26: 2 held-out images x 4 timesteps measured every 10 steps (the steps that measure are slower:
            # s_per_step stays the median; mean_s_per_step and the slowest step say what it costs)
            ("validation_2x4_every_10", {"validation": {"images": 2, "every": 10, "timesteps": 4}}),
            # issue 26: peft's DoRA at the camp rank (16): its per-step cost and peak beside the base step
            ("dora", {"lora": {"type": "dora"}}),
            # issue 26: peft's LoHa and LoKr (factor -1: sides split near their square roots) at rank 16
            ("loha", {"lora": {"type": "loha"}}), ("lokr", {"lora": {"type": "lokr"}}),
            # issue 26: train.masked_loss (a one-channel mask per sample, moved with the batch and multiplied into
            # the loss; the synthetic latents have none, so each sample's mask is all ones: the same work)
            ("masked_loss", {"masked_loss": True}), ("base_again", {}),
            # issue 25: what logging costs a step, timed without a sync per step (the mean from the first timed step
            # to the last, both synchronised): no storyc callbacks and no logger (the kernels + Lightning's loop);
            # storyc's StoryCallbacks + TensorBoard + LR monitor as the build runs them; the same plus a host read of
            # every step's loss (the logging before the fix). Run with --only log_quiet,log_build,log_per_step
            ("log_quiet", {"_log": "quiet"}), ("log_build", {"_log": "build"}), ("log_per_step", {"_log": "per_step"})]
NEEDS = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}


def ema_update_foreach(ema: list, params: list, decay: float) -> None:
    """Bench-only stand-in for callbacks.ema_update: the same math (ema * decay + p * (1 - decay)) as two
    multi-tensor kernels instead of two kernels per LoRA tensor. Measures what a foreach EMA would save."""
    with torch.no_grad():
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [p.detach().float() for p in params], alpha=1 - decay)


def importable(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        __import__(mod)
        return version(mod)
    except Exception as e:  # noqa: BLE001 - a missing or broken optional package: the variant is skipped
        log(f"{mod} not importable ({type(e).__name__}: {str(e)[:200]})")
        return None


# ---------------------------------------------------------------- previews
def preview_table(scenes: list[dict]) -> dict:
    """Keyed like generate.encode_all's output: ("+", prompt) / ("-", negative) -> (hidden states, pooled)."""
    dim, pooled, length = unet_dims(KOLORS)
    g = torch.Generator().manual_seed(1)
    table = {}
    for key in [("+", s["prompt"]) for s in scenes] + [("-", s["negative_prompt"]) for s in scenes]:
        table.setdefault(key, (torch.randn((1, length, dim), generator=g).to(DT),
                               torch.randn((1, pooled), generator=g).to(DT)))
    return table


def preview_scenes() -> list[dict]:
    from storyc.model import join_negative

    style = SPEC.style
    out = []
    for sc in STORY.scenes:
        out.append({"id": sc.id, "prompt": style.prefix + sc.prompt, "negative_prompt": join_negative(style.negative, sc.negative),
                    "seed": sc.seed})
    return out


class PreviewTimer(L.Callback):
    """At one step, call preview_checkpoint as StoryPreviews does: warm-up + timed calls per setting."""

    def __init__(self, at: int, settings: list, aesthetic: Path, folder: Path):
        self.at, self.settings, self.aesthetic, self.folder = at, settings, aesthetic, folder
        self.results = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        if idx != self.at:
            return
        scenes = preview_scenes()
        common_gen = generation_common(SPEC)
        table = preview_table(scenes)
        for label, (w, h, steps, reps) in self.settings:
            p = {"scenes": scenes, "width": w, "height": h, "steps": steps, "cfg_scale": common_gen["cfg_scale"],
                 "lora_strength": common_gen["lora_strength"], "aesthetic": "random"}
            times, rec = [], None
            for i in range(reps + 1):  # call 0: warm-up at the same size, 2 steps (loads, cuDNN plans)
                q = dict(p, steps=2) if i == 0 else p
                if CUDA:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t = time.perf_counter()
                rec = preview_checkpoint(module, int(trainer.global_step), q, table, KOLORS, self.aesthetic,
                                         self.folder / label)
                sync()
                times.append(time.perf_counter() - t)
                log(f"preview {label} call {i} ({q['steps']} steps): {times[-1]:.2f} s")
            self.results[label] = {"width": w, "height": h, "steps": steps, "cfg_scale": p["cfg_scale"],
                                   "scenes": len(scenes), "lora_strength": p["lora_strength"],
                                   "warmup_call_s_2_steps": times[0], "timed_calls_s": times[1:],
                                   "s_per_preview": statistics.median(times[1:]),
                                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
                                   "mean_aesthetic": rec["mean"], "coherence": rec["coherence"]}


# ---------------------------------------------------------------- run
def card() -> dict:
    import diffsynth  # noqa: F401
    import peft

    meta = {"torch": torch.__version__, "lightning": L.__version__, "peft": peft.__version__, "tiny": TINY,
            "size": SIZE, "steps": args.steps, "warmup": args.warmup, "argv": sys.argv[1:]}
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        meta.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    else:
        meta["gpu"] = "cpu (plumbing check, not a measurement)"
    return meta


R = {"meta": card(), "variants": {}}
log("card", R["meta"])
KOLORS, AESTHETIC, R["meta"]["model_write_s"] = write_models()
log("models", KOLORS, AESTHETIC, R["meta"]["model_write_s"])
only = set(args.only.split(",")) if args.only else None
for name, knobs in VARIANTS:
    if only is not None and name not in only:
        continue
    if name in NEEDS:
        ver = importable(NEEDS[name])
        R["meta"][NEEDS[name]] = ver
        if ver is None:
            R["variants"][name] = {"knobs": knobs, "skipped": f"{NEEDS[name]} is not installed"}
            continue
    original_ema = train_callbacks.ema_update
    if name.endswith("_foreach_patch"):
        train_callbacks.ema_update = ema_update_foreach
    try:
        rec, st = fit(name, knobs, KOLORS, args.warmup + args.steps + 1)  # +1: the last start closes step n
        steady = st[args.warmup:]
        # unsynchronised steps (the logging variants): only their sum is a time, so the mean
        mid = statistics.mean(steady) if "_log" in knobs else statistics.median(steady)
        rec.update(s_per_step=mid, steady_steps=steady, mean_s_per_step=statistics.mean(steady),
                   steady_min=min(steady), steady_max=max(steady))
        R["variants"][name] = rec
        log(f"{name:<24} {rec['s_per_step']:.4f} s/step (min {rec['steady_min']:.4f} max {rec['steady_max']:.4f}) "
            f"graphed {rec['graphed']} first {[round(x, 2) for x in rec['first_steps'][:3]]} peak {rec['peak_gib']} GiB "
            f"loss finite {rec['losses_finite']}")
    except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
        import traceback

        traceback.print_exc()
        R["variants"][name] = {"knobs": knobs, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
    finally:
        train_callbacks.ema_update = original_ema

v = R["variants"]
base = v.get("base", {}).get("s_per_step")
for name, rec in v.items():
    if base and "s_per_step" in rec:
        rec["overhead_pct_vs_base"] = 100 * (rec["s_per_step"] / base - 1)

# previews, inside a base training run (the StoryPreviews callback's place)
if not args.no_previews:
    ra, rb = (int(x) for x in args.preview_reps.split(","))
    settings = ([("tiny_64_2", (64, 64, 2, 1)), ("tiny_64_1", (64, 64, 1, 1))] if TINY else
                [("1024_50", (1024, 1024, 50, ra)), ("512_20", (512, 512, 20, rb))])
    at = args.warmup + 2
    after = 3 if TINY else 10
    pt = PreviewTimer(at, settings, AESTHETIC, WORK / "previews")
    try:
        rec, st = fit("previews", {}, KOLORS, at + 1 + after + 1, [pt])
        rec["steps_before_preview"] = st[args.warmup:at]
        rec["preview_step_s"] = st[at]  # the step whose end ran the previews
        rec["steps_after_preview"] = st[at + 1:]
        rec["s_per_step_after_preview"] = statistics.median(st[at + 1:])
        R["previews"] = {"settings": pt.results, "training_run": rec}
        for label, r in pt.results.items():
            if base:
                every, total = 500, 5000
                n = total // every
                r["camp_previews"] = n
                r["camp_preview_s"] = n * r["s_per_preview"]
                r["camp_train_s_at_base"] = total * base
                r["camp_preview_cost_pct"] = 100 * n * r["s_per_preview"] / (total * base)
            log(f"preview {label}: {r['s_per_preview']:.2f} s per preview of {r['scenes']} scenes"
                + (f"; every 500 of 5000 steps: {r['camp_preview_s']:.1f} s = {r['camp_preview_cost_pct']:.1f}% of "
                   f"5000 x {base:.4f} s" if base else ""))
        log(f"training after previews: {rec['s_per_step_after_preview']:.4f} s/step, graphed {rec['graphed']}")
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        R["previews"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}

R["meta"]["wall_s"] = time.perf_counter() - T0
OUT.mkdir(parents=True, exist_ok=True)
result_file = OUT / ("knobs_results_tiny.json" if TINY else "knobs_results.json")
result_file.write_text(json.dumps(R, indent=2, ensure_ascii=False, default=str) + "\n")

print("\n== knobs bench ==")
print(f"card: {R['meta']['gpu']}  torch {R['meta']['torch']}  {SIZE}x{SIZE}, batch 1, median of {args.steps} steps "
      f"after {args.warmup}")
print(f"{'variant':<24} {'s/step':>8} {'vs base':>9}  graphs  peak GiB")
for name, rec in v.items():
    if "s_per_step" in rec:
        ov = rec.get("overhead_pct_vs_base")
        print(f"{name:<24} {rec['s_per_step']:8.4f} {'' if ov is None else f'{ov:+8.1f}%':>9}  {str(rec['graphed']):<6}  "
              f"{rec['peak_gib']}")
    else:
        print(f"{name:<24} {rec.get('skipped') or rec.get('error')}")
for label, r in (R.get("previews") or {}).get("settings", {}).items():
    print(f"preview {label}: {r['s_per_preview']:.2f} s ({r['timed_calls_s']})"
          + (f", camp 10 previews {r['camp_preview_s']:.1f} s = {r['camp_preview_cost_pct']:.1f}% of 5000 base steps"
             if "camp_preview_s" in r else ""))
print(f"wrote {result_file}; wall {R['meta']['wall_s']:.0f} s")
