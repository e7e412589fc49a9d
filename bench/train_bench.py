#!/usr/bin/env python3
"""Training speed: diffsynth's LightningModelForT2ILoRA (the notebook's train_kolors_lora.py) vs storyc's train
stage, same card, same run. Full-size Kolors-architecture models, random weights, 1024x1024, rank 16, batch 1.

  baseline  LightningModelForT2ILoRA, 16-mixed, gradient checkpointing, prompt through ChatGLM-6B and image
            through the VAE at every step (as the notebook runs it)
  storyc    storyc.stages.train.module.LoRAModule (what `storyc build` trains with): cached latents and
            embeddings, same LoRA / loss / timestep sampling, fused AdamW; variants: gradient checkpointing
            on/off, torch.compile on/off
Also the one-off cost of the cache pass (per image and per prompt) and the largest batch that fits.
Run on the GPU machine: bash bench/gpu.sh train
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import (SMOKE, DEV, DT, PROMPT, build_text_encoder, build_unet, build_vae, gpu_info, make_pipe, matmul_tflops,
                    out_dir, sync, torch, write)

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=12, help="timed steps per variant (after warm-up)")
p.add_argument("--warmup", type=int, default=4)
p.add_argument("--size", type=int, default=1024)
p.add_argument("--skip", default="")
p.add_argument("--ops", action="store_true", help="also: which aten ops (with input shapes) launch a LoRA step's "
               "copies and casts, from one eager forward + backward of the training UNet under the profiler")
args = p.parse_args()
skip = set(args.skip.split(",")) if args.skip else set()
import lightning as L  # noqa: E402

R = {"meta": {**gpu_info(), "size": args.size, "steps": args.steps}, "variants": {}}
R["meta"]["matmul_fp16_tflops"] = round(matmul_tflops(), 1)
out = out_dir()
t_all = time.perf_counter()
print("card", R["meta"], flush=True)


class StepTimer(L.Callback):
    def __init__(self):
        self.t, self.loss = [], []
        self._s = 0.0

    def on_train_batch_start(self, trainer, module, batch, idx):
        sync()
        self._s = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        sync()
        self.t.append(time.perf_counter() - self._s)
        self.loss.append(float(outputs["loss"]) if isinstance(outputs, dict) else None)


class KernelTime(L.Callback):
    """GPU kernel time of the last 3 timed steps (torch.profiler): how far a step is from launch-bound."""

    def __init__(self, first):
        self.first, self.prof, self.n = first, None, 0

    def on_train_batch_start(self, trainer, module, batch, idx):
        if idx == self.first and not SMOKE:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.start()

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        if self.prof is not None:
            self.n += 1

    def on_train_end(self, trainer, module):
        if self.prof is not None:
            sync()
            self.prof.stop()
            evs = self.prof.key_averages()
            self.kernel_s = sum(e.self_device_time_total for e in evs) / 1e6 / max(self.n, 1)
            self.kernels = sum(e.count for e in evs if e.device_type.name == "CUDA") / max(self.n, 1)
            # where the kernel time goes, per step: the 25 costliest kernel names
            cuda = sorted((e for e in evs if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
            self.top = [{"kernel": e.key[:160], "ms": round(e.self_device_time_total / 1e3 / max(self.n, 1), 3),
                         "count": round(e.count / max(self.n, 1), 1)} for e in cuda[:25]]


def fit(module, loader_len, gc_note):
    timer = StepTimer()
    kt = KernelTime(args.warmup + args.steps - 3)
    (SMOKE or torch.cuda.reset_peak_memory_stats())
    trainer = L.Trainer(accelerator="cpu" if SMOKE else "gpu", devices=1, precision="32-true" if SMOKE else "16-mixed", max_steps=args.warmup + args.steps,
                        callbacks=[timer, kt], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=make_loader(module.data, module.cfg, loader_len, module))
    wall = time.perf_counter() - t0
    steady = timer.t[args.warmup:-3] or timer.t[args.warmup:]  # the last 3 run under the profiler
    return {"s_per_step": statistics.median(steady), "steps": steady, "first_steps": timer.t[:args.warmup],
            "losses": timer.loss, "gpu_kernel_s_per_step": getattr(kt, "kernel_s", None), "kernels_per_step": getattr(kt, "kernels", None), "top_kernels": getattr(kt, "top", None),
            "peak_gib": (0 if SMOKE else round(torch.cuda.max_memory_allocated() / 2**30, 2)), "wall_s": wall, "note": gc_note}


te = build_text_encoder()
enc = build_vae("encoder")
S = args.size

# ---------------- (a) baseline: diffsynth's own LightningModule, encoding every step
if "baseline" not in skip:
    from diffsynth.trainers.text_to_image import LightningModelForT2ILoRA

    class Baseline(LightningModelForT2ILoRA):
        def __init__(self):
            super().__init__(learning_rate=1e-4, use_gradient_checkpointing=True)
            self.pipe = make_pipe(te, build_unet(seed=2), None, enc)
            self.pipe.scheduler.set_timesteps(1100)  # as train_kolors_lora.py does
            self.freeze_parameters()
            self.add_lora_to_model(self.pipe.denoising_model(), lora_rank=16, lora_alpha=4.0,
                                   lora_target_modules="to_q,to_k,to_v,to_out", init_lora_weights="gaussian")

        def train_dataloader(self):
            return None

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            return {"text": PROMPT, "image": torch.randn(3, S, S)}

    base = Baseline()
    timer = StepTimer()
    (SMOKE or torch.cuda.reset_peak_memory_stats())
    trainer = L.Trainer(accelerator="cpu" if SMOKE else "gpu", devices=1, precision="32-true" if SMOKE else "16-mixed", max_steps=args.warmup + args.steps,
                        callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(base, train_dataloaders=torch.utils.data.DataLoader(Images(), batch_size=1))
    R["variants"]["baseline"] = {"s_per_step": statistics.median(timer.t[args.warmup:]), "steps": timer.t[args.warmup:],
                                 "peak_gib": (0 if SMOKE else round(torch.cuda.max_memory_allocated() / 2**30, 2)),
                                 "note": "LightningModelForT2ILoRA, 16-mixed, GC on, ChatGLM + VAE every step"}
    print("baseline", R["variants"]["baseline"]["s_per_step"], flush=True)
    del base, trainer
    (SMOKE or torch.cuda.empty_cache())

# ---------------- cache pass cost (what storyc pays once per image / prompt)
from diffsynth.prompters import KolorsPrompter  # noqa: E402

te.to(DEV)  # Lightning's teardown moved the baseline's modules to the CPU
enc.to(DEV)
prompter = KolorsPrompter()
prompter.fetch_models(te)
img = torch.randn(1, 3, S, S, device=DEV, dtype=DT)
with torch.no_grad():
    for _ in range(2):
        lat = enc(img)
        pooled, emb = prompter.encode_prompt(PROMPT, device=DEV, positive=True)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        enc(img)
    sync()
    per_img = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    for _ in range(5):
        prompter.encode_prompt(PROMPT, device=DEV, positive=True)
    sync()
    per_txt = (time.perf_counter() - t) / 5
R["cache_pass"] = {"s_per_image": per_img, "s_per_prompt": per_txt}
data = {"latents": [{"latent": lat.to("cpu", torch.float16)}], "texts": [PROMPT], "text_of": [0],
        "emb": {PROMPT: {"encoder_hidden_states": emb.cpu(), "add_text_embeds": pooled.cpu()}}, "size": (S, S)}
del te, prompter, enc
(SMOKE or torch.cuda.empty_cache())

# ---------------- (b) storyc's LoRAModule on cached data
from storyc.model import LoRA  # noqa: E402
from storyc.stages.train.config import train_section  # noqa: E402
from storyc.stages.train.data import make_loader  # noqa: E402
from storyc.models.fused_lora import fuse_lora  # noqa: E402
from storyc.models.unet import half_norms  # noqa: E402
from storyc.stages.train.module import LoRAModule  # noqa: E402

LORA = LoRA.build({"rank": 16, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out"], "init": "gaussian",
                  "type": "lora", "factor": -1, "decompose_both": False})
# storyc: eager; storyc_graphs: train.cuda_graphs (what `storyc build` does by default on one GPU);
# storyc_compiled: train.compile (torch.compile of the whole UNet)
# *_peft: peft's own LoRA forward instead of storyc's fused one (storyc.models.fused_lora), same parameters;
# *_fp32_norms: autocast runs the Layer/GroupNorms in fp32 (storyc.models.unet.half_norms off)
variants = [("storyc_gc_on", {"gradient_checkpointing": True}), ("storyc", {}), ("storyc_peft", {"peft": True}),
            ("storyc_graphs", {"cuda_graphs": True}), ("storyc_graphs_peft", {"cuda_graphs": True, "peft": True}),
            ("storyc_graphs_fp32_norms", {"cuda_graphs": True, "fp32_norms": True}),
            ("storyc_compiled", {"compile": True})]
for name, over in variants:
    if name in skip:
        continue
    over = dict(over)
    peft_path = over.pop("peft", False)
    fp32_norms = over.pop("fp32_norms", False)
    tr = {"learning_rate": 1e-4, "gradient_checkpointing": False, "seed": 0, "random_flip": False, "center_crop": True,
          "compile": False, "cuda_graphs": False, **over}
    m = None
    try:
        m = LoRAModule(build_unet(seed=2), data, lora=LORA, train=train_section(tr))
        if peft_path:
            fuse_lora(m.unet, False)
        if fp32_norms:
            half_norms(m.unet, False)
        R["variants"][name] = fit(m, 10_000, f"cached latents/embeddings, GC {'on' if tr['gradient_checkpointing'] else 'off'}, "
                                             f"{'torch.compile' if tr['compile'] else 'CUDA graphs' if tr['cuda_graphs'] else 'eager'}, fused AdamW, "
                                             f"{'peft' if peft_path else 'fused'} LoRA layers"
                                             f"{', fp32 norms' if fp32_norms else ''}")
        if tr["cuda_graphs"]:
            R["variants"][name]["graphed"] = bool(m.graphed)
        print(name, R["variants"][name]["s_per_step"], "first", R["variants"][name]["first_steps"][:2], flush=True)
    except Exception as e:
        R["variants"][name] = {"error": repr(e)[:500]}
        print(name, "failed", repr(e)[:300], flush=True)
    del m
    (SMOKE or torch.cuda.empty_cache())

# ---------------- where a step's copies and casts come from (a graph replay shows kernels, not the ops behind them)
if args.ops:
    from torch.profiler import ProfilerActivity, profile

    m = LoRAModule(build_unet(seed=2), data, lora=LORA, train=train_section({
        "learning_rate": 1e-4, "gradient_checkpointing": False, "seed": 0, "random_flip": False, "center_crop": True}))
    unet = m.unet.to(DEV)
    lat = data["latents"][0]["latent"].to(DEV, DT)
    e = data["emb"][PROMPT]
    ehs, ate = e["encoder_hidden_states"].to(DEV, DT), e["add_text_embeds"].to(DEV, DT)
    tid = torch.tensor([S, S, 0, 0, S, S], device=DEV)
    t = torch.tensor([500], device=DEV)

    def step():
        unet.zero_grad(set_to_none=True)  # as the optimizer leaves them: no accumulation adds
        with torch.autocast(DEV, dtype=torch.float16, enabled=not SMOKE):
            out = unet(lat, timestep=t, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate)
        out.float().square().mean().backward()

    for _ in range(2):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([] if SMOKE else [ProfilerActivity.CUDA]), record_shapes=True) as prof:
        step()
        sync()
    keep = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::add", "aten::add_",
            "aten::mul", "aten::mm", "aten::addmm", "aten::addmm_")
    rows = [{"op": ev.key, "shapes": str(ev.input_shapes)[:160], "count": ev.count,
             "device_ms": round(ev.device_time_total / 1e3, 3)}
            for ev in prof.key_averages(group_by_input_shape=True) if ev.key in keep]
    rows.sort(key=lambda r: -r["count"])
    R["op_profile"] = rows[:60]
    print("\n== ops behind a LoRA step's copies, casts, adds and GEMMs (one eager step) ==")
    for r in rows[:60]:
        print(f"{r['count']:6d}  {r['device_ms']:8.3f} ms  {r['op']:<18} {r['shapes']}")
    del m, unet
    (SMOKE or torch.cuda.empty_cache())

# ---------------- largest batch that fits (storyc, GC off, eager) and images/s
if "batch" not in skip:
    best = None
    for bs in (2, 4, 8):
        try:
            d = dict(data, latents=data["latents"] * bs, text_of=[0] * bs)
            m = LoRAModule(build_unet(seed=2), d, lora=LORA, train=train_section({
                "learning_rate": 1e-4, "gradient_checkpointing": False, "seed": 0, "random_flip": False,
                "center_crop": True, "cuda_graphs": True, "batch_size": bs}))
            timer = StepTimer()
            trainer = L.Trainer(accelerator="cpu" if SMOKE else "gpu", devices=1, precision="32-true" if SMOKE else "16-mixed", max_steps=5, callbacks=[timer],
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
            trainer.fit(m, train_dataloaders=make_loader(d, m.cfg, 10_000, m))
            best = {"batch": bs, "s_per_step": statistics.median(timer.t[2:]),
                    "img_per_s": bs / statistics.median(timer.t[2:])}
            del m, trainer
            (SMOKE or torch.cuda.empty_cache())
        except (torch.cuda.OutOfMemoryError, RuntimeError):
            (SMOKE or torch.cuda.empty_cache())
            break
    R["largest_batch"] = best

# ---------------- summary: the notebook's 10 epochs x 500 steps
v = R["variants"]
fwd_tflop = 7.0  # measured by generate_bench (UNet forward at 1024x1024, batch 1)
R["floor_s_per_step"] = 3 * fwd_tflop / R["meta"]["matmul_fp16_tflops"]  # fwd + bwd(activations) + recompute-free
if "baseline" in v:
    for name in ("storyc", "storyc_graphs", "storyc_compiled", "storyc_gc_on"):
        if name in v and "s_per_step" in v[name]:
            v[name]["speedup_per_step"] = v["baseline"]["s_per_step"] / v[name]["s_per_step"]
            compile_s = sum(v[name]["first_steps"]) - args.warmup * v[name]["s_per_step"]
            total = 5000 * v[name]["s_per_step"] + max(compile_s, 0) + 100 * R["cache_pass"]["s_per_image"]
            v[name]["run_5000_steps_s"] = total
            v[name]["speedup_5000_steps"] = 5000 * v["baseline"]["s_per_step"] / total
if "losses" in v.get("storyc", {}) and "losses" in v.get("storyc_graphs", {}):
    # same seeds, same data, same LoRA init: the graphed steps should track the eager ones
    R["graphs_vs_eager_max_loss_diff"] = max(abs(a - b) for a, b in zip(v["storyc"]["losses"], v["storyc_graphs"]["losses"]))
if "s_per_step" in v.get("storyc_graphs", {}) and "s_per_step" in v.get("storyc_graphs_fp32_norms", {}):
    a, b = v["storyc_graphs"], v["storyc_graphs_fp32_norms"]
    a["speedup_vs_fp32_norms"] = b["s_per_step"] / a["s_per_step"]
    R["half_vs_fp32_norms_loss"] = {"max_rel_diff": max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["losses"], b["losses"])),
                                    "mean_half": statistics.mean(a["losses"]), "mean_fp32": statistics.mean(b["losses"])}
    print("half vs fp32 norms:", round(a["speedup_vs_fp32_norms"], 3), "x; losses", R["half_vs_fp32_norms_loss"], flush=True)
for a, b in (("storyc", "storyc_peft"), ("storyc_graphs", "storyc_graphs_peft")):
    if "losses" in v.get(a, {}) and "losses" in v.get(b, {}):  # same seeds and data: the fused layers track peft's
        la, lb = v[a]["losses"], v[b]["losses"]
        R[f"{a}_fused_vs_peft_loss"] = {"max_abs_diff": max(abs(x - y) for x, y in zip(la, lb)),
                                        "max_rel_diff": max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la, lb)),
                                        "mean_fused": statistics.mean(la), "mean_peft": statistics.mean(lb)}
        v[a]["speedup_vs_peft"] = v[b]["s_per_step"] / v[a]["s_per_step"]
from storyc.models import fused_lora  # noqa: E402

R["meta"]["fused_lora_fp32_gemm_out"] = fused_lora._F32_OUT[0]  # False: this torch refused addmm's out_dtype
R["meta"]["wall_s"] = time.perf_counter() - t_all
write(out, "train_results.json", R)
print("\n== train bench ==")
print(f"card: {R['meta']['gpu']}  torch {R['meta']['torch']}  fp16 matmul {R['meta']['matmul_fp16_tflops']} TFLOP/s")
for name, r in v.items():
    if "s_per_step" in r:
        extra = "".join(f"  {k} {r[k]:.2f}" for k in ("speedup_per_step", "speedup_5000_steps") if k in r)
        print(f"{name:<18} {r['s_per_step']:.3f} s/step  peak {r['peak_gib']} GiB{extra}  gpu kernels "
              f"{r.get('gpu_kernel_s_per_step')} s/step, {r.get('kernels_per_step')} kernels  ({r['note']})")
    else:
        print(f"{name:<16} {r}")
print("cache pass:", R["cache_pass"], " largest batch:", R.get("largest_batch"))
print("graphs vs eager, max |loss diff| per step:", R.get("graphs_vs_eager_max_loss_diff"))
for k in ("storyc", "storyc_graphs"):
    for t in v.get(k, {}).get("top_kernels") or ():
        print(f"  {k}: {t['ms']:8.3f} ms {t['count']:7.1f}x  {t['kernel']}")
    if f"{k}_fused_vs_peft_loss" in R:
        print(f"{k}: fused vs peft LoRA layers {v[k]['speedup_vs_peft']:.3f}x, losses {R[f'{k}_fused_vs_peft_loss']}")
print(f"floor ~{R['floor_s_per_step']:.3f} s/step (3 x 7.0 TFLOP at the fp16 matmul rate)")
