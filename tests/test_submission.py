"""The submission as the competition takes it: readable captions, the model page `storyc publish` uploads (staged
and uploaded to a local hub through modelscope's own client), and LoRA files that ComfyUI and diffusers load."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import copy_project, run_cli

# ---------------------------------------------------------------- captions


def _glyphs(font, text):
    """One bitmap per character: a font without the glyphs draws the same .notdef box for each."""
    from PIL import ImageDraw

    out = []
    for ch in text:
        im = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(im).text((4, 4), ch, fill=255, font=font)
        out.append(im.tobytes())
    return out


def test_storyboard_captions_are_real_chinese_glyphs(built):
    from PIL import ImageFont

    from storyc.fonts import find_font
    from storyc.stages.bundle import cjk_font, storyboard

    f = find_font()
    assert f is not None and f.source == "package" and f.name == "NotoSansCJK-Regular.ttc#2"  # from our install
    font, name = cjk_font(40)
    caption = "在家演唱会舞台"
    assert len(set(_glyphs(font, caption))) == len(caption)  # seven different glyphs
    no_cjk = ImageFont.load_default(size=40)
    assert len(set(_glyphs(no_cjk, caption))) == 1  # the same box seven times: what a missing font draws

    # the storyboard's caption pixels are exactly that font's rendering, not the box
    sub = built.parent / "build/t/submission/t"
    scenes = json.loads((sub / "prompts.json").read_text("utf-8"))["scenes"]
    images = [Image.open(sub / s["file"]).convert("RGB") for s in scenes]
    captions = [s["caption"] for s in scenes]
    shipped = np.asarray(Image.open(sub / "storyboard.png").convert("RGB"))
    again, used = storyboard(images, captions, 2, True)
    assert used == name and np.array_equal(np.asarray(again), shipped)
    import storyc.stages.bundle as bundle

    real = bundle.cjk_font
    try:
        bundle.cjk_font = lambda size: (ImageFont.load_default(size=size), None)
        boxes, _ = storyboard(images, captions, 2, True)
    finally:
        bundle.cjk_font = real
    strip = slice(64, 64 + 40)  # the caption band under the first row
    assert not np.array_equal(np.asarray(boxes)[strip], shipped[strip])
    lock = __import__("yaml").safe_load((built.parent / "story.lock").read_text("utf-8"))
    assert lock["stages"]["bundle"]["extra"]["font"] == "NotoSansCJK-Regular.ttc#2"


def test_a_different_font_reruns_the_bundle(built, tmp_path):
    from storyc.fonts import find_font

    spec = copy_project(built, tmp_path / "p")
    other = f"{find_font().path}#3"  # the same collection's Traditional Chinese face: another font
    r = run_cli("status", spec, cwd=spec.parent, env={"STORYC_FONT": other})
    assert "bundle" in r.stdout and "caption font changed" in r.stdout, r.stdout
    r = run_cli("build", spec, "-q", cwd=spec.parent, env={"STORYC_FONT": other})
    assert r.returncode == 0, r.stderr
    report = json.loads((spec.parent / "build/t/build_report.json").read_text("utf-8"))["stages"]
    assert [n for n, s in report.items() if s == "ran"] == ["bundle"]
    r = run_cli("build", spec, cwd=spec.parent, env={"STORYC_FONT": str(tmp_path / "nope.ttf")})
    assert r.returncode == 1 and "STORYC_FONT=" in r.stdout + r.stderr and "no such font file" in r.stdout + r.stderr


# ---------------------------------------------------------------- publish


def test_publish_dry_run_stages_the_exact_tree_and_the_post(built, tmp_path):
    spec = copy_project(built, tmp_path / "p")
    r = run_cli("publish", spec, "--model-id", "team/purple", "--dry-run", cwd=spec.parent)
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing uploaded" in r.stdout and "测试队-可图Kolors训练-紫发女孩" in r.stdout
    tree = spec.parent / "build/t/publish/model"
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    page = [f for f in files if not f.startswith("reproduce/")]
    assert page == ["README.md", "configuration.json", "images/01-home.png", "images/02-concert.png",
                    "images/03-stage.png", "prompts.txt", "scores.json", "storyboard.png", "t.diffsynth.safetensors",
                    "t.diffusers.safetensors", "t.kohya.safetensors"]
    for rel in page:  # listed, and byte-identical to the built submission
        assert rel in r.stdout
        assert (tree / rel).read_bytes() == (spec.parent / "build/t/submission/t" / rel).read_bytes()
    from storyc import __version__

    assert {f for f in files if f.startswith("reproduce/")} == {
        "reproduce/storyc.toml", "reproduce/story.yaml", "reproduce/story.lock", "reproduce/constraints.txt",
        f"reproduce/storyc-{__version__}-py3-none-any.whl", *(f"reproduce/data/img0{i}.png" for i in range(3))}
    assert (tree / "reproduce/story.lock").read_bytes() == (spec.parent / "story.lock").read_bytes()
    post = (spec.parent / "build/t/publish/POST.md").read_text("utf-8")
    assert post.startswith("测试队 + https://modelscope.cn/models/team/purple")
    assert "images/01-home.png" in post and "在家" in post


def test_the_storyc_wheel_packs_from_a_checkout_with_an_egg_info(tmp_path, monkeypatch):
    """Run from a checkout's root after a setuptools editable install, Python finds ./storyc.egg-info first: its
    metadata is PKG-INFO, not METADATA, and the wheel in reproduce/ must still carry it."""
    import sys
    import zipfile

    from storyc import __version__
    from storyc.reproduce import pack_wheel

    egg = tmp_path / "root" / "storyc.egg-info"
    egg.mkdir(parents=True)
    (egg / "PKG-INFO").write_text(f"Metadata-Version: 2.4\nName: storyc\nVersion: {__version__}\n")
    monkeypatch.setattr(sys, "path", [str(egg.parent), *sys.path])
    (tmp_path / "out").mkdir()
    with zipfile.ZipFile(pack_wheel(tmp_path / "out")) as z:
        meta = z.read(f"storyc-{__version__}.dist-info/METADATA").decode()
    assert meta.startswith("Metadata-Version: 2.4\nName: storyc\n")


def test_the_model_page_alone_rebuilds_the_story(built, tiny_models, tmp_path):
    """A stranger with the published page only: install the storyc wheel from reproduce/, run the card's build step
    there, and get the published images and lock digests back."""
    import re
    import subprocess
    import sys

    spec = copy_project(built, tmp_path / "p")
    assert run_cli("publish", spec, "--model-id", "team/purple", "--dry-run", cwd=spec.parent).returncode == 0
    page = tmp_path / "page"
    shutil.copytree(spec.parent / "build/t/publish/model", page)
    steps = (page / "README.md").read_text("utf-8").split("## Reproduce")[1]
    build = re.search(r"^    (storyc build \S+)$", steps, re.M).group(1).split()
    site = tmp_path / "site"
    wheel = next((page / "reproduce").glob("storyc-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work = page / "reproduce"
    (work / ".storyc/models").mkdir(parents=True)
    for d in tiny_models.iterdir():  # the tiny models storyc would build there (the same seeded bytes): linked
        (work / ".storyc/models" / d.name).symlink_to(d)
    r = subprocess.run([sys.executable, "-m", *build[:1], *build[1:]], cwd=work, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(site)), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    which = subprocess.run([sys.executable, "-c", "import storyc; print(storyc.__file__)"], cwd=work, text=True,
                           capture_output=True, env=dict(os.environ, PYTHONPATH=str(site))).stdout
    assert which.startswith(str(site))  # the wheel from the page ran, not this checkout
    for i, name in enumerate(("01-home", "02-concert", "03-stage")):
        assert (work / f"build/t/submission/t/images/{name}.png").read_bytes() == (page / f"images/{name}.png").read_bytes()
    assert (work / "story.lock").read_bytes() == (spec.parent / "story.lock").read_bytes()


@pytest.mark.parametrize("edit, message", [
    (("team: 测试队, ", ""), "story.team is not set"),
    (("team: 测试队", "team: my-team"), "still the placeholder `my-team`"),
])
def test_publish_checks_the_competition_name(built, tmp_path, edit, message):
    spec = copy_project(built, tmp_path / "p")
    spec.write_text(spec.read_text("utf-8").replace(*edit), "utf-8")
    r = run_cli("build", spec, "-q", cwd=spec.parent)
    assert r.returncode == 0, r.stderr
    r = run_cli("publish", spec, "--model-id", "team/purple", cwd=spec.parent, env={"MODELSCOPE_API_TOKEN": "x"})
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_publish_display_name_must_keep_the_rule(built, tmp_path):
    spec = copy_project(built, tmp_path / "p")
    r = run_cli("publish", spec, "--model-id", "team/purple", "--display-name", "紫发女孩", "--dry-run", cwd=spec.parent)
    assert r.returncode == 1 and "does not follow the competition's rule `测试队-可图Kolors训练-<anything>`" in r.stderr
    r = run_cli("validate", spec.parent.parent / "p" / "story.yaml", cwd=spec.parent)
    assert "placeholder" not in r.stderr


def test_publish_uploads_the_tree_to_the_hub(built, tmp_path):
    """The real modelscope client, pointed at a local hub through its own MODELSCOPE_ENDPOINT setting."""
    from fakehub import Hub

    spec = copy_project(built, tmp_path / "p")
    hub = Hub()
    try:
        r = run_cli("publish", spec, "--model-id", "team/purple", cwd=spec.parent, timeout=300,
                    env={"MODELSCOPE_API_TOKEN": "secret-token", "MODELSCOPE_ENDPOINT": hub.url,
                         "MODELSCOPE_HOME": str(tmp_path / "mshome"), "MODELSCOPE_CACHE": str(tmp_path / "mscache")})
    finally:
        hub.close()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "published t to https://modelscope.cn/models/team/purple" in r.stdout
    assert "secret-token" not in r.stdout + r.stderr and "secret-token" in hub.tokens
    assert hub.repos and hub.repos[0]["Path"] == "team" and hub.repos[0]["Name"] == "purple"
    assert hub.repos[0].get("ChineseName") == "测试队-可图Kolors训练-紫发女孩"
    tree = spec.parent / "build/t/publish/model"
    staged = {p.relative_to(tree).as_posix(): p for p in tree.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert set(staged) <= set(hub.files) and len(staged) == 19  # the page (11) and its reproduce/ folder (8)
    for rel, p in staged.items():  # every file arrived whole
        assert hub.sha(rel) == hashlib.sha256(p.read_bytes()).hexdigest(), rel


# ---------------------------------------------------------------- LoRA files every UI loads


def _comfy_key_map(cfg: dict) -> dict:
    """ComfyUI's kohya key mapping for an SDXL-layout UNet, restated from ComfyUI 0.3.64
    (comfy/lora.py model_lora_keys_unet + comfy/utils.py unet_to_diffusers, commit a125cd84): a key
    `lora_unet_<diffusers module path, dots as underscores>` maps to the checkpoint weight of that module;
    down block x, resnet i -> input_blocks.{1 + (res+1)*x + i}; up block x, i -> output_blocks.{(res+1)*x + i};
    the mid block -> middle_block.1. Only the transformer blocks' Linear layers (what a storyc LoRA targets)."""
    blocks = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
              "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
    res, depth, depth_out = cfg["num_res_blocks"], list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    out = {}

    def add(diffusers, sgm, n):  # kohya base name -> (checkpoint weight ComfyUI patches, the same as diffusers)
        for t in range(n):
            for b in blocks:
                module = f"{diffusers}.transformer_blocks.{t}.{b}"
                out["lora_unet_" + module.replace(".", "_")] = (f"diffusion_model.{sgm}.1.transformer_blocks.{t}.{b}"
                                                                f".weight", f"{module}.weight")

    for x in range(len(cfg["channel_mult"])):
        for i in range(res[x]):
            add(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{1 + (res[x] + 1) * x + i}", depth.pop(0))
    add("mid_block.attentions.0", "middle_block", cfg["transformer_depth_middle"])
    rev = list(reversed(res))
    for x in range(len(cfg["channel_mult"])):
        for i in range(rev[x] + 1):
            add(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{(rev[x] + 1) * x + i}", depth_out.pop())
    return out


def _comfy_config(unet_config: dict) -> dict:
    """What ComfyUI's model detection reads off a diffusers UNet config of this layout."""
    n = len(unet_config["block_out_channels"])
    per = unet_config["transformer_layers_per_block"]
    down = [per[x] if "CrossAttn" in t else 0 for x, t in enumerate(unet_config["down_block_types"])]
    up = [per[n - 1 - x] if "CrossAttn" in t else 0 for x, t in enumerate(unet_config["up_block_types"])]
    res = unet_config["layers_per_block"]
    return {"num_res_blocks": [res] * n, "channel_mult": list(range(1, n + 1)),
            "transformer_depth": [d for d in down for _ in range(res)],
            "transformer_depth_output": [d for d in reversed(up) for _ in range(res + 1)],
            "transformer_depth_middle": per[-1]}


def _unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(2, 256, 64, generator=g),
            torch.tensor([64, 64, 0, 0, 64, 64]).repeat(2), torch.randn(2, 64, generator=g))


def _merged_output(built, tiny_models, inp):
    from storyc import lora
    from storyc.models.kolors import load_unet_for

    ours = load_unet_for(tiny_models / "tiny-kolors", torch.float32, "cpu")
    state, _ = lora.load(built.parent / "build/t/lora/t.diffsynth.safetensors")
    lora.merge(ours, state, 1.0)
    with torch.no_grad():
        return ours(*inp)


def _diffusers_out(unet, inp):
    x, t, ehs, tid, ate = inp
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ehs,
                    added_cond_kwargs={"text_embeds": ate, "time_ids": tid.reshape(2, 6).float()}).sample


def test_kohya_file_loads_by_comfyuis_key_mapping(built, tiny_models):
    """Every key of the kohya file is one ComfyUI maps; patching the UNet the way ComfyUI does
    (W += up @ down * alpha / rank) gives the UNet that storyc's merged LoRA gives."""
    from diffusers import UNet2DConditionModel

    from storyc import lora

    sd, _ = lora.load(built.parent / "build/t/lora/t.kohya.safetensors")
    unet = UNet2DConditionModel.from_pretrained(tiny_models / "tiny-kolors" / "unet").eval()
    key_map = _comfy_key_map(_comfy_config(unet.config))
    bases = {k.split(".")[0] for k in sd}
    assert bases and bases <= set(key_map), sorted(bases - set(key_map))[:3]
    weights = dict(unet.named_parameters())
    inp = _unet_inputs()
    base = _diffusers_out(unet, inp)
    with torch.no_grad():
        for b in bases:
            up, down, alpha = sd[f"{b}.lora_up.weight"], sd[f"{b}.lora_down.weight"], float(sd[f"{b}.alpha"])
            _, target = key_map[b]  # the checkpoint weight ComfyUI patches, by its diffusers name
            weights[target] += (up.float() @ down.float()) * alpha / down.shape[0]
    got = _diffusers_out(unet, inp)
    want = _merged_output(built, tiny_models, inp)
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()
    assert not torch.allclose(base, got, atol=1e-6)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_kolors_pipeline_load_lora_weights(built, tiny_models, fmt):
    """diffusers' own Kolors entry point loads the file and its UNet then computes what the merged LoRA does."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "tiny-kolors" / "unet").eval()
    vae = AutoencoderKL.from_pretrained(tiny_models / "tiny-kolors" / "vae")
    pipe = KolorsPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=EulerDiscreteScheduler())
    inp = _unet_inputs(1)
    base = _diffusers_out(pipe.unet, inp)
    sub = built.parent / "build/t/submission/t"  # as a user loads it from the downloaded model page
    pipe.load_lora_weights(str(sub), weight_name=f"t.{fmt}.safetensors", adapter_name="story")
    got = _diffusers_out(pipe.unet, inp)
    want = _merged_output(built, tiny_models, inp)
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()
    assert not torch.allclose(base, got, atol=1e-6)


def test_storyboard_png_encoder_is_lossless_valid_and_independent_of_threads():
    """storyc.png (the storyboard's encoder, deflated on every core): Pillow reads back the exact pixels, zlib's own
    checks pass (Image.verify reads every chunk's CRC), and the bytes do not depend on how many threads ran."""
    import io

    from storyc import png

    rng = np.random.default_rng(5)
    for shape, mode in [((700, 1300, 3), "RGB"), ((3, 2, 3), "RGB"), ((50, 40), "L"), ((9, 11, 4), "RGBA")]:
        im = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
        raw = png.encode(im, workers=3)
        assert raw == png.encode(im, workers=1)
        Image.open(io.BytesIO(raw)).verify()
        back = Image.open(io.BytesIO(raw))
        assert back.mode == mode and np.array_equal(np.asarray(back), np.asarray(im))
    with pytest.raises(ValueError):
        png.encode(Image.new("P", (4, 4)))
