#!/usr/bin/env python3
"""`storyc build` end to end on one GPU, as a user runs it, beside the notebook's path, in one run on one card.

    python3 bench/e2e.py prepare [--images N] [--scale full|tiny]     # here: project + ingest/filter (Data-Juicer)
    python3 bench/e2e.py models  [--scale full|tiny] [--device cuda]  # there: full-size random models, real layouts
    python3 bench/e2e.py storyc  [--steps S]                          # there: build, one-scene edit, no-op
    python3 bench/e2e.py caps    [--caps 22,40]                       # there: the build under memory caps
    python3 bench/e2e.py watch   [--edits 2]                          # there: `storyc watch`, prompt/seed edits
    python3 bench/e2e.py baseline [--steps S] [--images K]            # there: the notebook's path, same card

The project lives in bench/out/e2e/proj (git-ignored): the camp story (specs/camp.yaml's settings) with a folder
dataset of 1024x1024 images and the models under proj/models. `storyc` runs `python -m storyc build` as a
subprocess and reads the build's own records (build/<id>/build_times.json, build_report.json, the lock);
training runs S steps and the notebook's 10 x 500 = 5000 are extrapolated from the measured s/step.
Results: bench/out/e2e/*.json (and $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / "out" / "e2e"
PROJ = WORK / "proj"
SPEC = PROJ / "camp.yaml"
NOTEBOOK_STEPS = 5000


def _save(name: str, data: dict) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / name).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / name).write_text(text)
    print(text, flush=True)


def _spec_text(steps: int, scale: str) -> str:
    import yaml

    spec = yaml.safe_load((REPO / "specs/camp.yaml").read_text("utf-8"))
    spec["models"] = {"kolors": "models/kolors/Kolors", "vae": "models/sdxl-vae-fp16-fix",
                      "aesthetic": "models/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"}
    spec["dataset"] = {"source": "folder", "path": "data", "caption": "二次元"}
    spec["train"].update(epochs=1, steps_per_epoch=steps, checkpoint_every=max(steps, 100))
    if scale == "tiny":  # the CPU plumbing check: same pipeline, tiny sizes
        spec["train"].update(resolution=64, precision="32")
        spec["generation"].update(width=64, height=64, steps=2)
        spec["filters"] = [{"image_shape_filter": {"min_width": 64, "min_height": 64}}]
        spec["submission"] = {"min_aesthetic": -1000, "rules": "none"}
    return "# bench/e2e.py: the camp story on a local folder dataset\n" + yaml.safe_dump(spec, allow_unicode=True,
                                                                                          sort_keys=False)


def prepare(args):
    """The project and its data stages, where Data-Juicer is installed (it is not on the GPU image)."""
    import numpy as np
    from PIL import Image

    side = 1024 if args.scale == "full" else 96
    (PROJ / ".storyc").mkdir(parents=True, exist_ok=True)
    data = PROJ / "data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.images):  # smooth random colour fields: realistic PNG sizes, a few hundred kB
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(data / f"{i:03d}.png")
    SPEC.write_text(_spec_text(args.steps, args.scale), "utf-8")
    r = _storyc("build", str(SPEC), "--until", "filter")
    _save("e2e_prepare.json", {"images": args.images, "side": side, "ingest_filter_wall_s": r["wall_s"],
                               "times": _times()})


def models(args):
    sys.path.insert(0, str(REPO / "bench"))
    from fullsize import write_all

    t = time.perf_counter()
    times = write_all(PROJ / "models", args.scale, args.device)
    sizes = {rel: round(sum(p.stat().st_size for p in (PROJ / "models" / rel).rglob("*") if p.is_file()) / 2**30, 2)
             for rel in times}
    _save("e2e_models.json", {"write_s": times, "gib": sizes, "total_s": round(time.perf_counter() - t, 1)})


def _storyc(*argv, env=None):
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "storyc", *argv], cwd=PROJ, env=e, capture_output=True, text=True)
    wall = time.perf_counter() - t
    print(p.stdout[-6000:], p.stderr[-3000:], sep="\n", flush=True)
    if p.returncode not in (0, 3):
        raise SystemExit(f"storyc {' '.join(argv)} failed with {p.returncode}")
    return {"wall_s": round(wall, 2), "rc": p.returncode, "log_tail": p.stdout[-1500:]}


def _build_dir() -> Path:
    return PROJ / "build" / "purple-girl-concert"


def _times() -> dict:
    try:
        return json.loads((_build_dir() / "build_times.json").read_text())
    except OSError:
        return {}


def _lock_facts() -> dict:
    import yaml

    doc = yaml.safe_load((PROJ / "camp.lock").read_text("utf-8"))
    return {n: e.get("extra") for n, e in doc["stages"].items() if e.get("extra")}


def _extrapolate(times: dict) -> dict:
    m = times.get("metrics", {})
    sps, steps = m.get("train.s_per_step"), m.get("train.steps")
    if not sps or not steps:
        return {}
    total = times["total_s"]
    fit_steps = sps * steps
    return {"s_per_step": sps, "steps_run": steps,
            "total_at_5000_steps_s": round(total - fit_steps + NOTEBOOK_STEPS * sps, 1)}


def storyc_runs(args):
    import yaml

    SPEC.write_text(_spec_text(args.steps, args.scale), "utf-8")
    R = {"steps": args.steps}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import storyc.cli"], check=True, cwd=REPO)
    R["process_start_s"] = round(time.perf_counter() - t0, 3)
    r = _storyc("build", str(SPEC))
    R["build"] = {**r, "times": _times(), "extrapolated": _extrapolate(_times()), "facts": _lock_facts()}
    # one scene's prompt edited: a new process, its model loads, one image, its score, the bundle
    spec = yaml.safe_load(SPEC.read_text("utf-8"))
    spec["scenes"][2]["prompt"] += "，夜晚"
    SPEC.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), "utf-8")
    R["one_scene_edit"] = {**_storyc("build", str(SPEC)), "times": _times()}
    R["no_op"] = {**_storyc("build", str(SPEC)), "times": _times()}
    _save("e2e_storyc.json", R)


def watch(args):
    """`storyc watch` on the built project (issue 25): one process holds the models; a scene's prompt edit and its
    seed edit are each timed from the save to the watch's "build N done" line (the page is updated then), and a
    save that changes nothing must start no build. The build's own build_times.json is read after each edit."""
    import threading

    import yaml

    e = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "storyc", "watch", str(SPEC), "--interval", "0.1"], cwd=PROJ,
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list = []
    done = threading.Condition()

    def reader():
        for line in proc.stdout:
            print("  watch|", line.rstrip()[:300], flush=True)
            with done:
                lines.append(line)
                done.notify_all()

    threading.Thread(target=reader, daemon=True).start()

    def wait_build(n: int, timeout: float) -> bool:
        with done:
            return done.wait_for(lambda: any(f"watch: build {n} done" in ln for ln in lines), timeout)

    R = {"edits": []}
    t = time.perf_counter()
    assert wait_build(1, 600), "the first watch build did not finish"
    R["first_build_s"] = round(time.perf_counter() - t, 2)  # process start, imports, the (up-to-date) build
    # after its first build the watcher preloads the text encoder and the pipeline (the page is already up): a
    # creator looks at it before the first save, so the edits start once that is done (its time is recorded)
    with done:
        done.wait_for(lambda: any("for the next edit" in ln or "not preloaded" in ln for ln in lines), 120)
    R["preload_s"] = round(time.perf_counter() - t - R["first_build_s"], 2)
    base = yaml.safe_load(SPEC.read_text("utf-8"))
    n = 1
    for i in range(args.edits):
        for kind in ("prompt", "seed"):
            spec = yaml.safe_load(SPEC.read_text("utf-8"))
            sc = spec["scenes"][(3 + i) % len(spec["scenes"])]
            if kind == "prompt":
                sc["prompt"] += f"，第{i + 1}次修改"
            else:
                key = "seeds" if "seeds" in sc else "seed"
                sc[key] = [s + 1000 for s in sc[key]] if isinstance(sc[key], list) else sc[key] + 1000
            t = time.perf_counter()
            SPEC.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), "utf-8")
            n += 1
            assert wait_build(n, 300), f"watch build {n} did not finish"
            R["edits"].append({"kind": kind, "scene": sc["id"], "s": round(time.perf_counter() - t, 2),
                               "times": _times()})
    text = SPEC.read_text("utf-8")
    SPEC.write_text(text, "utf-8")  # saved, unchanged: nothing may build
    time.sleep(3)
    R["no_op_save_built"] = wait_build(n + 1, 0.1)
    proc.terminate()
    proc.wait(30)
    SPEC.write_text(yaml.safe_dump(base, allow_unicode=True, sort_keys=False), "utf-8")
    for kind in ("prompt", "seed"):
        xs = [x["s"] for x in R["edits"] if x["kind"] == kind]
        R[f"{kind}_edit_median_s"] = round(statistics.median(xs), 2) if xs else None
    _save("e2e_watch.json", R)


def caps(args):
    """The same build under a per-process GPU memory cap: training retrains (a training cache of its own, holding
    the already-encoded latents and prompts), then generation reruns under the cap too."""
    R = {}
    for cap in [c for c in args.caps.split(",") if c]:
        cache = WORK / f"cache-{cap}"
        shutil.rmtree(cache, ignore_errors=True)
        for sub in ("latents", "text"):  # the encodings a first build made, when there was one
            if (PROJ / ".storyc" / "cache" / sub).is_dir():
                shutil.copytree(PROJ / ".storyc" / "cache" / sub, cache / sub)
        env = {"STORYC_GPU_MEMORY_GIB": cap}
        train = _storyc("build", str(SPEC), "--force", "train", "--until", "train", "--cache", str(cache), env=env)
        train_times = _times()
        gen = _storyc("build", str(SPEC), "--force", "generate", "--cache", str(cache), env=env)
        R[f"cap_{cap}_gib"] = {"train": {**train, "times": train_times, "extrapolated": _extrapolate(train_times)},
                               "generate_score_bundle": {**gen, "times": _times()}, "facts": _lock_facts()}
    _save("e2e_caps.json", R)


def baseline(args):
    """The notebook's path on the same files: ModelManager loads, DiffSynth's LightningModelForT2ILoRA steps (GC on,
    ChatGLM and the VAE in every step), a second load for inference, peft LoRA unmerged, one image at a time, and
    its evaluate() over the images folder."""
    import lightning as L
    import torch
    from diffsynth import ModelManager, SDXLImagePipeline
    from PIL import Image

    sys.path.insert(0, str(REPO / "bench"))
    from common import PROMPT, NEG, random_lora_state  # noqa: F401

    dev = "cuda"
    M = PROJ / "models"
    R = {}

    def sync():
        torch.cuda.synchronize()

    def notebook_load(vae: str):
        """The notebook's ModelManager load of the text encoder, the UNet and a VAE file; (pipe, seconds)."""
        sync()
        t = time.perf_counter()
        mm = ModelManager(torch_dtype=torch.float16, device=dev, file_path_list=[
            str(M / "kolors/Kolors/text_encoder"), str(M / "kolors/Kolors/unet/diffusion_pytorch_model.safetensors"),
            str(M / vae)])
        pipe = SDXLImagePipeline.from_model_manager(mm)
        sync()
        return pipe, round(time.perf_counter() - t, 2)

    # (1) the training script's model load (train_kolors_lora.py: text encoder, UNet, fp16-fix VAE)
    pipe, R["train_load_s"] = notebook_load("sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors")

    # (2) training steps, exactly DiffSynth's module (the notebook's script)
    from diffsynth.trainers.text_to_image import LightningModelForT2ILoRA

    class Notebook(LightningModelForT2ILoRA):
        def __init__(self, pipe):
            super().__init__(learning_rate=1e-4, use_gradient_checkpointing=True)
            self.pipe = pipe
            self.pipe.scheduler.set_timesteps(1100)
            self.freeze_parameters()
            self.add_lora_to_model(self.pipe.denoising_model(), lora_rank=16, lora_alpha=4.0,
                                   lora_target_modules="to_q,to_k,to_v,to_out", init_lora_weights="gaussian")

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            return {"text": PROMPT, "image": torch.randn(3, 1024, 1024)}

    class Timer(L.Callback):
        def __init__(self):
            self.t = []

        def on_train_batch_start(self, *a):
            sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            sync()
            self.t.append(time.perf_counter() - self.t0)

    torch.cuda.reset_peak_memory_stats()
    timer = Timer()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="16-mixed", max_steps=args.steps, callbacks=[timer],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Notebook(pipe), train_dataloaders=torch.utils.data.DataLoader(Images(), batch_size=1))
    R["train_s_per_step"] = round(statistics.median(timer.t[2:]), 4)
    R["train_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del trainer, pipe
    torch.cuda.empty_cache()

    # (3) the inference cell: a fresh load, peft LoRA injected (alpha 2), one image at a time
    from peft import LoraConfig, inject_adapter_in_model

    pipe, load_s = notebook_load("kolors/Kolors/vae/diffusion_pytorch_model.safetensors")
    t = time.perf_counter()
    lora = random_lora_state(pipe.unet)
    pipe.unet = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=2.0, init_lora_weights="gaussian",
                                                   target_modules=["to_q", "to_k", "to_v", "to_out"]), pipe.unet)
    pipe.unet.load_state_dict({k: v.to(dev, torch.float16) for k, v in lora.items()}, strict=False)
    sync()
    R["inference_load_s"] = round(load_s + time.perf_counter() - t, 2)
    torch.cuda.reset_peak_memory_stats()
    folder = WORK / "baseline_images"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    times = []
    for i in range(args.images):
        sync()
        t = time.perf_counter()
        img = pipe(prompt=PROMPT, negative_prompt=NEG, cfg_scale=4, num_inference_steps=50, height=1024, width=1024,
                   seed=i, progress_bar_cmd=lambda x: x)
        sync()
        times.append(time.perf_counter() - t)
        img.save(folder / f"{i}.jpg")
    R["s_per_image"] = round(statistics.median(times), 3)
    R["image_times"] = [round(x, 3) for x in times]
    R["generate_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del pipe
    torch.cuda.empty_cache()

    # (4) evaluate(): its model load and one image at a time (8 images: the extra ones are copies)
    for i in range(args.images, 8):
        shutil.copy(folder / f"{i % args.images}.jpg", folder / f"{i}.jpg")
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPProcessor

    t = time.perf_counter()
    predictor = AestheticsPredictorV2Linear.from_pretrained(str(M / "aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE")).to(dev)
    processor = CLIPProcessor.from_pretrained(str(M / "aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"))
    scores = []
    for name in sorted(os.listdir(folder)):
        inputs = processor(images=Image.open(folder / name), return_tensors="pt")
        with torch.no_grad():
            scores.append(predictor(**{k: v.to(dev) for k, v in inputs.items()}).logits.tolist()[0][0])
    sync()
    R["evaluate_s"] = round(time.perf_counter() - t, 2)
    R["total_at_5000_steps_s"] = round(R["train_load_s"] + NOTEBOOK_STEPS * R["train_s_per_step"] + R["inference_load_s"]
                                       + 8 * R["s_per_image"] + R["evaluate_s"], 1)
    R["note"] = ("model loads and evaluate() measured once; s/step the median of the measured steps after 2; s/image "
                 f"the median of {args.images} images, x8; the data stages (Data-Juicer) are the same in both and left out")
    _save("e2e_baseline.json", R)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=("prepare", "models", "storyc", "caps", "baseline", "watch"))
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--caps", default="22,40")
    ap.add_argument("--edits", type=int, default=2)
    a = ap.parse_args()
    {"prepare": prepare, "models": models, "storyc": storyc_runs, "caps": caps, "baseline": baseline,
     "watch": watch}[a.phase](a)


if __name__ == "__main__":
    main()
