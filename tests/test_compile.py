"""Shipped specs validate and compile deterministically; the compiled artifacts are what their tools read."""
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "specs").glob("*.yaml"))


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_shipped_spec_validates_and_compiles_identically(cli, spec, tmp_path):
    code, _, err = cli("validate", spec)
    assert code == 0, err
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("compile", spec, "-o", a)[0] == 0
    shutil.copytree(a, b)
    shutil.rmtree(a)
    assert cli("compile", spec, "-o", a)[0] == 0
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 9  # 8 artifacts and the folder's owner (.storyc-spec)
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # a recompile changes nothing on disk
    code, out, _ = cli("compile", spec, "-o", a)
    assert "0 changed" in out


def test_spec_header_says_how_to_run_it():
    for spec in SPECS:
        assert "storyc build specs/" in spec.read_text("utf-8").split("version:")[0], spec


def test_camp_spec_matches_the_notebook(tmp_path, cli):
    cli("compile", REPO / "specs/camp.yaml", "-o", tmp_path)
    out = tmp_path / "purple-girl-concert"
    gen = json.loads((out / "generate/generation_plan.json").read_text("utf-8"))
    assert gen["scenes"][0]["prompt"] == "二次元，日系动漫，一个紫色短发小女孩，在家中沙发上坐着，双手托着腮，很无聊，全身，粉色连衣裙"
    assert gen["scenes"][1]["negative_prompt"] == "丑陋、变形、嘈杂、模糊、低对比度，色情擦边"
    assert [s["seed"] for s in gen["scenes"]] == list(range(8))
    assert gen["lora_alpha"] == 2.0 and gen["lora_strength"] == 2.0 / 16
    assert (gen["width"], gen["height"], gen["steps"], gen["cfg_scale"]) == (1024, 1024, 50, 4.0)
    sh = (out / "train/train.sh").read_text("utf-8")
    assert "--use_gradient_checkpointing" in sh  # DiffSynth's script keeps ChatGLM and the VAE on the GPU: it needs it
    for arg in ("--lora_rank 16", "--lora_alpha 4.0", "--max_epochs 10", "--center_crop", "--precision 16-mixed",
                "--pretrained_unet_path models/kolors/Kolors/unet/diffusion_pytorch_model.safetensors"):
        assert arg in sh, arg
    plan = json.loads((out / "plan.json").read_text("utf-8"))
    assert plan["format"] == "storyc.plan/1"
    assert any("alpha 2" in n for n in plan["notes"])
    for name in ("data/ingest.json", "train/train_config.json", "generate/generation_plan.json",
                 "submission_manifest.json"):
        assert json.loads((out / name).read_text("utf-8"))["format"].endswith("/1")


def test_shell_values_are_quoted(project, cli):
    (project / "s.yaml").write_text(
        "version: 1\nstory: {id: q}\nmodels: {kolors: \"my models/$(rm -rf x)\"}\nsubmission: {rules: none, images: 1}\n"
        "scenes: [{id: a, prompt: x, seed: 0}]\n", "utf-8")
    assert cli("compile", project / "s.yaml")[0] == 0
    sh = (project / "build/q/train/train.sh").read_text("utf-8")
    assert "'my models/$(rm -rf x)/unet/diffusion_pytorch_model.safetensors'" in sh


@pytest.mark.slow  # imports Data-Juicer
def test_compiled_data_juicer_config_loads_with_data_juicer(tmp_path, cli):
    import subprocess
    import sys

    cli("compile", REPO / "specs/camp.yaml", "-o", tmp_path)
    build = tmp_path / "purple-girl-concert"
    (build / "data/input").mkdir(parents=True)
    (build / "data/input/metadata.jsonl").write_text('{"text": "x", "image": []}\n', "utf-8")
    assert "\nnp: 4\n" in (build / "data/data_juicer.yaml").read_text("utf-8")
    # Data-Juicer's own parser, in its own process (it installs process-wide log sinks); paths are relative
    # to the build folder
    code = ("import json; from data_juicer.config import init_configs; "
            "c = init_configs(args=['--config', 'data/data_juicer.yaml']); "
            "open('cfg.json', 'w').write(json.dumps({'np': c.np, 'text_keys': c.text_keys, 'image_key': c.image_key, "
            "'token': c.image_special_token, 'export': c.export_path, 'process': c.process}, default=str))")
    r = subprocess.run([sys.executable, "-c", code], cwd=build, capture_output=True, text=True,
                       env=dict(__import__("os").environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((build / "cfg.json").read_text("utf-8"))  # its stdout goes to Data-Juicer's logger
    assert 1 <= cfg["np"] <= 4 and cfg["text_keys"] == "text" and cfg["image_key"] == "image"
    assert cfg["token"] == "<__dj__image>"
    assert cfg["export"].endswith("data/output/result.jsonl")
    names = [next(iter(op)) for op in cfg["process"]]
    assert names == ["image_shape_filter", "image_aspect_ratio_filter"]
    assert cfg["process"][0]["image_shape_filter"]["min_width"] == 1024


def test_plan_lists_scenes_and_stage_hashes(cli):
    code, out, _ = cli("plan", REPO / "specs/camp.yaml")
    assert code == 0
    assert "bored-at-home" in out and "applause" in out and "generate[longing]" in out
    assert "alpha 2" in out


def test_stage_hashes_read_only_their_slice(tmp_path):
    from storyc.compiler import compile
    from storyc.spec import load_story

    camp = compile(load_story(REPO / "specs/camp.yaml"))
    winter = compile(load_story(REPO / "specs/camp-winter.yaml"))
    for name in ("ingest", "filter", "train"):
        assert camp.stages[name].params_hash == winter.stages[name].params_hash, name
    assert camp.stages["bundle"].params_hash != winter.stages["bundle"].params_hash


def test_train_sh_says_which_hashed_settings_the_script_cannot_reproduce(tmp_path, cli):
    """The DiffSynth command in train.sh has no flag for storyc's knobs: it lists them instead of dropping them."""
    from pathlib import Path

    spec = Path(__file__).parent / "fixtures/golden/knobs.yaml"
    assert cli("compile", spec, "-o", tmp_path)[0] == 0
    sh = (tmp_path / "knobs/train/train.sh").read_text("utf-8")
    head = sh.split("set -euo pipefail")[0]
    for knob in ("train.min_snr_gamma = 5", "train.ema = 0.99", 'train.lr_scheduler = "cosine"', "train.buckets = true",
                 "several sources / repeats", "the story previews"):
        assert f"#   {knob}" in head, knob
    assert "--learning_rate" in sh and "train.learning_rate" not in head  # a setting with a flag is passed, not listed
