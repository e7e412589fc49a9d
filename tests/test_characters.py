"""Characters (`characters:` + `scenes[i].characters`): the Kolors IP-Adapter-Plus in its release layout conditions
the scenes that show a character on its reference images; a reference is a fingerprinted input (replacing it
re-renders exactly its scenes); character consistency is measured in scores.json, the report and `storyc score`."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import edit, ran, run_cli


def _reference(path, colour, seed=0):
    rng = np.random.RandomState(seed)
    a = np.clip(rng.normal(0, 40, (96, 80, 3)) + np.array(colour), 0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def test_ip_adapter_plus_matches_diffusers_on_the_release_layout(tmp_path):
    """storyc's Resampler + per-layer to_k_ip/to_v_ip on diffsynth's UNet compute what diffusers 0.35's own
    IP-Adapter loader (the one KolorsPipeline.load_ip_adapter calls) computes, on tiny random weights saved in the
    Kwai-Kolors/Kolors-IP-Adapter-Plus layout: one reference image, and two (their tokens concatenated)."""
    import torch
    from diffsynth.pipelines.dancer import lets_dance_xl
    from diffusers import UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from storyc.models import tiny
    from storyc.models.ipadapter import IPAdapterPlus, read_weights
    from storyc.models.unet import load_unet

    kolors = tiny.ensure("kolors", tmp_path / "tiny-kolors")
    folder = tiny.ensure("ip-adapter", tmp_path / "tiny-ip-adapter")
    assert (folder / "ip_adapter_plus_general.safetensors").is_file() and (folder / "image_encoder/config.json").is_file()
    unet = load_unet(kolors / "unet", torch.float32, "cpu")
    ip = IPAdapterPlus(folder, unet, torch.float32, "cpu")
    ref = UNet2DConditionModel.from_pretrained(str(kolors / "unet")).eval()
    proj, layers = read_weights(folder)
    ref._load_ip_adapter_weights([{"image_proj": proj, "ip_adapter": layers}], low_cpu_mem_usage=False)
    scale = 0.7
    for p in ref.attn_processors.values():
        if hasattr(p, "scale"):
            p.scale = [scale]
    enc = CLIPVisionModelWithProjection.from_pretrained(str(folder / "image_encoder")).eval()
    fe = CLIPImageProcessor.from_pretrained(str(folder / "image_encoder"))
    for n in (1, 2):
        _reference(tmp_path / "a.png", (200, 80, 160), 1)
        _reference(tmp_path / "b.png", (60, 160, 90), 2)
        imgs = [Image.open(tmp_path / f).convert("RGB") for f in ("a.png", "b.png")[:n]]
        g = torch.Generator().manual_seed(n)
        x, ehs, ate = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 64, generator=g), torch.randn(2, 64, generator=g)
        t, ids = torch.tensor([500]), torch.tensor([128, 128, 0, 0, 128, 128])
        tok, unc = ip.tokens(imgs), ip.uncond_tokens(n)
        kw = ip.unet_kwargs([tok, unc], [torch.full((tok.shape[0],), scale)] * 2)
        ours = lets_dance_xl(unet, sample=x, timestep=t, encoder_hidden_states=ehs, add_time_id=ids.repeat(2),
                             add_text_embeds=ate, ipadapter_kwargs_list=kw, unet_batch_size=2, device="cpu")
        plain = unet(x, timestep=t, encoder_hidden_states=ehs, add_time_id=ids.repeat(2), add_text_embeds=ate)
        px = fe(imgs, return_tensors="pt").pixel_values
        with torch.no_grad():
            pos = enc(px, output_hidden_states=True).hidden_states[-2]
            neg = enc(torch.zeros_like(px), output_hidden_states=True).hidden_states[-2]
            want = ref(x, t, encoder_hidden_states=ehs, added_cond_kwargs={
                "text_embeds": ate, "time_ids": ids.float().repeat(2, 1),
                "image_embeds": [torch.stack([pos, neg])]}).sample
        assert (ours - want).abs().max().item() < 1e-4, (ours - want).abs().max().item()
        assert (ours - plain).abs().max().item() > 1e-2  # the references do steer the UNet


MISTAKES = {  # what is wrong -> (the spec edit, the error, the did-you-mean)
    "unknown id": (("characters: [girl]}", "characters: [gril]}"),
                   "$.scenes[0].characters[0]: unknown character `gril`", "did you mean `girl`"),
    "missing file": (("refs/girl.png", "refs/gril.png"),
                     "$.characters.girl.reference: reference image `refs/gril.png` does not exist", "girl.png"),
    "not an image": (("refs/girl.png", "refs/bad.png"),
                     "$.characters.girl.reference: reference `refs/bad.png` is not an image storyc can read", None),
    "no IP-Adapter": (("models: {ip_adapter: tiny:ip-adapter, ", "models: {"),
                      "$.scenes[0].characters: drawing characters from their reference images needs the Kolors "
                      "IP-Adapter-Plus", "modelscope:Kwai-Kolors/Kolors-IP-Adapter-Plus"),
    "unknown splice": (("一个紫色短发小女孩在家", "'{gril}在家'"), "$.scenes[0].prompt: `{gril}` names no character",
                       "did you mean `girl`"),
}


@pytest.mark.parametrize("what", list(MISTAKES))
def test_character_mistakes_are_spec_errors_at_their_line(project, what):
    from conftest import BASE_SPEC

    _reference(project / "refs/girl.png", (200, 80, 160))
    (project / "data").mkdir()
    (project / "refs/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    spec = BASE_SPEC.replace("models: {", "models: {ip_adapter: tiny:ip-adapter, ").replace(
        "scenes:\n", "characters:\n  girl: {reference: refs/girl.png, description: 紫发女孩}\nscenes:\n").replace(
        "caption: 在家}", "caption: 在家, characters: [girl]}")
    (project / "story.yaml").write_text(spec, "utf-8")
    assert run_cli("validate", project / "story.yaml", cwd=project).returncode == 0
    (old, new), message, hint = MISTAKES[what]
    bad = spec.replace(old, new)
    (project / "story.yaml").write_text(bad, "utf-8")
    r = run_cli("validate", project / "story.yaml", cwd=project)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    marker = "characters: [girl]" if what == "no IP-Adapter" else new.strip("{} ,")
    line = next(n for n, text in enumerate(bad.splitlines(), 1) if marker in text)
    assert f"story.yaml:{line}:" in r.stderr and "Traceback" not in r.stderr
    if hint:
        assert hint in r.stderr, r.stderr


CHARS = ("characters:\n  girl: {reference: refs/girl.png, scale: 0.6, description: 紫色短发小女孩}\nscenes:\n")


def test_characters_condition_their_scenes_and_a_reference_change_rerenders_exactly_them(copy):
    """Adding a character re-renders the scenes that show it (never train); replacing its reference re-renders
    exactly those scenes again; at scale 0 a scene renders byte for byte as without the character; the set's
    character consistency is in scores.json, the report, the card and `storyc score`."""
    root = copy.parent
    before = {s: (root / f"build/t/images/0{i + 1}-{s}.png").read_bytes() for i, s in enumerate(("home", "concert", "stage"))}
    _reference(root / "refs/girl.png", (200, 80, 160))
    text = copy.read_text("utf-8").replace("models: {", "models: {ip_adapter: tiny:ip-adapter, ").replace(
        "scenes:\n", CHARS).replace("caption: 在家}", "caption: 在家, characters: [girl]}").replace(
        "prompt: 一个紫色短发小女孩在演唱会", "prompt: '{girl}在演唱会'").replace(
        "caption: 演唱会}", "caption: 演唱会, characters: [girl]}")
    copy.write_text(text, "utf-8")
    r = run_cli("build", copy, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ran(copy) == {"generate[home]", "generate[concert]", "score[home]", "score[concert]", "bundle"}
    home = (root / "build/t/images/01-home.png").read_bytes()
    assert home != before["home"] and (root / "build/t/images/03-stage.png").read_bytes() == before["stage"]
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]
    g = lock["generate[concert]"]
    assert g["params"]["prompt"] == "二次元，紫色短发小女孩在演唱会"  # `{girl}`: her description, spliced in
    assert g["params"]["characters"] == [{"id": "girl", "scale": 0.6, "references": ["refs/girl.png"]}]
    assert "character:girl" in g["models"] and "characters" not in lock["generate[stage]"]["params"]
    sub = root / "build/t/submission/t"
    scores = json.loads((sub / "scores.json").read_text("utf-8"))
    cc = scores["character_consistency"]
    assert set(cc["characters"]) == {"girl"} and cc["characters"]["girl"]["images"] == 2
    assert -1.0 <= cc["mean"] <= 1.0 and cc["mean"] == cc["characters"]["girl"]["mean_pairwise_cosine"]
    assert 'id="characters"' in (sub / "report.html").read_text("utf-8")
    assert "Character consistency" in (sub / "README.md").read_text("utf-8")
    out = run_cli("score", sub, "--spec", copy, cwd=root).stdout
    assert f"character consistency {cc['mean']:.4f} (girl {cc['mean']:.4f} in 2)" in out
    assert cc["dreamsim"] is None and "By DreamSim (1 - its distance): not measured" in (sub / "report.html").read_text(
        "utf-8")

    # models.dreamsim: her two scenes are measured again (DreamSim's own loader and model, a full-size random
    # ViT-B/32 in its open_clip_vitb32 layout); the figure is 1 - the distance DreamSim's forward gives
    edit(copy, "models: {", "models: {dreamsim: 'tiny:dreamsim', ")
    r = run_cli("build", copy, "-q", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ran(copy) == {"score[home]", "score[concert]", "bundle"}
    ds = json.loads((sub / "scores.json").read_text("utf-8"))["character_consistency"]["dreamsim"]
    import contextlib
    import io

    import torch
    from dreamsim import dreamsim
    from PIL import Image

    with contextlib.redirect_stdout(io.StringIO()):
        model, pre = dreamsim(pretrained=True, device="cpu", cache_dir=str(root / ".storyc/models/tiny-dreamsim"),
                              dreamsim_type="open_clip_vitb32")
    a, b = (pre(Image.open(root / f"build/t/images/{f}").convert("RGB")) for f in ("01-home.png", "02-concert.png"))
    with torch.no_grad():
        want = 1 - float(model(a, b))
    assert abs(ds["characters"]["girl"] - want) < 1e-4 and ds["mean"] == ds["characters"]["girl"]
    assert -1 <= want < 0.9999  # two different images: not the same embedding
    assert f"By DreamSim (1 - its distance): {want:.3f}: girl {want:.3f}" in (sub / "report.html").read_text("utf-8")
    out = run_cli("score", sub, "--spec", copy, cwd=root).stdout
    assert f"character consistency by DreamSim {ds['mean']:.4f} (girl {ds['mean']:.4f} in 2)" in out, out
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]
    assert "dreamsim" in lock["score[home]"]["models"] and "dreamsim" not in lock["score[stage]"]["params"]
    edit(copy, "models: {dreamsim: 'tiny:dreamsim', ", "models: {dreamsim: 'modelscope:a/b', ")
    r = run_cli("validate", copy, cwd=root)
    assert r.returncode == 1 and "DreamSim's checkpoints are GitHub release files" in r.stderr, r.stderr
    assert "dreamsim_open_clip_vitb32_checkpoint.zip" in r.stderr
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]
    assert lock["bundle"]["extra"]["character_dreamsim"] == round(ds["mean"], 6)  # what a sweep objective weighs
    edit(copy, "models: {dreamsim: 'modelscope:a/b', ", "models: {")

    # a new reference drawing: exactly the two scenes that show her, and status says why
    _reference(root / "refs/girl.png", (40, 200, 220), 5)
    st = run_cli("status", copy, cwd=root)
    assert "character girl's reference images changed" in st.stdout, st.stdout
    assert run_cli("build", copy, "-q", cwd=root).returncode == 0
    assert ran(copy) == {"generate[home]", "generate[concert]", "score[home]", "score[concert]", "bundle"}
    assert (root / "build/t/images/01-home.png").read_bytes() != home

    # scale 0: the IP-Adapter adds nothing, and the image is the one rendered without her
    edit(copy, "scale: 0.6", "scale: 0.0")
    assert run_cli("build", copy, "-q", cwd=root).returncode == 0
    assert (root / "build/t/images/01-home.png").read_bytes() == before["home"]

    # the refine pass redraws her scenes with the same references: a scale edit reruns exactly her scenes' stages
    edit(copy, "batch_size: 1}", "batch_size: 1, refine: {scale: 2.0, strength: 0.5, steps: 2}}")
    edit(copy, "scale: 0.0", "scale: 0.6")
    assert run_cli("build", copy, "-q", cwd=root).returncode == 0
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]
    assert lock["refine[home]"]["params"]["characters"][0]["id"] == "girl" and "character:girl" in lock["refine[home]"]["models"]
    assert "characters" not in lock["refine[stage]"]["params"]
    edit(copy, "scale: 0.6", "scale: 0.9")
    assert run_cli("build", copy, "-q", cwd=root).returncode == 0
    assert ran(copy) == {f"{k}[{s}]" for k in ("generate", "refine", "score") for s in ("home", "concert")} | {"bundle"}


def test_candidates_rank_by_their_likeness_to_the_characters_references(copy):
    """generation.select.character_likeness: in a scene that shows a character, the candidate whose CLIP image
    embedding is closest to the character's reference wins (each candidate's figure is in its record); a scene
    without characters ranks as without the weight. Weighing it in a story without characters is a spec error."""
    root = copy.parent
    edit(copy, "batch_size: 1}", "batch_size: 1, candidates: 2, select: {aesthetic: 0, character_likeness: 1}}")
    r = run_cli("validate", copy, cwd=root)
    assert r.returncode == 1 and "$.generation.select.character_likeness: ranking candidates by character " \
                                 "likeness needs a scene that shows a character" in r.stderr
    _reference(root / "refs/girl.png", (200, 80, 160))
    copy.write_text(copy.read_text("utf-8").replace("models: {", "models: {ip_adapter: tiny:ip-adapter, ").replace(
        "scenes:\n", CHARS).replace("caption: 在家}", "caption: 在家, characters: [girl]}"), "utf-8")
    r = run_cli("build", copy, "--until", "generate", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    import torch
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPProcessor

    folder = str(root / ".storyc/models/tiny-aesthetic")
    model, proc = AestheticsPredictorV2Linear.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)

    def embed(path):
        with Image.open(path) as im, torch.no_grad():
            return model(**proc(images=[im.convert("RGB")], return_tensors="pt")).hidden_states[0]

    ref = embed(root / "refs/girl.png")
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]
    extra = lock["generate[home]"]["extra"]
    like = {int(seed): torch.nn.functional.cosine_similarity(
        embed(root / f"build/t/images/candidates/01-home-s{seed}.png"), ref, dim=0).item()
        for seed in extra["candidate_scores"]}
    assert len(like) == 2 and like[min(like)] != like[max(like)]
    for seed, v in like.items():
        assert extra["candidate_character_likeness"][str(seed)] == pytest.approx(v, abs=1e-5)
    assert extra["seed"] == max(like, key=lambda k: (like[k], -k))
    rec = json.loads((root / "build/t/images/01-home.json").read_text("utf-8"))
    assert rec["candidate_character_likeness"] == extra["candidate_character_likeness"]
    other = lock["generate[concert]"]["extra"]  # no character: every objective 0, the first seed kept
    assert "candidate_character_likeness" not in other and set(other["candidate_objective"].values()) == {0.0}
    assert lock["generate[home]"]["params"]["select"] == {"aesthetic": 0, "character_likeness": 1, "prompt_alignment": 0.0}


def test_previews_render_characters_and_select_weighs_their_consistency(copy, project):
    """With previews on, the scenes that show a character are previewed through the IP-Adapter as generation renders
    them; each checkpoint's record holds its character consistency, `train.select` can weigh it, and a new reference
    makes training (which the previews are part of) stale. Without a character in two scenes the weight is a spec
    error at its line."""
    root = copy.parent
    _reference(root / "refs/girl.png", (200, 80, 160))
    weights = {"mean_aesthetic": 1, "character_consistency": 2, "character_dreamsim": 1}
    text = copy.read_text("utf-8").replace(
        "models: {", "models: {ip_adapter: tiny:ip-adapter, dreamsim: 'tiny:dreamsim', ").replace(
        "scenes:\n", CHARS).replace("caption: 在家}", "caption: 在家, characters: [girl]}").replace(
        "caption: 演唱会}", "caption: 演唱会, characters: [girl]}").replace(
        "checkpoint_every: 2}", "checkpoint_every: 2, preview_every: 2, preview_steps: 1, "
                                f"select: {{weights: {json.dumps(weights)}}}}}")
    copy.write_text(text, "utf-8")
    r = run_cli("build", copy, "--until", "train", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "preview at step 2: mean aesthetic" in r.stdout and ", character consistency " in r.stdout
    assert ", character consistency by DreamSim " in r.stdout
    doc = json.loads((root / "build/t/lora/checkpoints.json").read_text("utf-8"))
    ck = doc["checkpoints"]
    assert [c["step"] for c in ck] == [2, 4] and all(-1.0 <= c["characters"] <= 1.0 for c in ck)
    # DreamSim's figure is its own (not the CLIP one), and the kept checkpoint is the best by the whole objective
    assert all(-1.0 <= c["character_dreamsim"] <= 1.0 and c["character_dreamsim"] != c["characters"] for c in ck)
    objective = {c["step"]: c["mean"] + 2 * c["characters"] + c["character_dreamsim"] for c in ck}
    assert doc["selected"] == max(objective, key=lambda s: (objective[s], s))
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]["train"]
    assert {"ip_adapter", "character:girl", "dreamsim"} <= set(lock["models"])
    assert "dreamsim" in lock["params"]["preview"]
    scenes = {s["id"]: s for s in lock["params"]["preview"]["scenes"]}
    assert scenes["home"]["characters"][0]["id"] == "girl" and "characters" not in scenes["stage"]
    strip = (root / "build/t/lora/checkpoints/step-2.png").read_bytes()
    edit(copy, "scale: 0.6", "scale: 0.0")  # the same LoRA at step 2, previewed without her: other pixels
    assert run_cli("build", copy, "-q", "--until", "train", cwd=root).returncode == 0
    assert (root / "build/t/lora/checkpoints/step-2.png").read_bytes() != strip
    _reference(root / "refs/girl.png", (40, 200, 220), 5)
    st = run_cli("status", copy, cwd=root)
    assert "train" in st.stdout and "character girl's reference images changed" in st.stdout, st.stdout

    spec = project / "story.yaml"
    (project / "data").mkdir()
    spec.write_text("version: 1\nstory: {id: d}\ndataset: {source: folder, path: data}\n"
                    "train: {preview_every: 10, select: {weights: {character_consistency: 1}}}\n"
                    "scenes: [{id: a, prompt: x, seed: 0}]\nsubmission: {images: 1, rules: none}\n", "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "story.yaml:4:" in r.stderr
    assert "$.train.select.weights.character_consistency: the previews measure character consistency" in r.stderr
    spec.write_text(spec.read_text("utf-8").replace("character_consistency: 1", "character_dreamsim: 1"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "$.train.select.weights.character_dreamsim: the previews measure character" in r.stderr
    assert "character consistency by DreamSim needs DreamSim: `models.dreamsim` is not set" in r.stderr


def test_the_shipped_character_demo_and_a_sweep_over_refine_and_scale(project):
    """specs/demo-characters.yaml: one girl from a demo-data drawing in five scenes, refined x2. A sweep over the
    refine strength and her scale needs one training, and may rank by character consistency; a story without
    characters may not."""
    import shutil

    from conftest import REPO
    from storyc.compiler import compile
    from storyc.spec import load_story

    shutil.copytree(REPO / "specs", project / "specs")
    plan = compile(load_story(project / "specs/demo-characters.yaml"))
    shows = [n for n, j in plan.stages.items() if j.kind == "generate" and "characters" in j.params]
    assert len(shows) == 5 and sum(j.kind == "refine" for j in plan.stages.values()) == 8
    assert plan.stages[shows[0]].params["characters"][0]["references"] == ["specs/demo-data/00.png"]
    r = run_cli("plan", project / "specs/demo-characters.yaml", cwd=project)
    assert "character girl: specs/demo-data/00.png at scale 0.6, in 5 scene(s)" in r.stdout
    sweep = ("version: 1\nextends: {}\nsweep:\n  parameters:\n    generation.refine.strength: [0.4, 0.6]\n"
             "    characters.girl.scale: [0.3, 0.8]\n"
             "  objective: {{weights: {{mean_aesthetic: 1.0, character_consistency: 2.0}}}}\n")
    (project / "specs/sweep.yaml").write_text(sweep.format("demo-characters.yaml"), "utf-8")
    r = run_cli("plan", project / "specs/sweep.yaml", cwd=project)
    assert r.returncode == 0 and "4 variants, 1 training" in r.stdout, r.stdout + r.stderr
    from storyc.sweep import score

    ranked = sorted(({"mean_aesthetic": 0.1, "character_consistency": c} for c in (0.7, 0.9)),
                    key=lambda rec: -score({"mean_aesthetic": 1.0, "character_consistency": 2.0}, rec))
    assert ranked[0]["character_consistency"] == 0.9
    (project / "specs/sweep.yaml").write_text(sweep.format("demo.yaml").replace(
        "    characters.girl.scale: [0.3, 0.8]\n", "").replace("generation.refine.strength", "generation.cfg_scale"),
        "utf-8")
    r = run_cli("validate", project / "specs/sweep.yaml", cwd=project)
    assert r.returncode == 1 and "weighs character_consistency, which this story does not measure" in r.stderr
    (project / "specs/sweep.yaml").write_text(sweep.format("demo-characters.yaml").replace(
        "character_consistency", "character_dreamsim"), "utf-8")
    r = run_cli("validate", project / "specs/sweep.yaml", cwd=project)
    assert r.returncode == 1 and "weighs character_dreamsim, which this story does not measure" in r.stderr
    assert "set `models.dreamsim`" in r.stderr
    # two characters in one scene each: none is in two scenes, so nothing measures their consistency
    (project / "specs/two.yaml").write_text(
        "version: 1\nstory: {id: two}\nmodels: {ip_adapter: tiny:ip-adapter}\n"
        "dataset: {source: folder, path: demo-data}\n"
        "characters:\n  girl: {reference: demo-data/00.png}\n  boy: {reference: demo-data/01.png}\n"
        "scenes:\n  - {id: a, prompt: x, seed: 0, characters: [girl]}\n"
        "  - {id: b, prompt: y, seed: 1, characters: [boy]}\nsubmission: {images: 2, rules: none}\n", "utf-8")
    assert run_cli("validate", project / "specs/two.yaml", cwd=project).returncode == 0
    (project / "specs/sweep.yaml").write_text(sweep.format("two.yaml").replace(
        "    characters.girl.scale: [0.3, 0.8]\n", "").replace("generation.refine.strength", "generation.cfg_scale"),
        "utf-8")
    r = run_cli("validate", project / "specs/sweep.yaml", cwd=project)
    assert r.returncode == 1 and "weighs character_consistency, which this story does not measure" in r.stderr
