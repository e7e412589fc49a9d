"""The hi-res refine pass (generation.refine): a stage kind of its own after generate, declared once in the
registry; tuning it reruns refine, score and bundle, never generate or train; images/ holds the refined images."""
import json

import yaml
from PIL import Image

from conftest import edit, ran, run_cli

REFINE = "batch_size: 1, refine: {scale: 2.0, strength: 0.5, steps: 4}}"


def _lock(spec):
    return yaml.safe_load((spec.parent / "story.lock").read_text("utf-8"))["stages"]


def test_refine_runs_after_generate_and_only_it_reruns_when_tuned(copy):
    edit(copy, "batch_size: 1}", REFINE)
    r = run_cli("status", copy, cwd=copy.parent)
    assert "refine[home]" in r.stdout and "never built" in r.stdout
    assert "generate[home]  up to date" in r.stdout.replace("   ", "  ") or "generate[home]" in r.stdout
    r = run_cli("build", copy, cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    scenes = ("home", "concert", "stage")
    assert ran(copy) == {f"{k}[{s}]" for k in ("refine", "score") for s in scenes} | {"bundle"}
    sub = copy.parent / "build/t/submission/t"
    for i, s in enumerate(scenes):
        with Image.open(sub / f"images/0{i + 1}-{s}.png") as im:
            assert im.size == (128, 128)  # the refined size: 2 x 64
        assert (sub / f"images/0{i + 1}-{s}.png").read_bytes() == \
            (copy.parent / f"build/t/refined/0{i + 1}-{s}.png").read_bytes()
    prompts = json.loads((sub / "prompts.json").read_text("utf-8"))["scenes"]
    assert prompts[0]["width"] == 128 and prompts[0]["refine"]["strength"] == 0.5
    scored = run_cli("score", sub, "--spec", copy, "--min", "-1", cwd=copy.parent)  # evaluate() on images/
    mean = float(scored.stdout.splitlines()[-1].split()[1])
    assert abs(mean - json.loads((sub / "scores.json").read_text("utf-8"))["mean"]) < 1e-4
    lock = _lock(copy)
    assert lock["score[home]"]["params"]["file"] == "refined/01-home.png" and "refine[home]" in lock

    edit(copy, "strength: 0.5", "strength: 0.6")  # tuning the refine pass: refine, score, bundle only
    r = run_cli("status", copy, cwd=copy.parent)
    assert "refine.strength changed" in r.stdout
    assert run_cli("build", copy, "-q", cwd=copy.parent).returncode == 0
    assert ran(copy) == {f"{k}[{s}]" for k in ("refine", "score") for s in scenes} | {"bundle"}

    # one scene enlarged by Real-ESRGAN (DiffSynth's ModelManager and extension; a full-architecture random
    # RRDBNet in the RealESRGAN_x4.pth layout): that scene's refine reruns; without models.esrgan, a spec error
    home = "{id: home, prompt: 一个紫色短发小女孩在家, seed: 0, caption: 在家"
    edit(copy, home + "}", home + ", refine: {upscaler: esrgan}}")
    r = run_cli("validate", copy, cwd=copy.parent)
    assert r.returncode == 1 and "$.scenes[0].refine.upscaler: upscaler `esrgan` needs the Real-ESRGAN" in r.stderr
    assert "models: {esrgan: modelscope:AI-ModelScope/Real-ESRGAN}" in r.stderr and "Traceback" not in r.stderr
    lanczos = (copy.parent / "build/t/refined/01-home.png").read_bytes()
    edit(copy, "models: {", "models: {esrgan: 'tiny:esrgan', ")
    r = run_cli("build", copy, "-q", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ran(copy) == {"refine[home]", "score[home]", "bundle"}
    times = json.loads((copy.parent / "build/t/build_times.json").read_text("utf-8"))
    assert times["metrics"]["refine.esrgan_s"] > 0
    lock = _lock(copy)
    assert lock["refine[home]"]["params"]["esrgan"] == "tiny:esrgan" and "esrgan" not in lock["refine[stage]"]["params"]
    with Image.open(copy.parent / "build/t/refined/01-home.png") as im:
        assert im.size == (128, 128)
    assert (copy.parent / "build/t/refined/01-home.png").read_bytes() != lanczos

    edit(copy, "{id: concert, prompt: 一个紫色短发小女孩在演唱会, seed: 1, caption: 演唱会}",
         "{id: concert, prompt: 一个紫色短发小女孩在演唱会, seed: 1, caption: 演唱会, refine: false}")
    assert run_cli("build", copy, "-q", cwd=copy.parent).returncode == 0
    assert ran(copy) == {"score[concert]", "bundle"}  # its generated image is its last image again
    with Image.open(sub / "images/02-concert.png") as im:
        assert im.size == (64, 64)
    assert "refine[concert]" not in run_cli("status", copy, cwd=copy.parent).stdout


def test_a_scene_can_refine_on_its_own_and_bad_settings_are_spec_errors(project):
    from storyc.compiler import compile
    from storyc.spec import load_story

    (project / "s.yaml").write_text(
        "version: 1\nstory: {id: s}\nsubmission: {rules: none, images: 2}\ngeneration: {cfg_scale: 3.0}\n"
        "scenes:\n  - {id: a, prompt: x, seed: 0, refine: {strength: 0.3}}\n  - {id: b, prompt: y, seed: 1}\n", "utf-8")
    plan = compile(load_story(project / "s.yaml"))
    assert [n for n in plan.stages if n.startswith("refine")] == ["refine[a]"]
    assert plan.stages["refine[a]"].params["refine"] == {"scale": 2.0, "strength": 0.3, "steps": 20, "cfg_scale": 3.0,
                                                          "guidance_interval": [0.28, 5.42], "upscaler": "lanczos"}
    assert "guidance_interval" not in plan.stages["generate[a]"].params  # the generation's is hashed only when set
    assert plan.stages["score[b]"].deps == ("generate[b]",) and plan.stages["score[a]"].deps == ("refine[a]",)
    (project / "s.yaml").write_text((project / "s.yaml").read_text("utf-8").replace("strength: 0.3", "strenght: 0.3"),
                                    "utf-8")
    r = run_cli("validate", "s.yaml", cwd=project)
    assert r.returncode == 1 and "s.yaml:6:42: $.scenes[0].refine.strenght: unknown key `strenght`" in r.stderr
    assert "did you mean `strength`?" in r.stderr

    text = (project / "s.yaml").read_text("utf-8").replace("strenght: 0.3", "guidance_interval: [5.42, 0.28]")
    (project / "s.yaml").write_text(text.replace("cfg_scale: 3.0}", "cfg_scale: 3.0, guidance_interval: [0.5, 2]}"),
                                    "utf-8")
    r = run_cli("validate", "s.yaml", cwd=project)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert ("s.yaml:6:61: $.scenes[0].refine.guidance_interval: guidance interval [5.42, 0.28] holds no noise level"
            in r.stderr), r.stderr
    assert "e.g. [0.28, 5.42]" in r.stderr and "$.generation.guidance_interval" not in r.stderr
    (project / "s.yaml").write_text(text.replace("[5.42, 0.28]", "[0, 1000]").replace(
        "cfg_scale: 3.0}", "cfg_scale: 3.0, guidance_interval: [0.5, 2]}"), "utf-8")
    plan = compile(load_story(project / "s.yaml"))
    assert plan.stages["generate[a]"].params["guidance_interval"] == [0.5, 2]
    assert plan.stages["refine[a]"].params["refine"]["guidance_interval"] == [0, 1000]



def test_the_vaes_group_norm_and_attention_give_pytorchs_results():
    """storyc.models.unet.group_norm / attention_chunked (what the VAE runs on a GPU at inference: PyTorch's own
    kernels leave the card idle at batch 1) against F.group_norm and SDPA, including a group whose mean is far
    from zero; with gradients or on a CPU the swapped modules are PyTorch's exactly."""
    import torch

    from storyc.models.unet import ChunkedAttention, WideGroupNorm, attention_chunked, group_norm, wide_vae

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 12, 12, generator=g) * 3 + torch.randn(1, 64, 1, 1, generator=g) * 20
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    want = torch.nn.functional.group_norm(x.double(), 32, w.double(), b.double(), 1e-5)
    assert torch.allclose(group_norm(x, 32, w, b, 1e-5).double(), want, atol=2e-5)
    xc = x.contiguous(memory_format=torch.channels_last)  # read in place, written in its layout
    assert torch.allclose(group_norm(xc, 32, w, b, 1e-5).double(), want, atol=2e-5)
    assert group_norm(xc, 32, w, b, 1e-5).is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(group_norm(x, 32, None, None, 1e-5).double(),
                          torch.nn.functional.group_norm(x.double(), 32, eps=1e-5), atol=2e-5)
    xb = x.bfloat16()  # half precision: no further from fp32 than PyTorch's own bf16 kernel
    ours = (group_norm(xb, 32, w, b, 1e-5).double() - want).abs().max()
    theirs = (torch.nn.functional.group_norm(xb, 32, w.bfloat16(), b.bfloat16(), 1e-5).double() - want).abs().max()
    assert group_norm(xb, 32, w, b, 1e-5).dtype == torch.bfloat16 and ours <= theirs * 1.01
    xh = (x / 8).half()  # fp16 (the UNet's), a mean far from zero: no further from fp32 than PyTorch's fp16 kernel
    want_h = torch.nn.functional.group_norm(xh.double(), 32, w.double(), b.double(), 1e-5)
    ours = (group_norm(xh, 32, w.half(), b.half(), 1e-5).double() - want_h).abs().max()
    theirs = (torch.nn.functional.group_norm(xh, 32, w.half(), b.half(), 1e-5).double() - want_h).abs().max()
    assert group_norm(xh, 32, w.half(), b.half(), 1e-5).dtype == torch.float16 and ours <= theirs * 1.01
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
    assert torch.allclose(attention_chunked(q, k, v, 128), torch.nn.functional.scaled_dot_product_attention(q, k, v),
                          atol=1e-5)

    from diffsynth.models.sd_vae_decoder import SDVAEDecoder

    torch.manual_seed(0)
    dec = SDVAEDecoder().eval()
    latent = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        before = dec(latent)
        wide_vae(dec)
        assert {type(m) for m in dec.modules()} >= {WideGroupNorm, ChunkedAttention}
        assert torch.equal(dec(latent), before)  # a CPU: PyTorch's kernels
    assert not any(type(m) in (WideGroupNorm, ChunkedAttention) for m in wide_vae(dec, on=False).modules())


def test_refine_many_draws_what_refine_image_draws(built, tiny_models):
    """The stage's loop (the CPU's part on threads beside the GPU's) gives refine_image's images, in order."""
    import numpy as np
    import torch

    from storyc.stages.generate import encode_prompts, load_merged_pipeline
    from storyc.stages.refine import refine_image, refine_many

    kolors = tiny_models / "tiny-kolors"
    pipe = load_merged_pipeline(kolors, built.parent / "build/t/lora/t.diffsynth.safetensors", 0.5, torch.float32,
                                "cpu", vae_encoder=kolors / "vae/diffusion_pytorch_model.safetensors")
    r = {"steps": 3, "strength": 0.5, "cfg_scale": 4.0}
    sources = sorted((built.parent / "build/t/images").glob("*.png"))
    items = [{"image": Image.open(p).convert("RGB"), "size": (96, 128), "r": r, "seed": i, "prompt": f"{i}号女孩",
              "negative": "丑陋", "tiled": False} for i, p in enumerate(sources)]
    got = list(refine_many(pipe, items, encode_prompts))
    assert [i for i, _ in got] == list(range(len(items))) and len(items) == 3
    for (_, im), it in zip(got, items):
        one = refine_image(pipe, it["image"], it["size"], r, it["seed"], it["prompt"], it["negative"], encode_prompts,
                           False)
        assert im.size == (96, 128) and np.array_equal(np.asarray(im), np.asarray(one))


def test_guidance_interval_runs_unguided_steps_on_the_positive_rows_alone(built, tiny_models):
    """guidance_interval: steps whose noise level is outside it make one UNet pass over the positive rows (half the
    rows of a guided step) and draw what cfg_scale 1 draws there; inside it, classifier-free guidance as before.
    Kolors' own schedule: SD-XL's interval guides 16 of a default refine's 20 steps and 33 of a 50-step generation."""
    import numpy as np
    import torch

    from storyc.stages.generate import SDXL_GUIDANCE_INTERVAL, encode_prompts, guided_steps, load_merged_pipeline, \
        render_iter
    from storyc.stages.refine import refine_image

    kolors = tiny_models / "tiny-kolors"
    pipe = load_merged_pipeline(kolors, built.parent / "build/t/lora/t.diffsynth.safetensors", 0.5, torch.float32,
                                "cpu", vae_encoder=kolors / "vae/diffusion_pytorch_model.safetensors")
    sch = pipe.scheduler
    sch.set_timesteps(20, 0.4)
    assert guided_steps(sch, 4.0, SDXL_GUIDANCE_INTERVAL) == [True] * 16 + [False] * 4
    assert guided_steps(sch, 4.0, None) == [True] * 20 and guided_steps(sch, 1.0, (0, 1000)) == [False] * 20
    sch.set_timesteps(50)
    assert sum(guided_steps(sch, 4.0, SDXL_GUIDANCE_INTERVAL)) == 33

    rows = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kw: rows.append((args[0] if args else kw["sample"]).shape[0]),
                                        with_kwargs=True)
    with Image.open(sorted((built.parent / "build/t/images").glob("*.png"))[0]) as im:
        src = im.convert("RGB")

    def refine(**r):
        rows.clear()
        out = refine_image(pipe, src, (96, 96), {"steps": 4, "strength": 0.5, "cfg_scale": 4.0, **r}, 3, "女孩",
                           "丑陋", encode_prompts, False)
        return np.asarray(out), list(rows)

    full, full_rows = refine()  # no interval: every step guided, as DiffSynth's img2img
    assert full_rows == [2, 2, 2, 2]
    assert np.array_equal(refine(guidance_interval=[0, 1000])[0], full)
    none, none_rows = refine(guidance_interval=[100, 1000])  # no step's noise level is in it
    assert none_rows == [1, 1, 1, 1]
    assert np.array_equal(none, refine(cfg_scale=1.0)[0])
    part, part_rows = refine(guidance_interval=[0.8, 5.42])  # strength 0.5: sigmas 1.7, 1.0 in; 0.5, 0.03 out
    assert part_rows == [2, 2, 1, 1]
    assert not np.array_equal(part, full) and not np.array_equal(part, none)

    items = [{"prompt": "女孩", "negative_prompt": "丑陋", "seed": s} for s in (0, 1)]
    gen = {"width": 64, "height": 64, "steps": 3, "cfg_scale": 4.0}
    rows.clear()
    unguided = [np.asarray(i) for i in render_iter(pipe, items, {**gen, "guidance_interval": [100, 1000]}, 2)]
    assert rows == [2, 2, 2]  # the two images' positive rows, not 4
    assert all(np.array_equal(a, np.asarray(b)) for a, b in
               zip(unguided, render_iter(pipe, items, {**gen, "cfg_scale": 1.0}, 2)))
