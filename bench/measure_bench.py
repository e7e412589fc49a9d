#!/usr/bin/env python3
"""Issue 24's added costs per image, beside the baseline way of doing each, in one run on one card:
  esrgan     storyc.stages.refine.esrgan_upscale (bf16 autocast on the GPU) vs DiffSynth's ESRGAN as its extension
             runs it (fp32), 1024^2 -> 4096^2, the full RRDBNet (23 blocks) with random weights in the
             RealESRGAN_x4.pth layout, loaded through DiffSynth's ModelManager
  score      storyc's Scorer.measure (aesthetic score + CLIP embedding + the style statistics hook) vs the
             notebook's get_aesthetics_score forward alone: a full-size CLIP ViT-L/14 aesthetic predictor
  alignment  storyc's Aligner (Chinese CLIP ViT-L/14 + RoBERTa-base, full size, random): one image against its prompt
  dreamsim   storyc's DreamSim embedding per image (storyc.models.dreamsim, DreamSim's open_clip_vitb32: a full-size
             random ViT-B/32 in its layout) vs DreamSim's own usage, its forward on each pair of images (what a
             character's k scenes cost: k(k-1)/2 pairs); --only dreamsim runs this part alone
Run on the GPU machine: bash bench/gpu.sh measure   (BENCH_SMOKE=1 on a CPU: a plumbing check, not a measurement)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import DEV, PROMPT, SMOKE, gpu_info, out_dir, sync, torch, write

p = argparse.ArgumentParser()
p.add_argument("--images", type=int, default=8)
p.add_argument("--size", type=int, default=1024)
p.add_argument("--only", default="", help="dreamsim: that part alone")
args = p.parse_args()
N, S = (2, 64) if SMOKE else (args.images, args.size)
R = {"meta": {**gpu_info(), "images": N, "size": S}}
root = Path(tempfile.mkdtemp())


def images(n, size, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def peak_reset():
    if not SMOKE:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if not SMOKE else 0.0


def per_image(fn, ims, reps=1):
    fn(ims[:1])  # warm-up
    peak_reset()
    times = []
    for _ in range(reps):
        for im in ims:
            sync()
            t = time.perf_counter()
            fn([im])
            sync()
            times.append(time.perf_counter() - t)
    return {"s_per_image": statistics.median(times), "times": [round(x, 4) for x in times], "peak_gib": peak()}


def all_at_once(fn, ims):
    """One call over every image (a model loaded once, as the stage does), per image."""
    fn(ims[:1])  # warm-up
    peak_reset()
    sync()
    t = time.perf_counter()
    fn(ims)
    sync()
    total = time.perf_counter() - t
    return {"s_per_image": total / len(ims), "total_s": round(total, 4), "peak_gib": peak()}


# ---------------------------------------------------------------- DreamSim (character consistency)
from storyc.models import tiny  # noqa: E402
from storyc.models.dreamsim import DreamSim  # noqa: E402

t = time.perf_counter()
ds_folder = tiny.tiny_dreamsim(root / "dreamsim")  # full size: DreamSim's ViT-B/32 has no smaller config
R["dreamsim_write_s"] = time.perf_counter() - t
t = time.perf_counter()
ds = DreamSim(ds_folder, DEV)
sync()
R["dreamsim_load_s"] = time.perf_counter() - t
ims = images(N, S)
R["dreamsim_storyc"] = per_image(ds.embed, ims, reps=3)


def pairwise(x):  # DreamSim's own usage: its forward (two embeddings and their distance) on every pair
    xs = [ds.preprocess(im).to(DEV) for im in x]
    with torch.no_grad():
        return [float(ds.model(xs[i], xs[j])) for i in range(len(xs)) for j in range(i + 1, len(xs))]


pairwise(ims[:2])  # warm-up
sync()
t = time.perf_counter()
d = pairwise(ims)
sync()
R["dreamsim_pairwise_forward"] = {"s_total": time.perf_counter() - t, "pairs": len(d), "images": len(ims)}
R["dreamsim_storyc_total_s"] = R["dreamsim_storyc"]["s_per_image"] * len(ims)
print("dreamsim", R["dreamsim_storyc"], R["dreamsim_pairwise_forward"], flush=True)
del ds
if args.only == "dreamsim":
    write(out_dir(), "measure_bench.json", R)
    raise SystemExit(0)

# ---------------------------------------------------------------- ESRGAN x4
from storyc.stages import refine  # noqa: E402

esr = tiny.tiny_esrgan(root / "esrgan")  # the full RRDBNet architecture (DiffSynth recognises it by its shapes)
ims = images(N, S)
R["esrgan_storyc_bf16"] = all_at_once(lambda x: refine.esrgan_upscale(esr, x, DEV), ims)
print("esrgan storyc", R["esrgan_storyc_bf16"], flush=True)


def diffsynth_esrgan(x):
    from diffsynth import ModelManager
    from diffsynth.extensions.ESRGAN import ESRGAN

    mm = ModelManager(torch_dtype=torch.float32, device=DEV)
    mm.load_model(str(esr / "RealESRGAN_x4.pth"))
    return ESRGAN.from_model_manager(mm).upscale(x)


R["esrgan_diffsynth_fp32"] = all_at_once(diffsynth_esrgan, ims)
print("esrgan diffsynth", R["esrgan_diffsynth_fp32"], flush=True)
out = refine.esrgan_upscale(esr, ims[:1], DEV)[0]
R["esrgan_output_size"] = list(out.size)

# ---------------------------------------------------------------- the aesthetic score with the style statistics
from transformers import CLIPImageProcessor, CLIPVisionConfig  # noqa: E402
from aesthetics_predictor import AestheticsPredictorV2Linear  # noqa: E402

from storyc import resources  # noqa: E402
from storyc.stages.score import Aligner, Scorer  # noqa: E402

aes = root / "aesthetic"
if SMOKE:
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=32)
else:  # ViT-L/14 at 224 px, as the aesthetic predictor's CLIP is
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=768)
torch.manual_seed(0)
AestheticsPredictorV2Linear(cfg).save_pretrained(aes, safe_serialization=True)
tiny.write_clip_processor(aes, CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                                                  crop_size={"height": cfg.image_size, "width": cfg.image_size}))
scorer = Scorer(aes, resources.for_score(DEV))


def notebook_score(x):  # get_aesthetics_score: the processor and the predictor's forward, nothing else
    inputs = scorer.processor(images=x, return_tensors="pt")
    with torch.no_grad():
        return scorer.model(**{k: v.to(scorer.device) for k, v in inputs.items()}).logits


R["score_notebook"] = per_image(notebook_score, ims, reps=3)
R["score_storyc_measure"] = per_image(scorer.measure, ims, reps=3)
print("score", R["score_notebook"], R["score_storyc_measure"], flush=True)
del scorer

# ---------------------------------------------------------------- prompt alignment (Chinese CLIP)
from transformers import (BertTokenizer, ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel,  # noqa: E402
                          ChineseCLIPProcessor)

zh = root / "clip_zh"
zh.mkdir()
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(chr(c) for c in range(0x4E00, 0x4E00 + 20902))]
vocab += [f"[unused{i}]" for i in range(21128 - len(vocab))]  # the real vocabulary's size
(zh / "vocab.txt").write_text("\n".join(vocab) + "\n", "utf-8")
if SMOKE:
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    zcfg = ChineseCLIPConfig(text_config=dict(small, vocab_size=len(vocab)),
                             vision_config=dict(small, image_size=64, patch_size=32), projection_dim=16)
    side = 64
else:  # OFA-Sys/chinese-clip-vit-large-patch14: RoBERTa-wwm-base text tower, ViT-L/14 at 224 px
    zcfg = ChineseCLIPConfig(text_config=dict(vocab_size=21128), vision_config=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        image_size=224), projection_dim=768)
    side = 224
torch.manual_seed(0)
ChineseCLIPModel(zcfg).save_pretrained(zh, safe_serialization=True)
ChineseCLIPProcessor(image_processor=ChineseCLIPImageProcessor(size={"height": side, "width": side},
                                                              crop_size={"height": side, "width": side}),
                     tokenizer=BertTokenizer(str(zh / "vocab.txt"))).save_pretrained(zh)
t = time.perf_counter()
aligner = Aligner(zh, resources.for_score(DEV).device)
R["alignment_load_s"] = time.perf_counter() - t
R["alignment_storyc"] = per_image(lambda x: aligner.align(x, [PROMPT] * len(x)), ims, reps=3)
print("alignment", R["alignment_storyc"], flush=True)

write(out_dir(), "measure_bench.json", R)
print({k: v["s_per_image"] for k, v in R.items() if isinstance(v, dict) and "s_per_image" in v})
