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
                                                          "upscaler": "lanczos"}
    assert plan.stages["score[b]"].deps == ("generate[b]",) and plan.stages["score[a]"].deps == ("refine[a]",)
    (project / "s.yaml").write_text((project / "s.yaml").read_text("utf-8").replace("strength: 0.3", "strenght: 0.3"),
                                    "utf-8")
    r = run_cli("validate", "s.yaml", cwd=project)
    assert r.returncode == 1 and "s.yaml:6:42: $.scenes[0].refine.strenght: unknown key `strenght`" in r.stderr
    assert "did you mean `strength`?" in r.stderr

