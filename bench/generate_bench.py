#!/usr/bin/env python3
"""Generation speed: the notebook's way vs storyc's generate stage, same card, same run, same seeds.

The story's 8 images at 1024x1024, 50 steps, cfg 4, full-size Kolors-architecture models with random weights.
  baseline  SDXLImagePipeline.__call__ one image at a time, peft LoRA injected and NOT merged (notebook's
            load_lora), fp16, diffsynth defaults (CFG = two batch-1 UNet calls per step)
  storyc    storyc.stages.generate.render: LoRA merged into the weights, scenes + CFG in one UNet batch
Also: images/s of the aesthetic scorer (CLIP ViT-L/14 vision tower + linear head), and the FLOP floor.
Run on the GPU machine: bash bench/gpu.sh generate
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import (SMOKE, DEV, DT, NEG, PROMPT, build_text_encoder, build_unet, build_vae, gpu_info, make_pipe,
                    matmul_tflops, out_dir, random_lora_state, sync, timed, torch, write)

p = argparse.ArgumentParser()
p.add_argument("--images", type=int, default=8)
p.add_argument("--steps", type=int, default=50)
p.add_argument("--size", type=int, default=1024)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--skip", default="", help="comma list: compile")
p.add_argument("--quick", action="store_true", help="only baseline vs storyc timings (no variants, fp32 checks, scorer)")
p.add_argument("--baseline-images", type=int, default=3, help="timed baseline images (each ~10 s on an H100)")
args = p.parse_args()
R = {"meta": {**gpu_info(), "steps": args.steps, "size": args.size, "images": args.images, "batch": args.batch}}
out = out_dir()
t_all = time.perf_counter()
R["meta"]["matmul_fp16_tflops"] = round(matmul_tflops(), 1)
print("card", R["meta"], flush=True)

te = build_text_encoder()
dec = build_vae("decoder")
base_unet = build_unet(seed=2)
lora_state = random_lora_state(base_unet)
rank, alpha_train, lora_scale = 16, 4.0, 0.5  # the camp story: trained alpha 4, applied at alpha 2
prompts = [(PROMPT + f"，第{i}幕", NEG, i) for i in range(args.images)]
gen = {"height": args.size, "width": args.size, "steps": args.steps, "cfg_scale": 4.0}

# ---------------- baseline: the notebook's pipeline with peft (unmerged) LoRA at alpha 2
from peft import LoraConfig, inject_adapter_in_model

unet_b = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha_train * lora_scale, init_lora_weights="gaussian",
                                            target_modules=["to_q", "to_k", "to_v", "to_out"]), base_unet)
unet_b.load_state_dict({k: v.to(DEV, DT) for k, v in lora_state.items()}, strict=False)
pipe_b = make_pipe(te, unet_b, dec)


def baseline_image(i):
    pr, ng, seed = prompts[i]
    return pipe_b(prompt=pr, negative_prompt=ng, cfg_scale=4.0, num_inference_steps=args.steps, height=args.size,
                  width=args.size, seed=seed, progress_bar_cmd=lambda x: x)


baseline_image(0)  # warm-up (cudnn autotune, allocator)
times, base_imgs = [], {}
n_base = min(args.baseline_images, args.images)
for i in range(n_base):
    sync()
    t = time.perf_counter()
    base_imgs[i] = baseline_image(i)
    sync()
    times.append(time.perf_counter() - t)
    print(f"baseline image {i}: {times[-1]:.2f}s", flush=True)
R["baseline"] = {"s_per_image": float(np.median(times)), "all": times,
                 "what": "SDXLImagePipeline.__call__, peft LoRA unmerged, batch 1, CFG as 2 UNet calls"}
R["baseline"]["s_for_8"] = R["baseline"]["s_per_image"] * args.images

# one denoising step, the notebook's way: two batch-1 UNet calls per scene, unmerged LoRA, CFG 4
g = torch.Generator(device=DEV).manual_seed(123)
probe_lat = torch.randn(2, 4, args.size // 8, args.size // 8, device=DEV, dtype=DT, generator=g)
probe_t = torch.tensor([500], device=DEV)
tid1 = torch.tensor([args.size, args.size, 0, 0, args.size, args.size], device=DEV)
probe_emb = [(pipe_b.encode_prompt(prompts[i][0]), pipe_b.encode_prompt(prompts[i][1], positive=False)) for i in range(2)]
with torch.no_grad():
    base_pred = []
    for i in range(2):
        (pe, ne) = probe_emb[i]
        po = unet_b(probe_lat[i:i + 1], probe_t, pe["encoder_hidden_states"], tid1, pe["add_text_embeds"]).float()
        no = unet_b(probe_lat[i:i + 1], probe_t, ne["encoder_hidden_states"], tid1, ne["add_text_embeds"]).float()
        base_pred.append(no + 4.0 * (po - no))
    base_pred = torch.cat(base_pred)

# ---------------- storyc: merged LoRA, scenes + CFG batched
from storyc import lora
from storyc.stages.generate import render

del pipe_b, unet_b
(SMOKE or torch.cuda.empty_cache())
unet_s = build_unet(seed=2)  # same random weights as the baseline's base UNet
lora.merge(unet_s, lora_state, alpha_train * lora_scale / rank)
dec16 = build_vae("decoder").to(DT)  # the stage loads the fp16-fix VAE in the pipeline's dtype (load_vae)
pipe_s = make_pipe(te, unet_s, dec16)
items = [{"prompt": pr, "negative_prompt": ng, "seed": s} for pr, ng, s in prompts]

# the same step, storyc's way: merged LoRA, both scenes and CFG in one batch-4 call
with torch.no_grad():
    ehs = torch.cat([probe_emb[0][0]["encoder_hidden_states"], probe_emb[1][0]["encoder_hidden_states"],
                     probe_emb[0][1]["encoder_hidden_states"], probe_emb[1][1]["encoder_hidden_states"]])
    ate = torch.cat([probe_emb[0][0]["add_text_embeds"], probe_emb[1][0]["add_text_embeds"],
                     probe_emb[0][1]["add_text_embeds"], probe_emb[1][1]["add_text_embeds"]])
    pred4 = unet_s(torch.cat([probe_lat, probe_lat]), probe_t, ehs, tid1.repeat(4), ate).float()
    ours = pred4[2:] + 4.0 * (pred4[:2] - pred4[2:])
R["equality_step"] = {"rel_err_cfg_noise_pred": float((ours - base_pred).norm() / base_pred.norm())}
print("one-step CFG noise prediction, storyc vs notebook, relative error:", R["equality_step"], flush=True)


def timed_render(tag, pipe=None, ctx=None):
    """Warm up at the batch shapes, then time the 8 images; returns seconds (also kept in R)."""
    import contextlib

    pipe = pipe or pipe_s
    with (ctx or contextlib.nullcontext()):
        sync()
        t = time.perf_counter()
        render(pipe, items[:min(2, len(items))], {**gen, "steps": 2}, args.batch)
        render(pipe, items, {**gen, "steps": 1}, args.batch)
        sync()
        warm = time.perf_counter() - t
        t = time.perf_counter()
        render(pipe, items, gen, args.batch)
        sync()
    R.setdefault("storyc_variants", {})[tag] = {"s_for_8": time.perf_counter() - t, "warmup_s": warm}
    print(f"storyc {tag}: {R['storyc_variants'][tag]}", flush=True)
    return R["storyc_variants"][tag]["s_for_8"]


render(pipe_s, items[:min(2, len(items))], {**gen, "steps": 2}, args.batch)  # warm-up at the batch shapes
render(pipe_s, items, {**gen, "steps": 1}, args.batch)
(SMOKE or torch.cuda.reset_peak_memory_stats())
sync()
t = time.perf_counter()
imgs = render(pipe_s, items, gen, args.batch)
sync()
total = time.perf_counter() - t
R["storyc"] = {"s_for_8": total, "s_per_image": total / args.images, "batch": args.batch,
               "peak_gib": (0 if SMOKE else round(torch.cuda.max_memory_allocated() / 2**30, 2)),
               "what": "storyc.stages.generate.render: merged LoRA, 8 scenes x CFG = 16 per UNet call"}
sync()
t = time.perf_counter()
render(pipe_s, items[:1], gen, 1)
sync()
R["storyc"]["s_single_image_b1"] = time.perf_counter() - t

# where storyc's time goes: prompt encoding, the denoising loop, the VAE decode (fp16 vs the notebook's fp32)
with torch.no_grad():
    R["storyc"]["encode_16_prompts_s"] = timed(lambda: [pipe_s.encode_prompt(p_, positive=True) for p_, _, _ in prompts * 2],
                                               reps=2, warmup=1)[0]
    from storyc.stages.generate import encode_prompts

    R["storyc"]["encode_16_prompts_batched_s"] = timed(lambda: encode_prompts(pipe_s, [p_ for p_, _, _ in prompts],
                                                                              [n_ for _, n_, _ in prompts]), reps=2, warmup=1)[0]
    lat8 = torch.randn(1, 4, args.size // 8, args.size // 8, device=DEV, dtype=DT)
    R["storyc"]["decode_fp16_s_per_image"] = timed(lambda: pipe_s.decode_image(lat8), reps=4, warmup=1)[0]
    pipe_s.vae_decoder = dec
    R["storyc"]["decode_fp32_s_per_image"] = timed(lambda: pipe_s.decode_image(lat8), reps=4, warmup=1)[0]
    pipe_s.vae_decoder = dec16
print("breakdown:", {k: v for k, v in R["storyc"].items() if k.startswith(("encode", "decode"))}, flush=True)
if not SMOKE and not args.quick:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for tag, backend in (("cudnn_attention", SDPBackend.CUDNN_ATTENTION), ("flash_attention", SDPBackend.FLASH_ATTENTION)):
        try:
            timed_render(tag, ctx=sdpa_kernel([backend]))
        except Exception as e:
            R.setdefault("storyc_variants", {})[tag] = {"error": repr(e)[:300]}
            print(tag, "failed", repr(e)[:300], flush=True)
    if "compile" not in args.skip:
        from common import compile_regions

        compile_regions(unet_s)
        try:
            timed_render("regional_compile")
            timed_render("regional_compile_2nd")
        except Exception as e:
            R.setdefault("storyc_variants", {})["regional_compile"] = {"error": repr(e)[:300]}
            print("regional compile failed", repr(e)[:300], flush=True)

# same images? (same seeds, merged vs unmerged, batched vs not; fp16)
diffs = []
for i, img in base_imgs.items():
    a, b = np.asarray(img).astype(np.int16), np.asarray(imgs[i]).astype(np.int16)
    diffs.append({"max_abs": int(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean()),
                  "baseline_std": float(a.std())})
R["equality"] = diffs

# ---------------- is it the same function? fp32 removes fp16 rounding, which random weights amplify
def cfg_pred(unet, lat, embs, batched, dtype):
    with torch.no_grad():
        if batched:
            ehs = torch.cat([e[j]["encoder_hidden_states"] for j in (0, 1) for e in embs]).to(dtype)
            ate = torch.cat([e[j]["add_text_embeds"] for j in (0, 1) for e in embs]).to(dtype)
            o = unet(torch.cat([lat, lat]).to(dtype), probe_t, ehs, tid1.repeat(2 * len(embs)), ate).float()
            n = len(embs)
            return o[n:] + 4.0 * (o[:n] - o[n:])
        outs = []
        for i, e in enumerate(embs):
            po = unet(lat[i:i + 1].to(dtype), probe_t, e[0]["encoder_hidden_states"].to(dtype), tid1,
                      e[0]["add_text_embeds"].to(dtype)).float()
            no = unet(lat[i:i + 1].to(dtype), probe_t, e[1]["encoder_hidden_states"].to(dtype), tid1,
                      e[1]["add_text_embeds"].to(dtype)).float()
            outs.append(no + 4.0 * (po - no))
        return torch.cat(outs)


def rel(a, b):
    return float((a - b).norm() / b.norm())


if not args.quick:
    eq = {}
    eq["fp16_batched_vs_b1_same_merged_unet"] = rel(cfg_pred(unet_s, probe_lat, probe_emb, True, DT),
                                                    cfg_pred(unet_s, probe_lat, probe_emb, False, DT))
    del pipe_s, unet_s
    (SMOKE or torch.cuda.empty_cache())
    u_base = build_unet(seed=2).float()
    u_base = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha_train * lora_scale, init_lora_weights="gaussian",
                                                target_modules=["to_q", "to_k", "to_v", "to_out"]), u_base)
    u_base.load_state_dict({k: v.to(DEV) for k, v in lora_state.items()}, strict=False)
    ref32 = cfg_pred(u_base, probe_lat, probe_emb, False, torch.float32)
    del u_base
    (SMOKE or torch.cuda.empty_cache())
    u_ours = build_unet(seed=2).float()
    lora.merge(u_ours, lora_state, alpha_train * lora_scale / rank)
    eq["fp32_storyc_vs_notebook"] = rel(cfg_pred(u_ours, probe_lat, probe_emb, True, torch.float32), ref32)
    R["equality_step"].update(eq)
    print("one-step equality:", R["equality_step"], flush=True)
    unet_s = u_ours.to(DT)


# ---------------- UNet FLOPs and floor
from torch.utils.flop_counter import FlopCounterMode

lat = torch.randn(1, 4, args.size // 8, args.size // 8, device=DEV, dtype=DT)
emb = probe_emb[0][0]
tid = torch.tensor([args.size, args.size, 0, 0, args.size, args.size], device=DEV)
with torch.no_grad(), FlopCounterMode(display=False) as fc:
    unet_s(lat, torch.tensor([500], device=DEV), emb["encoder_hidden_states"], tid, emb["add_text_embeds"])
fwd = fc.get_total_flops()
R["flops"] = {"unet_fwd_b1_tflop": fwd / 1e12,
              "floor_s_per_image": 2 * args.steps * fwd / (R["meta"]["matmul_fp16_tflops"] * 1e12)}
R["speedup"] = R["baseline"]["s_for_8"] / R["storyc"]["s_for_8"]
R["storyc"]["x_floor"] = R["storyc"]["s_per_image"] / R["flops"]["floor_s_per_image"]

# ---------------- aesthetic scorer throughput (CLIP ViT-L/14 + linear head), fp16
from transformers import CLIPVisionConfig

from aesthetics_predictor import AestheticsPredictorV2Linear  # noqa: E402

if args.quick:
    R["score"] = {"skipped": "--quick"}
else:
    try:
        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=768)
        sc = AestheticsPredictorV2Linear(cfg).to(DEV, DT).eval()
        x = torch.randn(8, 3, 224, 224, device=DEV, dtype=DT)
        with torch.no_grad():
            t8, _ = timed(lambda: sc(pixel_values=x), reps=10, warmup=2)
            t1, _ = timed(lambda: sc(pixel_values=x[:1]), reps=10, warmup=2)
        R["score"] = {"img_per_s_b1": 1 / t1, "img_per_s_b8": 8 / t8}
    except Exception as e:  # the scorer wheel may be missing on the GPU image
        R["score"] = {"error": repr(e)}
R["meta"]["wall_s"] = time.perf_counter() - t_all
write(out, "generate_results.json", R)
print("\n== generate bench ==")
print(f"card: {R['meta']['gpu']}  torch {R['meta']['torch']}  fp16 matmul {R['meta']['matmul_fp16_tflops']} TFLOP/s")
print(f"baseline (notebook way): {R['baseline']['s_per_image']:.2f} s/image  -> {R['baseline']['s_for_8']:.1f} s for 8")
print(f"storyc generate stage:   {R['storyc']['s_per_image']:.2f} s/image  -> {R['storyc']['s_for_8']:.1f} s for 8 "
      f"(peak {R['storyc']['peak_gib']} GiB)")
print(f"speed-up {R['speedup']:.2f}x; floor {R['flops']['floor_s_per_image']:.2f} s/image; storyc at "
      f"{R['storyc']['x_floor']:.2f}x the floor")
print("same seeds, baseline vs storyc pixels (random weights amplify fp16 rounding over 50 steps):", diffs)
print("variants:", R.get("storyc_variants"), " one-step relative error:", R["equality_step"])
print("scorer:", R["score"])
