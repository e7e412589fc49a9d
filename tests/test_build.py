"""The build engine: what reruns after each kind of edit, interruption and resume, lock robustness."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, SPEC1, build_report, copy_project, edit as _edit, make_project, ran, run_cli

ALL = {"ingest", "filter", "train", "generate[home]", "generate[concert]", "generate[stage]", "score[home]",
       "score[concert]", "score[stage]", "bundle"}


def _build(spec, *extra):
    from storyc.cli import main

    return main(["build", str(spec), "-q", *extra])


def test_rebuild_with_no_change_runs_nothing(copy):
    assert _build(copy) == 0
    assert ran(copy) == set()


def test_scene_prompt_edit_reruns_that_scene_only(copy):
    _edit(copy, "在演唱会", "在大型演唱会")
    assert _build(copy) == 0
    assert ran(copy) == {"generate[concert]", "score[concert]", "bundle"}


def _metrics(spec):
    import json

    return json.loads((spec.parent / "build/t/build_times.json").read_text("utf-8"))["metrics"]


def test_prompt_embeddings_are_cached_by_content(copy, monkeypatch):
    """A prompt edit encodes that one prompt; a seed edit or an undo encodes none and never loads ChatGLM; the
    image made from cached embeddings is the cold build's, byte for byte."""
    before = (copy.parent / "build/t/images/02-concert.png").read_bytes()
    _edit(copy, "在演唱会", "在大型演唱会")
    assert _build(copy) == 0
    assert ran(copy) == {"generate[concert]", "score[concert]", "bundle"}
    m = _metrics(copy)
    assert m["prompts_encoded"] == 1  # the new prompt; the negative is cached
    # the UNet's weights were read on a thread while diffsynth imported and ChatGLM encoded (on the CPU, always)
    assert m["generate.unet_prefetched"] == 1 and m["generate.unet_read_s"] > 0

    import storyc.models.kolors as kolors

    def no(*a, **k):
        raise AssertionError("ChatGLM loaded although every prompt was cached")

    monkeypatch.setattr(kolors, "load_prompter", no)
    _edit(copy, "在大型演唱会", "在演唱会")  # undo: both embeddings are in the cache
    assert _build(copy) == 0
    assert ran(copy) == {"generate[concert]", "score[concert]", "bundle"}
    assert _metrics(copy)["prompts_encoded"] == 0
    assert (copy.parent / "build/t/images/02-concert.png").read_bytes() == before
    _edit(copy, "seed: 1,", "seed: 11,")
    assert _build(copy) == 0 and _metrics(copy)["prompts_encoded"] == 0


def test_cfg_edit_reruns_every_scene_not_train(copy):
    _edit(copy, "cfg_scale: 4.0", "cfg_scale: 5.0")
    assert _build(copy) == 0
    scenes = {f"{k}[{s}]" for k in ("generate", "score") for s in ("home", "concert", "stage")}
    assert ran(copy) == scenes | {"bundle"}  # new images, so a new bundle


def test_filter_edit_reruns_filter_and_everything_after(copy):
    _edit(copy, "min_width: 1024", "min_width: 1050")  # drops the 1024x1024 image
    assert _build(copy) == 0
    assert ran(copy) == ALL - {"ingest"}


def test_filter_edit_that_keeps_the_same_images_stops_at_filter(copy):
    _edit(copy, "max_ratio: 2.0", "max_ratio: 3.0")  # same images survive: nothing downstream changes
    assert _build(copy) == 0
    assert ran(copy) == {"filter"}


def test_caption_edit_reruns_bundle_only(copy):
    _edit(copy, "caption: 舞台}", "caption: 大舞台}")
    assert _build(copy) == 0
    assert ran(copy) == {"bundle"}


def test_touch_without_change_reruns_nothing(copy):
    for p in (copy.parent / "data").iterdir():
        os.utime(p)
    for p in (copy.parent / "build/t/images").glob("*.png"):
        os.utime(p)
    assert _build(copy) == 0
    assert ran(copy) == set()


def test_new_training_image_reruns_ingest(copy):
    from conftest import write_images

    write_images(copy.parent / "data" / "more", [(1024, 1024)])
    code, out = _status(copy)
    assert "ingest" in out and "dataset source changed" in out
    assert _build(copy) == 0
    assert {"ingest", "filter", "train"} <= ran(copy)


def _status(spec):
    r = run_cli("status", spec, cwd=spec.parent)
    return r.returncode, r.stdout


def test_status_says_why_and_reads_no_weights(copy, monkeypatch, capsys):
    _edit(copy, "一个紫色长发少女在舞台上", "一个紫色长发少女在舞台上唱歌")
    (copy.parent / "build/t/images/01-home.png").unlink()
    from storyc import lock
    from storyc.cli import main

    reads = []
    real = lock.sha256_file
    monkeypatch.setattr(lock, "sha256_file", lambda p, *a: reads.append(str(p)) or real(p, *a))
    assert main(["status", str(copy)]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: " ".join(ln.split()[1:]) for ln in out.splitlines() if ln.strip()}
    assert rows["generate[stage]"] == "stale scenes[2]: prompt changed"
    assert rows["generate[home]"] == "stale images/01-home.png missing"
    assert rows["train"] == "up to date"
    assert not [r for r in reads if "/.storyc/models/" in r], reads  # model weights are fingerprinted from the cache


def _tree(root):
    """Every file of the project with its bytes and mtime: what 'changes nothing' means."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_dry_run_and_status_write_nothing(copy):
    _edit(copy, "cfg_scale: 4.0", "cfg_scale: 6.0")
    before = _tree(copy.parent)
    r = run_cli("build", copy, "--dry-run", cwd=copy.parent)
    assert r.returncode == 0, r.stderr
    assert "would write build/t/generate/generation_plan.json" in r.stdout
    assert "would run generate[home]: cfg_scale changed" in r.stdout
    # what depends on an output not produced yet may rerun; a kind's scenes are one line
    assert "may run   score (3 scenes): if the output of generate (3 scenes) changes" in r.stdout
    assert "may run   bundle: if the output of score (3 scenes) changes" in r.stdout
    assert "dry run: 3 stage(s) would run, 4 may run if their inputs come out different; nothing was written" in r.stdout
    code, out = _status(copy)
    assert code == 0 and "3 of 10 stages stale, 4 may rerun" in out
    assert _tree(copy.parent) == before  # not the compiled files, the lock, the report or the fingerprint cache


def test_filter_edit_keeping_the_images_is_one_stale_stage(copy):
    _edit(copy, "max_ratio: 2.0", "max_ratio: 2.1")
    code, out = _status(copy)
    rows = {ln.split()[0]: " ".join(ln.split()[1:]) for ln in out.splitlines() if ln.strip()}
    assert rows["filter"] == "stale filters changed"
    assert rows["train"] == "may rerun if the output of filter changes"
    assert rows["bundle"] == "may rerun if the output of train or score (3 scenes) changes"
    assert "1 of 10 stages stale, 8 may rerun" in out
    assert _build(copy) == 0 and ran(copy) == {"filter"}


def test_force_and_until_and_run(copy):
    assert _build(copy, "--force", "train", "--until", "train") == 0
    assert ran(copy) == {"train"}
    from storyc.cli import main

    assert main(["run", "score[home]", str(copy), "-q", "--force", "score[home]"]) == 0
    assert ran(copy) == {"score[home]"}
    assert main(["run", "generate[home]", str(copy), "-q", "--force"]) == 0  # that stage, not its inputs
    assert ran(copy) == {"generate[home]"}
    r = run_cli("build", copy, "--until", "genrate", cwd=copy.parent)
    assert r.returncode == 1 and "no stage `genrate`" in r.stderr and "did you mean `generate`?" in r.stderr


def test_lock_is_deterministic_and_rewritten_only_on_change(copy):
    lock = copy.parent / "story.lock"
    before = (lock.read_bytes(), lock.stat().st_mtime_ns)
    assert _build(copy) == 0
    assert (lock.read_bytes(), lock.stat().st_mtime_ns) == before
    doc = yaml.safe_load(lock.read_text("utf-8"))
    assert doc["format"] == 1 and doc["storyc"]
    assert doc["stages"]["generate[home]"]["extra"]["seed"] == 0
    assert isinstance(doc["stages"]["score[home]"]["extra"]["score"], float)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit-hash", "old-format"])
def test_corrupted_lock_never_reuses_wrongly(copy, damage):
    lock = copy.parent / "story.lock"
    text = lock.read_text("utf-8")
    if damage == "truncate":
        lock.write_text(text[: len(text) // 2], "utf-8")
    elif damage == "garbage":
        lock.write_text("::: not yaml [", "utf-8")
    elif damage == "edit-hash":
        doc = yaml.safe_load(text)
        rec = doc["stages"]["generate[home]"]["outputs"]["images/01-home.png"]
        rec["sha256"] = "0" * 64
        lock.write_text(yaml.safe_dump(doc), "utf-8")
    else:
        lock.write_text(text.replace("format: 1", "format: 0"), "utf-8")
    r = run_cli("build", copy, cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    if damage == "edit-hash":
        assert "generate[home]" in ran(copy) and "generate[concert]" not in ran(copy)
    # whatever was damaged, the rebuilt lock equals the intact one
    assert yaml.safe_load(lock.read_text("utf-8")) == yaml.safe_load(text)


def test_newer_lock_format_is_refused(copy):
    lock = copy.parent / "story.lock"
    lock.write_text(lock.read_text("utf-8").replace("format: 1", "format: 99"), "utf-8")
    r = run_cli("build", copy, cwd=copy.parent)
    assert r.returncode == 1
    assert "written by a newer storyc (lock format 99" in r.stderr and "Traceback" not in r.stderr


def _outputs(spec):
    doc = yaml.safe_load((spec.parent / "story.lock").read_text("utf-8"))
    return {k: v["outputs"] for k, v in doc["stages"].items()}


def _read(p):
    try:
        return p.read_text("utf-8")
    except OSError:
        return ""


def _kill_when(spec, predicate, sig, extra=(), timeout=300):
    p = subprocess.Popen([sys.executable, "-m", "storyc", "build", str(spec), *extra], cwd=spec.parent,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not predicate():
        time.sleep(0.05)
    assert p.poll() is None, "the build finished before it could be interrupted:\n" + p.stdout.read()
    p.send_signal(sig)
    out = p.communicate(timeout=120)[0]
    return p.returncode, out


# (an interruption during training: tests/test_train.py::test_resume_with_ema_and_previews_matches_uninterrupted)
@pytest.mark.parametrize("when", ["filter", "between-scenes"])
def test_interrupted_build_resumes_to_the_same_lock(base, tmp_path, tiny_models, when):
    spec_text = SPEC1
    if when == "between-scenes":
        spec_text = spec_text.replace("steps: 2, cfg_scale: 4.0, batch_size: 1", "steps: 12, cfg_scale: 4.0, batch_size: 1")
    if when == "between-scenes":  # both start from the same trained LoRA: build it once, copy the project
        ref = make_project(tmp_path / "ref", tiny_models, spec_text)
        assert run_cli("build", ref, "--until", "train", cwd=ref.parent).returncode == 0
        spec = copy_project(ref, tmp_path / "cut")
        r = run_cli("build", ref, cwd=ref.parent)  # a subprocess like the interrupted build: same threads, same floats
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        ref = base  # the uninterrupted build of the same spec, also built in a subprocess
        spec = make_project(tmp_path / "cut", tiny_models, spec_text)
    root = spec.parent
    if when == "filter":
        code, out = _kill_when(spec, lambda: (root / "build/t/data/output").exists(), signal.SIGINT)
        assert "interrupted" in out
    else:
        code, out = _kill_when(spec, lambda: "generate[home]" in _read(root / "story.lock"), signal.SIGKILL)
        first = (root / "build/t/images/01-home.png").stat().st_mtime_ns
    assert code != 0
    r = run_cli("build", spec, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    if when == "between-scenes":
        assert build_report(spec)["generate[home]"] == "up to date"
        assert (root / "build/t/images/01-home.png").stat().st_mtime_ns == first
    assert _outputs(spec) == _outputs(ref)


def test_the_offline_demo_builds_end_to_end(tmp_path, tiny_models):
    proj = tmp_path / "repo"
    shutil.copytree(REPO / "specs", proj / "specs")
    (proj / ".storyc" / "models").mkdir(parents=True)
    for d in tiny_models.iterdir():
        (proj / ".storyc" / "models" / d.name).symlink_to(d)
    r = run_cli("build", "specs/demo.yaml", cwd=proj, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "submission VALID" in r.stdout
    sub = proj / "build/purple-girl-demo/submission/purple-girl-demo"
    assert len(list((sub / "images").glob("0*.png"))) == 8
    assert (sub / "storyboard.png").exists() and (sub / "manifest.json").exists()
    assert (proj / "specs/demo.lock").exists()
    r = run_cli("status", "specs/demo.yaml", cwd=proj)
    assert "everything up to date" in r.stdout
    # the "done when": the model page a participant could upload unchanged
    r = run_cli("publish", "--dry-run", "specs/demo.yaml", "--model-id", "team/x", cwd=proj)
    assert r.returncode == 0, r.stderr
    tree = proj / "build/purple-girl-demo/publish/model"
    assert len(list((tree / "images").glob("0*.png"))) == 8 and (tree / "configuration.json").is_file()
    assert (tree / "purple-girl-demo.kohya.safetensors").is_file() and (tree / "README.md").is_file()
    assert (proj / "build/purple-girl-demo/publish/POST.md").read_text("utf-8").startswith("storyc-demo + ")


def test_quiet_builds_and_notes_once(copy, cli):
    _edit(copy, "max_ratio: 2.0", "max_ratio: 2.1")
    _edit(copy, "batch_size: 1}", "batch_size: 1, lora_scale: 0.5}")
    code, out, err = cli("build", copy, "-q")
    assert code == 0 and all(ln.startswith("warning: ") for ln in err.splitlines()), err  # the spec's own warning
    # -q: only the verdict; no stage chatter (filter summary), no notes
    assert out.splitlines() == [ln for ln in out.splitlines() if ln.startswith("submission VALID")], out
    code, out, _ = cli("build", copy)  # a no-op build repeats no note
    assert code == 0 and "note:" not in out and "0 stage(s) ran" in out
    for cmd in ("validate", "compile", "plan"):  # the note lives where the spec is read and explained
        code, out, _ = cli(cmd, copy)
        assert code == 0 and "note: generation.lora_scale 0.5" in out, cmd
