#!/usr/bin/env python3
"""The 2-GPU check (issues 5 and 6), on device kind nvidia-h100-x2: `bash bench/gpu.sh multigpu`.

1. `storyc build bench/multigpu/two-gpu.yaml`: DDP training on both GPUs (train.strategy ddp, devices 2, batch 1
   per GPU) and generation sharded over both GPUs as Ray tasks, then score and bundle.
2. The same generate stage again on one GPU (STORYC_GENERATE_SHARDS=1), same LoRA: every image must match.
3. `storyc build bench/multigpu/one-gpu.yaml --until train` on one GPU at batch 2 (the DDP run's global batch):
   its LoRA must match the DDP LoRA to float tolerance (rank r draws the samples one process at batch 2 draws).
Tiny random models (built on first use) keep this a check of the multi-GPU code paths, not of speed.
The GPU image lacks Data-Juicer, so ingest + filter run here first and their outputs are carried:
  storyc build bench/multigpu/two-gpu.yaml --until filter; storyc build bench/multigpu/one-gpu.yaml --until filter
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT") or ROOT / "bench/out")
R: dict = {}


def storyc(*args, **env):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "storyc", *args], cwd=ROOT, env={**os.environ, **env},
                       capture_output=True, text=True)
    secs = time.perf_counter() - t
    print(f"$ {' '.join(f'{k}={v}' for k, v in env.items())} storyc {' '.join(args)}   ({secs:.1f}s, exit {r.returncode})")
    print(r.stdout[-6000:], r.stderr[-3000:], sep="\n", flush=True)
    if r.returncode:
        R["failed"] = {"args": args, "exit": r.returncode}
        write()
        sys.exit(1)
    return r.stdout, secs


def write(name="multigpu_results.json"):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(R, indent=2) + "\n")


def lora(story):
    from safetensors.torch import load_file

    return load_file(str(ROOT / f"build/{story}/lora/{story}.diffsynth.safetensors"))


def main():
    (ROOT / ".storyc").mkdir(exist_ok=True)  # the project root marker (the copied tree has no .git)
    try:
        R["gpus"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip().splitlines()
    except FileNotFoundError:  # a CPU dry run of this script (STORYC_GENERATE_SHARDS=2 shards over CPU Ray tasks)
        R["gpus"] = []
    print("\n".join(R["gpus"]), flush=True)

    out, R["two_gpu_build_s"] = storyc("build", "bench/multigpu/two-gpu.yaml")
    R["two_gpu_log"] = [ln.strip() for ln in out.splitlines() if any(w in ln for w in ("ddp", "ranks", "shard", "done"))]
    ray_imgs = ROOT / "build/two-gpu/images-ray"
    shutil.rmtree(ray_imgs, ignore_errors=True)
    shutil.copytree(ROOT / "build/two-gpu/images", ray_imgs)

    out, _ = storyc("build", "bench/multigpu/two-gpu.yaml", "--force", "generate", "--until", "generate",
                    STORYC_GENERATE_SHARDS="1")
    diffs = {}
    for a in sorted(ray_imgs.glob("*.png")):
        x = np.asarray(Image.open(a)).astype(np.int16)
        y = np.asarray(Image.open(ROOT / "build/two-gpu/images" / a.name)).astype(np.int16)
        diffs[a.name] = int(np.abs(x - y).max())
    R["ray_2gpu_vs_1gpu_images_max_abs_diff"] = diffs
    print("images, 2 GPUs (Ray) vs 1 GPU, max |diff| per image (0-255):", diffs, flush=True)

    out, _ = storyc("build", "bench/multigpu/one-gpu.yaml", "--until", "train", CUDA_VISIBLE_DEVICES="0")
    a, b = lora("two-gpu"), lora("one-gpu")
    assert a.keys() == b.keys()
    R["lora_keys"] = len(a)
    R["lora_ddp_vs_1gpu_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    R["lora_ddp_vs_1gpu_rel_diff"] = float(sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5
                                           / sum(float(b[k].norm()) ** 2 for k in b) ** 0.5)
    R["lora_max_abs_B"] = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    R["lora_finite"] = all(bool(v.isfinite().all()) for v in (*a.values(), *b.values()))
    for s in ("two-gpu", "one-gpu"):
        R[f"{s}_train_report"] = json.loads((ROOT / f"build/{s}/lora/train_report.json").read_text())
    print("LoRA, DDP on 2 GPUs vs 1 GPU at the same global batch:", {k: v for k, v in R.items() if k.startswith("lora")})
    write()


if __name__ == "__main__":
    main()
