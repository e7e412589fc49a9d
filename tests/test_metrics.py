"""The set measured as the judges see it: style distance (from the aesthetic predictor's own CLIP) on every build,
prompt alignment with a Chinese CLIP when models.clip_zh is set ("not measured" otherwise, never 0), in
scores.json, the report and the model card; measuring it reruns score and bundle only; sweep objectives weigh them."""
import json

import pytest

from conftest import edit, ran, run_cli

SCENES = ("home", "concert", "stage")


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
    assert f"{doc['prompt_alignment']['mean']:.3f}" in page and "not measured" not in page
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
        "version: 1\nstory: {id: s}\nsubmission: {rules: none, images: 1}\nscenes: [{id: a, prompt: x, seed: 0}]\n"
        "sweep:\n  parameters: {generation.cfg_scale: [3.0, 4.0]}\n"
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
