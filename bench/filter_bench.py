#!/usr/bin/env python3
"""Images/s through ingest + filter: storyc's stages vs the notebook's own steps, same images, same run.

The notebook's steps: a loop that opens every image, converts it to RGB, saves it as JPEG and writes
metadata.jsonl; then `dj-process --config ...`; then a loop that re-saves every kept image and writes
metadata.csv with pandas. storyc: `storyc run filter SPEC` (ingest + filter, Data-Juicer as dj-process).
Both use the notebook's two filters and the same worker count.

    python bench/filter_bench.py [--images 2000] [--np 2]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DJ_CONFIG = """project_name: 'data-process'
dataset_path: '{root}/nb/data-juicer/input/metadata.jsonl'
np: {np}
text_keys: 'text'
image_key: 'image'
image_special_token: '<__dj__image>'
export_path: '{root}/nb/data-juicer/output/result.jsonl'
process:
    - image_shape_filter:
        min_width: 1024
        min_height: 1024
        any_or_all: any
    - image_aspect_ratio_filter:
        min_ratio: 0.5
        max_ratio: 2.0
        any_or_all: any
"""


def make_images(folder: Path, n: int):
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder.mkdir(parents=True)
    sizes = [(512, 512), (1024, 1024), (1100, 900), (1280, 1024), (1024, 1536), (2048, 1024), (2200, 1000), (768, 1400)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        im = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        ImageDraw.Draw(im).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(rng.randrange(256), 80, 160))
        im.save(folder / f"{i:05d}.jpg", quality=90)


def notebook(root: Path, src: Path, np_: int) -> float:
    """The seed notebook's cells, with MsDataset replaced by the same local images."""
    import pandas as pd
    from PIL import Image

    t = time.perf_counter()
    (root / "nb/lora_dataset/train").mkdir(parents=True)
    (root / "nb/data-juicer/input").mkdir(parents=True)
    with open(root / "nb/data-juicer/input/metadata.jsonl", "w") as f:
        for data_id, path in enumerate(sorted(src.iterdir())):
            image = Image.open(path).convert("RGB")
            out = root / f"nb/lora_dataset/train/{data_id}.jpg"
            image.save(out)
            f.write(json.dumps({"text": "二次元", "image": [str(out)]}))
            f.write("\n")
    cfg = root / "nb/data-juicer/data_juicer_config.yaml"
    cfg.write_text(DJ_CONFIG.format(root=root, np=np_))
    subprocess.run([sys.executable, "-c", "from data_juicer.tools.process_data import main; main()", "--config",
                    str(cfg)], check=True, capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    texts, file_names = [], []
    (root / "nb/lora_dataset_processed/train").mkdir(parents=True)
    with open(root / "nb/data-juicer/output/result.jsonl") as file:
        for data_id, data in enumerate(file.readlines()):
            data = json.loads(data)
            texts.append(data["text"])
            image = Image.open(data["image"][0])
            image.save(root / f"nb/lora_dataset_processed/train/{data_id}.jpg")
            file_names.append(f"{data_id}.jpg")
    df = pd.DataFrame({"file_name": file_names, "text": texts})
    df.to_csv(root / "nb/lora_dataset_processed/train/metadata.csv", index=False, encoding="utf-8-sig")
    return time.perf_counter() - t, len(df)


def storyc(root: Path, src: Path, np_: int) -> float:
    proj = root / "sc"
    proj.mkdir(parents=True)
    (root / ".storyc").mkdir(exist_ok=True)  # the project is root/, so root/images is inside it
    (proj / "story.yaml").write_text(
        "version: 1\nstory: {id: bench}\n"
        f"dataset: {{source: folder, path: {src}, caption: 二次元}}\n".replace(str(src), os.path.relpath(src, proj))
        + f"processing: {{workers: {np_}}}\nsubmission: {{images: 1}}\nscenes: [{{id: a, prompt: x, seed: 0}}]\n")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "storyc", "run", "filter", "story.yaml", "-q"], cwd=proj,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stdout + r.stderr)
    kept = json.loads((root / "build/bench/data/filter_report.json").read_text())["kept"]
    return wall, kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--np", type=int, default=2)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="storyc-filter-bench-", dir=REPO / ".storyc" if (REPO / ".storyc").is_dir() else None))
    try:
        src = root / "images"
        make_images(src, a.images)
        nb_s, nb_kept = notebook(root, src, a.np)
        sc_s, sc_kept = storyc(root, src, a.np)
        assert nb_kept == sc_kept, (nb_kept, sc_kept)
        res = {"images": a.images, "np": a.np, "kept": sc_kept, "notebook_s": nb_s, "storyc_s": sc_s,
               "notebook_img_per_s": a.images / nb_s, "storyc_img_per_s": a.images / sc_s, "speedup": nb_s / sc_s}
        print(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
