"""The set measured as the judges see it: style distance (from the aesthetic predictor's own CLIP) on every build,
prompt alignment with a Chinese CLIP when models.clip_zh is set ("not measured" otherwise, never 0), in
scores.json, the report and the model card; measuring it reruns score and bundle only; sweep objectives weigh them."""
import json

import pytest

from conftest import edit, ran, run_cli

SCENES = ("home", "concert", "stage")
ONE_SCENE = "version: 1\nstory: {id: s}\nsubmission: {rules: none, images: 1}\nscenes: [{id: a, prompt: x, seed: 0}]\n"


def _scores(spec):
    return json.loads((spec.parent / "build/t/submission/t/scores.json").read_text("utf-8"))


def _independent_style(aesthetic, image):
    """The middle layer's patch-feature statistics, read through transformers' own output_hidden_states (not
    storyc's hook): hidden_states[0] is the embeddings, so layer k's output is hidden_states[k + 1]."""
    import torch
    from transformers import CLIPProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(str(aesthetic)).eval()
    inputs = CLIPProcessor.from_pretrained(str(aesthetic))(images=[image], return_tensors="pt")
    with torch.no_grad():
        hs = model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states
    feats = hs[len(model.vision_model.encoder.layers) // 2 + 1][0, 1:]
    return feats.mean(0).tolist(), feats.std(0).tolist()


def test_style_distance_always_and_prompt_alignment_with_a_chinese_clip(copy):
    import math

    import torch
    from PIL import Image
    from transformers import ChineseCLIPModel, ChineseCLIPProcessor

    # the score stage's version moved (style statistics): score and bundle rerun, nothing upstream
    r = run_cli("build", copy, "-q", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ran(copy) <= {f"score[{s}]" for s in SCENES} | {"bundle"}
    doc = _scores(copy)
    assert doc["prompt_alignment"] is None  # no models.clip_zh: not measured, never 0
    sub = copy.parent / "build/t/submission/t"
    assert "Prompt alignment (Chinese CLIP, image against\nits own prompt): not measured" in \
        (sub / "report.html").read_text("utf-8")
    assert "Prompt alignment (Chinese CLIP): not measured." in (sub / "README.md").read_text("utf-8")

    # style distance: the mean pairwise AdaIN style loss, from statistics checked against transformers' own layers
    aesthetic = copy.parent / ".storyc/models/tiny-aesthetic"
    stats = []
    for i, s in enumerate(SCENES):
        with Image.open(sub / f"images/0{i + 1}-{s}.png") as im:
            m, sd = _independent_style(aesthetic, im.convert("RGB"))
        rec = json.loads((copy.parent / f"build/t/scores/0{i + 1}-{s}.json").read_text("utf-8"))["style"]
        assert rec["mean"] == pytest.approx(m, abs=1e-5) and rec["std"] == pytest.approx(sd, abs=1e-5)
        stats.append((m, sd))

    def d(a, b):
        return math.sqrt((sum((x - y) ** 2 for x, y in zip(a[0], b[0])) +
                          sum((x - y) ** 2 for x, y in zip(a[1], b[1]))) / len(a[0]))

    pairs = [d(stats[i], stats[j]) for i in range(3) for j in range(i + 1, 3)]
    assert doc["style_distance"]["mean_pairwise"] == pytest.approx(sum(pairs) / 3, rel=1e-4)
    assert doc["style_distance"]["mean_pairwise"] > 0
    assert doc["style_distance"]["farthest_scene"] in SCENES

    # a Chinese CLIP: score and bundle rerun (measuring is their slice), never generate or train
    edit(copy, 'models: {kolors', "models: {clip_zh: 'tiny:clip-zh', kolors")
    r = run_cli("build", copy, "-q", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ran(copy) == {f"score[{s}]" for s in SCENES} | {"bundle"}
    doc = _scores(copy)
    clip = copy.parent / ".storyc/models/tiny-clip-zh"
    model, proc = ChineseCLIPModel.from_pretrained(str(clip)).eval(), ChineseCLIPProcessor.from_pretrained(str(clip))
    prompts = {p["file"]: p["prompt"] for p in json.loads((sub / "prompts.json").read_text("utf-8"))["scenes"]}
    for file, value in doc["prompt_alignment"]["images"].items():
        with Image.open(sub / file) as im:
            inputs = proc(text=[prompts[file]], images=[im.convert("RGB")], return_tensors="pt", padding=True)
        assert inputs["input_ids"].shape[1] > 10  # the Chinese prompt tokenised, one token a character
        with torch.no_grad():
            out = model(**inputs)
        want = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
        assert value == pytest.approx(want, abs=1e-5)
    assert doc["prompt_alignment"]["mean"] == pytest.approx(sum(doc["prompt_alignment"]["images"].values()) / 3)
    page = (sub / "report.html").read_text("utf-8")
    assert f"{doc['prompt_alignment']['mean']:.3f}" in page and "not measured (set models.clip_zh)" not in page
    # storyc score on the submission: the same figures, the gate's line last
    r = run_cli("score", sub, "--spec", copy, "--min", "-1", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert f"prompt alignment {doc['prompt_alignment']['mean']:.4f}" in lines
    assert f"style distance {doc['style_distance']['mean_pairwise']:.4f}" in r.stdout
    assert lines[-1].split()[0] == "mean" and lines[-1].split()[2] == "PASS"
    r = run_cli("score", sub, "--model", aesthetic, "--min", "-1", cwd=copy.parent)
    assert "prompt alignment: not measured (no Chinese CLIP (models.clip_zh in --spec))" in r.stdout


def test_a_sweep_objective_weighs_the_new_metrics(project):
    (project / "s.yaml").write_text(
        ONE_SCENE + "sweep:\n  parameters: {generation.cfg_scale: [3.0, 4.0]}\n"
        "  objective: {weights: {mean_aesthetic: 1, style_distance: -2, prompt_alignment: 1}}\n", "utf-8")
    r = run_cli("validate", "s.yaml", cwd=project)
    assert r.returncode == 1 and "the objective weighs prompt_alignment, which this story does not measure" in r.stderr
    assert "s.yaml:7:" in r.stderr and "models.clip_zh" in r.stderr
    text = (project / "s.yaml").read_text("utf-8").replace("story: {id: s}", "story: {id: s}\nmodels: {clip_zh: x}")
    (project / "s.yaml").write_text(text.replace("style_distance", "style_distanse"), "utf-8")
    r = run_cli("validate", "s.yaml", cwd=project)
    assert r.returncode == 1 and "unknown metric `style_distanse`" in r.stderr and "did you mean `style_distance`" in r.stderr

    from storyc.sweep import score

    rec = {"mean_aesthetic": 5.0, "style_coherence": 0.9, "style_distance": 0.5, "prompt_alignment": None}
    assert score({"mean_aesthetic": 1.0, "style_distance": -2.0}, rec) == pytest.approx(4.0)
    assert score({"prompt_alignment": 1.0}, rec) is None  # not measured: no objective, never 0


def _hps_reference(folder, weights, image, prompt):
    """HPS the way its authors compute it, with the vendored open_clip built from the config the tiny model was
    made with (storyc reads the architecture from the checkpoint instead)."""
    import torch
    from safetensors.torch import load_file

    from storyc.models.preference import _compat
    from storyc.models.tiny import TINY_OPEN_CLIP

    _compat()
    from diffsynth.extensions.ImageQualityMetric.open_clip import factory
    from diffsynth.extensions.ImageQualityMetric.open_clip.tokenizer import SimpleTokenizer

    factory._MODEL_CONFIGS["test-hps"] = TINY_OPEN_CLIP
    model, _, preprocess = factory.create_model_and_transforms("test-hps", output_dict=True)
    model.load_state_dict(load_file(str(folder / weights)))
    tok = SimpleTokenizer(str(folder / "bpe_simple_vocab_16e6.txt.gz"))
    with torch.no_grad():
        out = model.eval()(preprocess(image).unsqueeze(0), tok([prompt]))
    return (out["image_features"] @ out["text_features"].T)[0, 0].item()


def _image_reward_reference(folder, image, prompt):
    """ImageReward's reward, computed here from the tiny checkpoint with the module sizes it was built with,
    loaded strictly (storyc reads the sizes from the checkpoint and builds the model without weights)."""
    import torch
    from safetensors.torch import load_file

    from storyc.models.preference import _compat
    from storyc.models.tiny import TINY_IMAGE_REWARD_VIT

    _compat()
    from diffsynth.extensions.ImageQualityMetric.BLIP.blip import init_tokenizer
    from diffsynth.extensions.ImageQualityMetric.BLIP.med import BertConfig, BertModel
    from diffsynth.extensions.ImageQualityMetric.BLIP.vit import VisionTransformer
    from diffsynth.extensions.ImageQualityMetric.imagereward import MLP, _transform

    parts = {"blip.visual_encoder": VisionTransformer(**TINY_IMAGE_REWARD_VIT),
             "blip.text_encoder": BertModel(BertConfig.from_json_file(str(folder / "ImageReward/med_config.json")),
                                            add_pooling_layer=False), "mlp": MLP(768)}
    state = load_file(str(folder / "ImageReward/ImageReward.safetensors"))
    for prefix, m in parts.items():
        m.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
        m.eval()
    tok = init_tokenizer(str(folder / "bert-base-uncased"))(prompt, padding="max_length", truncation=True,
                                                               max_length=35, return_tensors="pt")
    with torch.no_grad():
        img = parts["blip.visual_encoder"](_transform(224)(image).unsqueeze(0))
        txt = parts["blip.text_encoder"](tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=img,
                                         encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long),
                                         return_dict=True).last_hidden_state[:, 0]
        return ((parts["mlp"](txt) - 0.16717362830052426) / 1.0333394966054072).item()


MPS_OVERALL = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
               "instance, texture, quantity, attributes, position, number, location, word, things")


def _mps_reference(folder, image, prompt):
    """MPS's "overall" score from transformers' own CLIPModel and DiffSynth's cross model, each loaded strictly from
    the checkpoint at the tiny layout's known sizes: the prompt's token features attend (cross model) from the image's
    patch features, masked to the tokens most like the condition words; the score is the scaled cosine of the result's
    first token with the prompt's pooled feature."""
    import torch
    from diffsynth.extensions.ImageQualityMetric.trainer.models.cross_modeling import Cross_model
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    clip_dir = folder / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    state = load_file(str(folder / "MPS_overall_checkpoint/MPS_overall_checkpoint_diffsynth.safetensors"))
    clip, cross = CLIPModel(CLIPConfig.from_pretrained(str(clip_dir))), Cross_model(dim=16, layer_num=2, dim_head=8,
                                                                                      heads=2)
    for prefix, m in (("model", clip), ("cross_model", cross)):
        m.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
        m.eval()
    tok = AutoTokenizer.from_pretrained(str(clip_dir))  # as DiffSynth's MPScore (the fast one: its "，" differs)

    def ids(text):
        return tok(text, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids

    pixels = CLIPImageProcessor.from_pretrained(str(clip_dir))(image, return_tensors="pt").pixel_values.half().float()
    with torch.no_grad():
        words = clip.text_model(input_ids=ids(prompt))
        text_f, text_eos = clip.text_projection(words.last_hidden_state), clip.text_projection(words.pooler_output)
        cond_f = clip.text_projection(clip.text_model(input_ids=ids(MPS_OVERALL)).last_hidden_state)
        image_f = clip.visual_projection(clip.vision_model(pixel_values=pixels).last_hidden_state)
        sim = torch.einsum("bid,bjd->bji", text_f, cond_f).max(dim=1, keepdim=True).values
        mask = torch.where(sim / sim.max() > 0.3, 0.0, float("-inf")).repeat(1, image_f.shape[1], 1)
        feat = torch.nn.functional.normalize(cross(image_f, text_f, mask)[:, 0], dim=-1)
        return (clip.logit_scale.exp() * torch.nn.functional.normalize(text_eos, dim=-1) @ feat.T).item()


def test_preference_scores_through_diffsynths_image_quality_metric(copy):
    """models.pickscore / hpsv2_1 / imagereward / mps (DiffSynth's QualityMetric layout): each image against its own
    prompt in
    scores.json, the report and `storyc score`, only score and bundle rerun; an unset one is null, never 0; and
    generation.select ranks best-of-K candidates by a weighted preference score."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    edit(copy, 'models: {kolors', "models: {pickscore: 'tiny:preference', hpsv2_1: 'tiny:preference', "
         "imagereward: 'tiny:preference', mps: 'tiny:preference', kolors")
    r = run_cli("build", copy, "-q", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ran(copy) == {f"score[{s}]" for s in SCENES} | {"bundle"}
    doc = _scores(copy)["preference"]
    assert doc["hpsv2"] is None  # not configured: not measured
    sub = copy.parent / "build/t/submission/t"
    folder = copy.parent / ".storyc/models/tiny-preference"
    prompts = {p["file"]: p["prompt"] for p in json.loads((sub / "prompts.json").read_text("utf-8"))["scenes"]}
    model = CLIPModel.from_pretrained(str(folder / "PickScore_v1")).eval()
    proc = CLIPProcessor.from_pretrained(str(folder / "CLIP-ViT-H-14-laion2B-s32B-b79K"))
    for file in prompts:
        with Image.open(sub / file) as im:
            im = im.convert("RGB")
        with torch.no_grad():  # PickScore: the cosine of its CLIP's image and text embeddings
            want = torch.nn.functional.cosine_similarity(
                model.get_image_features(**proc(images=[im], return_tensors="pt")),
                model.get_text_features(**proc(text=[prompts[file]], return_tensors="pt", padding=True,
                                               truncation=True, max_length=77))).item()
        assert doc["pickscore"]["images"][file] == pytest.approx(want, abs=1e-5)
        hps = _hps_reference(folder, "HPS_v2/HPS_v2.1_compressed.safetensors", im, prompts[file])
        assert doc["hpsv2_1"]["images"][file] == pytest.approx(hps, abs=1e-5)
        assert doc["imagereward"]["images"][file] == pytest.approx(_image_reward_reference(folder, im, prompts[file]),
                                                                   abs=1e-5)
        assert doc["mps"]["images"][file] == pytest.approx(_mps_reference(folder, im, prompts[file]), abs=1e-4)
    assert doc["pickscore"]["mean"] == pytest.approx(sum(doc["pickscore"]["images"].values()) / 3)
    page = (sub / "report.html").read_text("utf-8")
    assert f"PickScore {doc['pickscore']['mean']:.3f}" in page and "HPS v2 not measured (set models.hpsv2)" in page
    assert page.count("<th>HPS v2.1</th>") == 1 and page.count("<th>ImageReward</th>") == 1
    assert page.count("<th>MPS</th>") == 1
    assert len({round(v, 4) for v in doc["imagereward"]["images"].values()}) == 3  # the images tell apart
    assert len({round(v, 4) for v in doc["mps"]["images"].values()}) == 3
    r = run_cli("score", sub, "--spec", copy, "--min", "-1", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"pickscore {doc['pickscore']['mean']:.4f} (" in r.stdout and "hpsv2 " not in r.stdout  # not set
    assert f"hpsv2_1 {doc['hpsv2_1']['mean']:.4f} (" in r.stdout and f"mps {doc['mps']['mean']:.4f} (" in r.stdout

    # best-of-2 by PickScore alone: the kept seed is the candidate with the highest PickScore
    edit(copy, "negative: 丑陋}", "negative: 丑陋}\ngeneration: {width: 64, height: 64, steps: 2, cfg_scale: 4.0, "
         "batch_size: 1, candidates: 2, select: {aesthetic: 0, pickscore: 1}}")
    edit(copy, "generation: {width: 64, height: 64, steps: 2, cfg_scale: 4.0, batch_size: 1}\n", "")
    r = run_cli("build", copy, "-q", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    for i, s in enumerate(SCENES):
        rec = json.loads((copy.parent / f"build/t/images/0{i + 1}-{s}.json").read_text("utf-8"))
        cands = rec["candidate_pickscore"]
        assert len(cands) == 2 and rec["seed"] == int(max(cands, key=cands.get))
        assert rec["candidate_objective"] == cands


def test_a_preference_weight_or_objective_needs_its_model(project):
    (project / "s.yaml").write_text(
        ONE_SCENE + "generation: {candidates: 2, select: {hpsv2: 1}}\n"
        "sweep:\n  parameters: {generation.cfg_scale: [3.0, 4.0]}\n  objective: {weights: {pickscore: 1}}\n", "utf-8")
    r = run_cli("validate", "s.yaml", cwd=project)
    assert r.returncode == 1
    assert "s.yaml:5:" in r.stderr and "ranking candidates by hpsv2 needs its model" in r.stderr
    edit(project / "s.yaml", "story: {id: s}", "story: {id: s}\nmodels: {hpsv2: 'tiny:preference'}")
    r = run_cli("validate", "s.yaml", cwd=project)  # the story is valid now; its sweep is not
    assert r.returncode == 1 and "the objective weighs pickscore, which this story does not measure" in r.stderr
    assert "s.yaml:9:" in r.stderr and "models.pickscore" in r.stderr
    edit(project / "s.yaml", "{hpsv2: 'tiny:preference'}", "{hpsv2: 'tiny:preference', pickscore: 'tiny:preference'}")
    r = run_cli("validate", "s.yaml", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hps_architecture_read_from_a_full_size_checkpoint_is_open_clips_vit_h_14():
    """diffsynth 1.1.9's vendored open_clip ships no model configs: storyc reads the architecture from the HPS
    checkpoint. On a ViT-H-14 state dict (shapes only, on the meta device) that is open_clip's own ViT-H-14.json."""
    import torch

    from storyc.models.preference import _compat, open_clip_config

    _compat()
    from diffsynth.extensions.ImageQualityMetric.open_clip.model import CLIP

    vit_h_14 = {"embed_dim": 1024,  # open_clip/model_configs/ViT-H-14.json
                "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
    with torch.device("meta"):
        state = CLIP(**vit_h_14).state_dict()
    cfg = open_clip_config(state)
    assert cfg["vision_cfg"].pop("mlp_ratio") == 4.0  # open_clip's default, written out
    assert cfg == vit_h_14


def test_mps_sizes_read_from_a_full_size_checkpoint_are_diffsynths():
    """storyc builds MPS's cross model at the sizes its checkpoint has: for DiffSynth's own (CLIPModel builds
    Cross_model(dim=1024, layer_num=4, heads=16)), those (shapes only, on the meta device)."""
    import torch

    from storyc.models.preference import _compat, mps_cross_sizes

    _compat()
    from diffsynth.extensions.ImageQualityMetric.trainer.models.cross_modeling import Cross_model

    with torch.device("meta"):
        state = {f"cross_model.{k}": v for k, v in Cross_model(dim=1024, layer_num=4, heads=16).state_dict().items()}
    assert mps_cross_sizes(state) == {"dim": 1024, "layer_num": 4, "dim_head": 64, "heads": 16, "ff_mult": 4}


def test_train_select_weighs_prompt_alignment_and_preference_scores(copy):
    """train.select: {weights: ...} may weigh prompt alignment (models.clip_zh) and the preference models: each
    preview measures them (the mean over its scenes), the checkpoint with the best objective ships, the lock names the
    models as the training's inputs, the report shows the figures; without its model a weight is a spec error."""
    import yaml

    root = copy.parent
    edit(copy, 'models: {kolors', "models: {clip_zh: 'tiny:clip-zh', pickscore: 'tiny:preference', "
         "mps: 'tiny:preference', kolors")
    edit(copy, "checkpoint_every: 2}", "checkpoint_every: 2, preview_every: 2, preview_steps: 1, "
         "select: {weights: {mean_aesthetic: 0, prompt_alignment: 1, pickscore: 1, mps: -1}}}")
    r = run_cli("build", copy, "--until", "train", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "preview at step 2: mean aesthetic" in r.stdout and ", prompt alignment " in r.stdout
    assert ", PickScore " in r.stdout and ", MPS " in r.stdout
    doc = json.loads((root / "build/t/lora/checkpoints.json").read_text("utf-8"))
    ck = doc["checkpoints"]
    assert [c["step"] for c in ck] == [2, 4]
    for c in ck:
        assert -1 <= c["alignment"] <= 1 and -1 <= c["pickscore"] <= 1 and c["mps"] != 0
        assert "hpsv2" not in c  # not weighed: not measured
    best = max(ck, key=lambda c: (c["alignment"] + c["pickscore"] - c["mps"], c["step"]))
    assert doc["selected"] == best["step"]
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]["train"]
    assert {"clip_zh", "pickscore", "mps"} <= set(lock["models"])
    assert lock["params"]["preview"]["preference"] == {"pickscore": "tiny:preference", "mps": "tiny:preference"}
    r = run_cli("build", copy, "-q", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    page = (root / "build/t/submission/t/report.html").read_text("utf-8")
    assert "<th>prompt alignment</th><th>PickScore</th><th>MPS</th><th>preview</th>" in page

    edit(copy, "pickscore: 'tiny:preference', ", "")
    r = run_cli("validate", copy, cwd=root)
    assert r.returncode == 1 and "$.train.select.weights.pickscore: choosing the checkpoint by pickscore needs its " \
        "model: `models.pickscore` is not set" in r.stderr
    line = next(i for i, t in enumerate(copy.read_text("utf-8").splitlines(), 1) if "preview_every" in t)
    assert f"story.yaml:{line}:" in r.stderr
