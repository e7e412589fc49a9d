#!/usr/bin/env python3
"""`storyc sweep` on GPUs (issue 14), as a user runs it: the camp story with full-size random-weight models.

    python3 bench/sweep_bench.py [--steps S] [--only par,seq,share]

Needs bench/e2e.py's project (bench/out/e2e/proj: the 1024x1024 images and the full-size models in the real
layouts, from `bench/e2e.py prepare` and `models`). Each experiment gets a fresh project of its own (the spec, the
data and the models hard-linked, an empty training cache), so nothing is shared between experiments:

- par:   2 variants that each train their own LoRA (two learning rates), 2 trials at once, one GPU each;
- seq:   the same 2 variants one after another on one GPU (CUDA_VISIBLE_DEVICES=0);
- share: 6 variants that differ only in generation settings (3 guidance scales x 2 seeds of one scene), 2 trials
         at once on 2 GPUs: one training, five cache hits;
- cpu4, cpu4seq: on the CPU machine with tiny models (`e2e.py prepare/models --scale tiny`), 4 variants (2 learning
         rates x 2 guidance scales: 2 trainings) with 2 trials at once, and one at a time.

Each row is `storyc sweep` as a subprocess (its wall time: Ray start, every trial, results) plus the sweep's own
results.json (per-variant seconds, trained or cache hit). Results: bench/out/sweep/sweep_bench.json (and $OUT).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "bench" / "out" / "e2e" / "proj"
WORK = REPO / "bench" / "out" / "sweep"

TWO_TRAININGS = "sweep:\n  parameters:\n    train.learning_rate: [0.0001, 0.0002]\n"
FOUR = TWO_TRAININGS + "    generation.cfg_scale: [3.0, 5.0]\n"
SHARE = ("sweep:\n  parameters:\n    generation.cfg_scale: [3.0, 4.0, 5.0]\n"
         "  scenes:\n    at-the-concert: [{seed: 11}, {seed: 12}]\n")
# name: (sweep, trials at once, CUDA_VISIBLE_DEVICES or None for all)
RUNS = {"par": (TWO_TRAININGS, 2, None), "seq": (TWO_TRAININGS, 1, "0"), "share": (SHARE, 2, None),
        "cpu4": (FOUR, 2, None), "cpu4seq": (FOUR, 1, None)}


def project(name: str, steps: int) -> Path:
    """A fresh project: the e2e spec with S training steps, its data and models linked, no cache, no builds."""
    import yaml

    proj = WORK / name
    shutil.rmtree(proj, ignore_errors=True)
    (proj / ".storyc").mkdir(parents=True)
    for tree in ("data", "models"):  # hard links: instant, and inside the project (a symlink out is refused)
        subprocess.run(["cp", "-al", str(E2E / tree), str(proj / tree)], check=True)
    spec = yaml.safe_load((E2E / "camp.yaml").read_text("utf-8"))
    spec["train"].update(steps_per_epoch=steps, checkpoint_every=steps)
    (proj / "camp.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), "utf-8")
    (proj / "sweep.yaml").write_text("version: 1\nextends: camp.yaml\n" + RUNS[name][0], "utf-8")
    return proj


def run(name: str, steps: int) -> dict:
    proj = project(name, steps)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    _, concurrent, gpus = RUNS[name]
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "storyc", "sweep", "sweep.yaml", "--concurrent", str(concurrent)], cwd=proj,
                       env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    print(p.stdout[-4000:], p.stderr[-3000:], sep="\n", flush=True)
    folder = proj / "build" / "purple-girl-concert" / "sweeps" / "sweep"
    try:
        res = json.loads((folder / "results.json").read_text("utf-8"))
    except OSError:
        res = {}
    rows = res.get("variants", [])
    # independent of the trials' own records: the LoRAs in the training cache (one folder per training)
    entries = [e for e in (proj / ".storyc" / "cache" / "train").glob("*") if e.is_dir()]
    return {"rc": p.returncode, "wall_s": round(wall, 1), "tune_wall_s": res.get("wall_s"), "concurrent": concurrent,
            "trainings_run": sum(bool(v.get("trained")) for v in rows), "lora_cache_entries": len(entries),
            "variants": [{k: v.get(k) for k in ("variant", "values", "state", "seconds", "trained", "stages_ran")}
                         for v in rows], "gpus": env.get("CUDA_VISIBLE_DEVICES", "all")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--only", default="par,seq,share")
    args = ap.parse_args()
    import torch

    R = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
         "gpus": torch.cuda.device_count(), "steps": args.steps}
    for name in args.only.split(","):
        R[name] = run(name, args.steps)
        for a, b in (("seq", "par"), ("cpu4seq", "cpu4")):
            if a in R and b in R:
                R[f"{a}_over_{b}"] = round(R[a]["wall_s"] / R[b]["wall_s"], 2)
        text = json.dumps(R, indent=2, ensure_ascii=False) + "\n"
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "sweep_bench.json").write_text(text)
        if os.environ.get("OUT"):
            (Path(os.environ["OUT"]) / "sweep_bench.json").write_text(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
