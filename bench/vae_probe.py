#!/usr/bin/env python3
"""Where the hi-res refine pass's non-UNet time goes (issue 24): the SDXL VAE's precision and layout variants, and
what one UNet call at 2048² costs at batch 1 against batch 2 (skipping the unconditional row on the last steps).

Full-size Kolors-architecture models with random weights (speed does not depend on weight values):
  decode   pipe.decode_image(latents, tiled=False), storyc's refine call, for a 2048² and a 1024² image
  encode   pipe.encode_image(x, tiled=False) of a random image in [-1, 1], 2048² and 1024²
  variants fp32_ref   fp32 weights, no autocast, TF32 off: the reference every other output is compared with
           fp32_tf32  fp32 weights, no autocast, PyTorch's default TF32 for convolutions (refine before autocast)
           A          storyc now: fp32 weights under storyc.stages.refine.vae_precision (bf16 autocast)
           B          the VAE's weights converted to bf16, no autocast, input in bf16
           C          B with the module and its input in channels_last
           D_<k>      B with scaled_dot_product_attention pinned to backend k (the mid-block attention, head dim 512)
           each: median seconds of --reps after --warmup (torch.cuda.synchronize around each), peak GiB allocated
           (reset before the timed reps; the UNet's and the VAE's weights are resident, as in a refine), and the
           output's max/mean absolute difference from fp32_ref: the decoder's float output in [-1, 1] and the
           uint8 pixels of the PIL image storyc saves; the encoder's latents (scaled, as the UNet gets them)
  profile  a CUDA-kernel profile (top 15 kernels, share of kernel time) of A's 2048² decode and of the fastest variant's
  unet     the fp16 UNet called as storyc's denoise calls it (x, timestep, ChatGLM states, time ids, pooled), at 2048²
           batch 1 and 2 and 1024² batch 1 and 2: eager, and replayed from a CUDA graph (storyc's _GraphedCall)
Run on the GPU machine: bash bench/gpu.sh vae   (BENCH_SMOKE=1 python3 bench/vae_probe.py: CPU plumbing check)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics

from common import (DEV, DT, SMOKE, build_unet, build_vae, gpu_info, make_pipe, out_dir, peak, peak_reset, sync,
                    timed, torch, write)

p = argparse.ArgumentParser()
p.add_argument("--reps", type=int, default=5)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--sizes", default="2048,1024", help="image sides (px); the first is the one profiled")
p.add_argument("--skip", default="", help="comma list: decode, encode, sdpa, profile, unet, graphs")
p.add_argument("--unet-rows", default="1,2", help="comma list of UNet batch rows timed at each size (2: the CFG pair; "
               "4: two scenes' pairs in one call)")
args = p.parse_args()
skip = set(args.skip.split(","))
SIZES = [16, 8] if SMOKE else [int(s) for s in args.sizes.split(",")]
REPS, WARM = (1, 1) if SMOKE else (max(5, args.reps), max(2, args.warmup))
R = {"meta": {**gpu_info(), "reps": REPS, "warmup": WARM, "sizes": SIZES, "timing": "median wall s, synchronised",
              "pixel_diff": "uint8 levels (0-255) of the PIL image pipe.decode_image returns",
              "float_diff": "decoder output as float in [-1, 1] (before the PIL conversion); encoder: latents x 0.13025"}}
OUT = out_dir()
print("card", R["meta"], flush=True)


def save():
    write(OUT, "vae_probe.json", R)


from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from storyc.stages.refine import vae_precision  # noqa: E402

enc, dec = build_vae("encoder"), build_vae("decoder")
unet = build_unet()
pipe = make_pipe(None, unet, dec, enc)
R["meta"]["vae_params_m"] = {"encoder": sum(x.numel() for x in enc.parameters()) / 1e6,
                             "decoder": sum(x.numel() for x in dec.parameters()) / 1e6}
# which SDPA kernel PyTorch picks for the VAE's attention (1 head of 512 over the latent's pixels)
for dt in (torch.bfloat16, torch.float32):
    n = 64 if SMOKE else (SIZES[0] // 8) ** 2
    q = torch.randn(1, 1, n, 512, device=DEV, dtype=dt)
    try:
        R["meta"][f"sdpa_choice_{str(dt)[6:]}"] = str(SDPBackend(torch._fused_sdp_choice(q, q, q)))
    except Exception as e:  # noqa: BLE001
        R["meta"][f"sdpa_choice_{str(dt)[6:]}"] = repr(e)[:200]
    del q
print("sdpa picks", {k: v for k, v in R["meta"].items() if k.startswith("sdpa")}, flush=True)


@contextlib.contextmanager
def strict_fp32():
    """fp32 without TF32 (cuDNN allows TF32 for convolutions by default)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


BF16 = torch.bfloat16
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def variants(base, sdpa: bool):
    """name -> (module, context factory, input dtype, channels_last); modules made on demand (bf16 copies)."""
    cl = torch.channels_last
    v = {"fp32_ref": (lambda: base, strict_fp32, torch.float32, False),
         "fp32_tf32": (lambda: base, contextlib.nullcontext, torch.float32, False),
         "A_autocast_bf16": (lambda: base, lambda: vae_precision(pipe), DT, False),
         "B_bf16": (lambda: copy.deepcopy(base).to(BF16), contextlib.nullcontext, BF16, False),
         "C_bf16_channels_last": (lambda: copy.deepcopy(base).to(BF16).to(memory_format=cl), contextlib.nullcontext,
                                  BF16, True)}
    if sdpa:
        for k, b in SDPA.items():
            v[f"D_bf16_sdpa_{k}"] = (lambda: copy.deepcopy(base).to(BF16), (lambda b=b: sdpa_kernel([b])), BF16, False)
    return v


def diff(a, b) -> dict:
    d = (a.float() - b.float()).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}


def pixel_diff(im, ref) -> dict:
    import numpy as np

    d = np.abs(np.asarray(im, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    return {"max_abs": int(d.max()), "mean_abs": float(d.mean()), "frac_differing": float((d > 0).mean())}


def run_variants(kind: str, size: int, x0):
    """Time, measure and compare each variant of the decoder (kind 'decode') or encoder ('encode') on input x0."""
    base = dec if kind == "decode" else enc
    attr = "vae_decoder" if kind == "decode" else "vae_encoder"
    call = pipe.decode_image if kind == "decode" else pipe.encode_image
    res, ref, ref_img = {}, None, None
    for name, (make, ctx, dt, cl) in variants(base, "sdpa" not in skip).items():
        rec = {}
        try:
            m = make()
            setattr(pipe, attr, m)
            x = x0.to(dt)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), ctx():
                y = m(x, tiled=False)  # the float output (decode: in [-1, 1]; encode: scaled latents)
                img = call(x, tiled=False) if kind == "decode" else None
                for _ in range(WARM - 1):
                    call(x, tiled=False)
                base_gib = None if SMOKE else round(torch.cuda.memory_allocated() / 2 ** 30, 2)
                peak_reset()
                s, ts = timed(lambda: call(x, tiled=False), reps=REPS)
                rec.update(s=round(s, 4), times=[round(t, 4) for t in ts], peak_gib=peak(), allocated_before_gib=base_gib)
            if name == "fp32_ref":
                ref, ref_img = y.float(), img
                rec["output"] = {"mean": float(ref.mean()), "std": float(ref.std()), "min": float(ref.min()),
                                 "max": float(ref.max())}
            else:
                rec["float_diff"] = diff(y, ref)
                if img is not None:
                    rec["pixel_diff"] = pixel_diff(img, ref_img)
            if kind == "decode" and name in ("fp32_ref", "B_bf16"):  # what the PIL conversion alone costs
                rec["to_pil_s"] = round(timed(lambda: pipe.vae_output_to_image(y), reps=REPS, warmup=1)[0], 4)
            del m, x, y
        except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape: recorded, not fatal
            rec["error"] = repr(e)[:300]
        finally:
            setattr(pipe, attr, base)
        if not SMOKE:
            torch.cuda.empty_cache()
        res[name] = rec
        print(f"{kind} {size}² {name:24s}", {k: v for k, v in rec.items() if k != "times"}, flush=True)
    return res


g = torch.Generator(device=DEV).manual_seed(0)
for kind in ("decode", "encode"):
    if kind in skip:
        continue
    R[kind] = {}
    for size in SIZES:
        if kind == "decode":
            x0 = torch.randn(1, 4, size // 8, size // 8, device=DEV, generator=g).to(DT)  # latents as denoise leaves them
        else:
            x0 = (torch.rand(1, 3, size, size, device=DEV, generator=g) * 2 - 1).to(DT)  # as preprocess_image + .to(DT)
        try:
            R[kind][str(size)] = run_variants(kind, size, x0)
        except Exception as e:  # noqa: BLE001
            R[kind][str(size)] = {"error": repr(e)[:300]}
            print(kind, size, "failed", e, flush=True)
        save()


# ---------------- kernel profiles of the 2048² decode: A against the fastest variant
def profile(fn) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([] if SMOKE else [ProfilerActivity.CUDA])
    with prof(activities=acts) as pr:
        fn()
        sync()
    top, count = {}, {}
    for e in pr.events():
        if SMOKE:  # no kernels on the CPU: the top-level ops stand in, so the plumbing is exercised
            us = e.cpu_time_total if e.cpu_parent is None else 0
        else:
            us = getattr(e, "device_time", 0) if e.device_type.name == "CUDA" else 0
        if us:
            top[e.name[:160]] = top.get(e.name[:160], 0.0) + us / 1e3
            count[e.name[:160]] = count.get(e.name[:160], 0) + 1
    total = sum(top.values())
    return {"kernel_ms": round(total, 2),
            "top15": [{"kernel": k, "ms": round(v, 3), "share": round(v / total, 4) if total else None,
                       "calls": count[k]} for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]]}


dec_res = R.get("decode", {}).get(str(SIZES[0]), {})
if "profile" not in skip and "A_autocast_bf16" in dec_res:
    R["profile"] = {}
    timed_ok = {k: v["s"] for k, v in dec_res.items() if "s" in v and k[0] in "BCD"}
    best = min(timed_ok, key=timed_ok.get) if timed_ok else None
    size = SIZES[0]
    lat = torch.randn(1, 4, size // 8, size // 8, device=DEV, generator=g).to(DT)
    for name in ["A_autocast_bf16"] + ([best] if best else []):
        make, ctx, dt, cl = variants(dec, True)[name]
        try:
            m = make()
            pipe.vae_decoder = m
            x = lat.to(dt)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), ctx():
                pipe.decode_image(x, tiled=False)  # warm
                rec = profile(lambda: pipe.decode_image(x, tiled=False))
            rec["variant"] = name
            R["profile"]["A" if name == "A_autocast_bf16" else "best"] = rec
            print(f"profile {name}: {rec['kernel_ms']} ms of kernels", flush=True)
            for r_ in rec["top15"]:
                print(f"  {r_['ms']:9.3f} ms {100 * (r_['share'] or 0):5.1f}% x{r_['calls']:<4d} {r_['kernel'][:110]}",
                      flush=True)
            del m, x
        except Exception as e:  # noqa: BLE001
            R["profile"][name] = {"error": repr(e)[:300]}
            print("profile", name, "failed", e, flush=True)
        finally:
            pipe.vae_decoder = dec
    save()


# ---------------- the UNet as storyc's denoise calls it: one call, batch 1 (no CFG) vs 2 (cond + uncond rows)
if "unet" not in skip:
    from storyc.stages.generate import _GraphedCall

    DIM, POOLED, LEN = 4096, 4096, 256  # ChatGLM hidden states, pooled, 256 tokens
    if SMOKE:
        from storyc.models.tiny import TINY_UNET

        DIM, POOLED, LEN = TINY_UNET["encoder_hid_dim"], TINY_UNET["projection_class_embeddings_input_dim"] - 6 * \
            TINY_UNET["addition_time_embed_dim"], 16
    R["unet"] = {}
    U_SIZES = [128, 64] if SMOKE else SIZES[:2]  # the tiny UNet's GroupNorm needs a latent of 8 px or more
    U_ROWS = [int(v) for v in args.unet_rows.split(",")]
    for size, rows in [(sz, n) for sz in U_SIZES for n in U_ROWS]:
        key = f"{size}_b{rows}"
        rec = R["unet"][key] = {"size": size, "latent": [rows, 4, size // 8, size // 8], "rows": rows}
        try:
            x = torch.randn(rows, 4, size // 8, size // 8, device=DEV, dtype=DT, generator=g)
            ehs = torch.randn(rows, LEN, DIM, device=DEV, dtype=DT, generator=g)
            ate = torch.randn(rows, POOLED, device=DEV, dtype=DT, generator=g)
            tid = torch.tensor([size, size, 0, 0, size, size], device=DEV).repeat(rows)
            t = torch.tensor([500.0], device=DEV)
            with torch.no_grad():
                def eager():
                    return unet(x, timestep=t, encoder_hidden_states=ehs, add_time_id=tid, add_text_embeds=ate)
                for _ in range(WARM):
                    eager()
                peak_reset()
                s, ts = timed(eager, reps=REPS)
                rec.update(eager_s=round(s, 4), eager_times=[round(v, 4) for v in ts], eager_peak_gib=peak())
                if "graphs" not in skip and not SMOKE:
                    gc = _GraphedCall(unet)
                    for _ in range(1 + WARM):  # the first call runs eagerly, the second captures, then replays
                        gc(x, t, ehs, tid, ate)
                    s, ts = timed(lambda: gc(x, t, ehs, tid, ate), reps=REPS)
                    rec.update(graphed_s=round(s, 4), graphed_times=[round(v, 4) for v in ts],
                               graph_captured=gc.graph is not False)
                    del gc
            del x, ehs, ate
        except Exception as e:  # noqa: BLE001
            rec["error"] = repr(e)[:300]
        if not SMOKE:
            torch.cuda.empty_cache()
        print("unet", key, {k: v for k, v in rec.items() if not k.endswith("times")}, flush=True)
    for size in U_SIZES:
        b1, b2 = R["unet"].get(f"{size}_b1", {}), R["unet"].get(f"{size}_b2", {})
        for m_ in ("eager_s", "graphed_s"):
            if m_ in b1 and m_ in b2:
                R["unet"][f"{size}_b1_over_b2_{m_[:-2]}"] = round(b1[m_] / b2[m_], 3)
            for n in U_ROWS:  # the cost of one row at n rows a call, against at the CFG pair's 2
                bn = R["unet"].get(f"{size}_b{n}", {})
                if n > 2 and m_ in bn and m_ in b2:
                    R["unet"][f"{size}_row_at_b{n}_over_b2_{m_[:-2]}"] = round(bn[m_] / n / (b2[m_] / 2), 3)
    save()


# ---------------- a readable table
def table():
    lines = []
    for kind in ("decode", "encode"):
        for size, res in R.get(kind, {}).items():
            lines.append(f"\n{kind} {size}x{size}  (s: median of {REPS}; diff vs fp32_ref: float max/mean"
                         + (", uint8 pixels max/mean/frac differing)" if kind == "decode" else ")"))
            for name, r_ in res.items():
                if not isinstance(r_, dict):
                    continue
                if "error" in r_:
                    lines.append(f"  {name:24s} error: {r_['error'][:110]}")
                    continue
                fd, pd = r_.get("float_diff", {}), r_.get("pixel_diff", {})
                fds = f"{fd['max_abs']:.4g}/{fd['mean_abs']:.3g}" if fd else "-"
                pds = f"{pd['max_abs']}/{pd['mean_abs']:.3g}/{pd['frac_differing']:.3f}" if pd else ""
                lines.append(f"  {name:24s} {r_['s']:8.4f} s  peak {r_['peak_gib']} GiB  float {fds}  {pds}"
                             + (f"  (to PIL {r_['to_pil_s']} s)" if "to_pil_s" in r_ else ""))
    if "unet" in R:
        lines.append("\nunet one call (s, median)")
        for k, r_ in R["unet"].items():
            if isinstance(r_, dict):
                lines.append(f"  {k:10s} eager {r_.get('eager_s')}  graphed {r_.get('graphed_s')}  "
                             f"peak {r_.get('eager_peak_gib')} GiB" + (f"  error {r_['error'][:100]}" if "error" in r_ else ""))
            else:
                lines.append(f"  {k} = {r_}")
    return "\n".join(lines)


R["table"] = table()
save()
print(R["table"], flush=True)
print("wrote", OUT / "vae_probe.json", flush=True)
