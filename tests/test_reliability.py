"""State that cannot silently lie: concurrent builds, cache integrity, the verdict, bad data, hostile names,
interruptions at awkward moments. Each test reproduces a failure found by an adversarial probe."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import DATA_SPEC as SPEC_D, REPO, copy_project, edit as _edit, ran, run_cli


def _lora_bytes(spec, sid="t"):
    return (spec.parent / f"build/{sid}/lora/{sid}.diffsynth.safetensors").read_bytes()


def _popen(spec, *args):
    return subprocess.Popen([sys.executable, "-m", "storyc", "build", str(spec), *args], cwd=spec.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait_for(pred, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- 1. concurrent builds

def test_concurrent_builds_refuse_wait_and_take_over_stale_locks(copy):
    """A second build of the same folder refuses and names the holder; a story training the same LoRA waits for
    its cache entry; a killed build's locks are taken over."""
    # long enough that the first build is still training while the others start (80 steps), checkpoints every 30
    # steps, not every 2: the resumed run writes 2 of them, not ~70
    _edit(copy, "steps_per_epoch: 4,", "steps_per_epoch: 80,")
    _edit(copy, "checkpoint_every: 2}", "checkpoint_every: 30}")
    other = copy.parent / "other.yaml"  # another story, same data and training: the same cache entry
    other.write_text(copy.read_text("utf-8").replace("story: {id: t}", "story: {id: t2}"), "utf-8")
    from storyc.cli import main

    assert main(["build", str(other), "--until", "filter", "-q"]) == 0
    a = _popen(copy, "--until", "train")
    try:
        cache = copy.parent / ".storyc/cache/train"
        assert _wait_for(lambda: any(cache.glob("*.partial/train_log.csv"))), "training never started"
        r = run_cli("build", copy, cwd=copy.parent)
        assert r.returncode == 1
        assert f"another storyc process (pid {a.pid}) is running a build of build/t/" in r.stderr
        b = _popen(other, "--until", "train")
        out_b = []
        assert _wait_for(lambda: (out_b.append(b.stdout.readline()) or "waiting for another storyc" in out_b[-1]),
                         120), "".join(out_b)
        assert f"pid {a.pid}" in out_b[-1]
        assert _wait_for(lambda: any(cache.glob("*.partial/checkpoints/last.ckpt.sha256"))), "no checkpoint written"
        a.send_signal(signal.SIGKILL)  # killed mid-training, after its first sealed checkpoint, holding both locks
        a.wait()
        rest = b.communicate(timeout=600)[0]
        assert b.returncode == 0, "".join(out_b) + rest
        assert "resuming training at step" in rest  # b finished a's cache entry from its checkpoint
    finally:
        for p in (a,):
            if p.poll() is None:
                p.kill()
    r = run_cli("build", copy, "--until", "train", cwd=copy.parent)  # a's stale build lock is free again
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reused cached LoRA" in r.stdout


# ---------------------------------------------------------------- 2. caches are verified before use

def _rot(f, keep_mtime=True):
    """Bit rot: the same size and (by default) the same mtime, other bytes."""
    st = f.stat()
    raw = bytearray(f.read_bytes())
    raw[-100:] = bytes(b ^ 0xFF for b in raw[-100:])
    f.write_bytes(bytes(raw))
    if keep_mtime:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_corrupt_cached_lora_is_dropped_and_retrained(copy):
    """A cached LoRA is verified byte for byte before it is reused: bit rot that keeps size and mtime (which the
    fingerprint cache would trust) and an emptied seal are both "not usable", and the LoRA is trained again."""
    entry = next(p for p in (copy.parent / ".storyc/cache/train").iterdir() if p.is_dir())
    _rot(entry / "diffsynth.safetensors")
    other = copy.parent / "other.yaml"
    other.write_text(copy.read_text("utf-8").replace("story: {id: t}", "story: {id: t2}"), "utf-8")
    r = run_cli("build", other, "--until", "train", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "diffsynth.safetensors differs from its seal" in r.stdout and "reused cached LoRA" not in r.stdout
    assert _lora_bytes(other, "t2")[-2000:] == _lora_bytes(copy)[-2000:]  # retrained: the same LoRA again
    (entry / "DONE").write_text("", "utf-8")  # an empty seal is no seal
    third = copy.parent / "third.yaml"
    third.write_text(copy.read_text("utf-8").replace("story: {id: t}", "story: {id: t3}"), "utf-8")
    r = run_cli("build", third, "--until", "train", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"cache entry {entry.name[:12]} not sealed" in r.stdout and "trained 4 steps" in r.stdout


def test_garbage_cached_latents_are_encoded_again_and_force_retrains(copy):
    lats = sorted((copy.parent / ".storyc/cache/latents").glob("*.safetensors"))
    assert len(lats) == 2  # the two training images the filters keep
    _rot(lats[0])  # same size and mtime
    lats[1].with_name(lats[1].name + ".sha256").unlink()  # no seal: not trusted, never re-sealed as good
    before = _lora_bytes(copy)
    r = run_cli("build", copy, "--force", "train", "--until", "train", cwd=copy.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--force train: retraining" in r.stdout and "trained 4 steps" in r.stdout
    assert r.stdout.count("its bytes differ from its seal; making it again") == 1
    assert r.stdout.count("not sealed; making it again") == 1
    assert "2 images and 0 prompts encoded now" in r.stdout
    assert _lora_bytes(copy) == before


# ---------------------------------------------------------------- 3. captions come from the spec

def test_caption_edit_updates_every_file_of_the_bundle(copy):
    """A caption edit reaches every file; a caption over several lines (`caption: |`) too (it crashed the bundle):
    one line under its storyboard image, its own line breaks where a format keeps them."""
    _edit(copy, "caption: 舞台}", "caption: \"新的舞台说明\\n第二行\"}")
    from storyc.cli import main

    assert main(["build", str(copy), "-q"]) == 0
    assert ran(copy) == {"bundle"}
    sub = copy.parent / "build/t/submission/t"
    for name in ("prompts.csv", "prompts.json", "README.md", "report.html"):
        text = (sub / name).read_text("utf-8-sig")
        assert "新的舞台说明" in text and "舞台}" not in text, name
    assert "### 3. 新的舞台说明 第二行" in (sub / "README.md").read_text("utf-8")  # one Markdown heading line
    assert json.loads((sub / "prompts.json").read_text("utf-8"))["scenes"][2]["caption"] == "新的舞台说明\n第二行"


# ---------------------------------------------------------------- 5. the verdict is recomputed

def test_verdict_is_recomputed_not_read_from_the_lock(copy):
    _edit(copy, "min_aesthetic: -1.0", "min_aesthetic: 5.0")
    r = run_cli("build", copy, cwd=copy.parent)
    assert r.returncode == 3 and "submission INVALID" in r.stdout
    lock = copy.parent / "story.lock"
    doc = yaml.safe_load(lock.read_text("utf-8"))
    doc["stages"]["bundle"]["extra"]["valid"] = True
    doc["stages"]["bundle"]["extra"]["mean_aesthetic"] = 9.9
    lock.write_text(yaml.safe_dump(doc, allow_unicode=True), "utf-8")
    r = run_cli("build", copy, cwd=copy.parent)
    assert r.returncode == 3 and "submission INVALID" in r.stdout and "submission VALID" not in r.stdout


def test_publish_checks_the_files_not_the_manifest(copy):
    env = {"MODELSCOPE_API_TOKEN": "x"}
    readme = copy.parent / "build/t/submission/t/README.md"
    readme.write_text(readme.read_text("utf-8") + "\nedited\n", "utf-8")
    r = run_cli("publish", copy, "--model-id", "me/story", cwd=copy.parent, env=env, timeout=120)
    assert r.returncode == 1 and "was modified" in r.stderr, r.stderr
    r = run_cli("publish", copy, "--model-id", "../../x", cwd=copy.parent, env=env, timeout=120)
    assert r.returncode == 1 and "--model-id `../../x`" in r.stderr


# ---------------------------------------------------------------- 6/8. what is ingested is what is fingerprinted

def _ingest(project, spec_text=SPEC_D):
    (project / "story.yaml").write_text(spec_text, "utf-8")
    return run_cli("run", "ingest", project / "story.yaml", cwd=project)


def test_hidden_files_are_neither_ingested_nor_fingerprinted(project):
    (project / "imgs").mkdir()
    Image.new("RGB", (64, 64), "red").save(project / "imgs/a.png")
    Image.new("RGB", (64, 64), "blue").save(project / "imgs/.hidden.png")
    r = _ingest(project)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((project / "build/d/data/input/ingest_report.json").read_text("utf-8"))
    assert rep["records"] == 1


def test_symlink_out_of_the_project_is_refused(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (64, 64), "red").save(outside)
    (project / "imgs").mkdir()
    (project / "imgs/link.png").symlink_to(outside)
    r = _ingest(project)
    assert r.returncode == 1 and "link.png links to a file outside the project" in r.stdout


@pytest.mark.parametrize("image", ["../x.png", "/etc/hostname", "sub"])
def test_jsonl_images_must_be_regular_files_inside_its_folder(project, image):
    (project / "set/sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(project / "x.png")
    (project / "set/data.jsonl").write_text(json.dumps({"text": "t", "image": [image]}) + "\n", "utf-8")
    r = _ingest(project, SPEC_D.replace("{source: folder, path: imgs,", "{source: jsonl, path: set/data.jsonl,"))
    assert r.returncode == 1, r.stdout
    assert "data.jsonl:1: image" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_awkward_images_and_captions(project):
    (project / "imgs").mkdir()
    grey16 = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(grey16).save(project / "imgs/a16.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(project / "imgs/b_alpha.png")
    os.mkfifo(project / "imgs/c_fifo.png")  # a pipe named like an image: must not hang ingest
    (project / "fingerprint-me").write_text("x")
    (project / ".storyc/fingerprints.json").write_text("[1, 2, 3]")  # wrong shape: only a cache
    r = _ingest(project)
    assert r.returncode == 0, r.stdout + r.stderr
    imgs = sorted((project / "build/d/data/input/images").iterdir())
    a = np.asarray(Image.open(imgs[0]))
    assert a.min() == 0 and a.max() == 255 and 100 < a.mean() < 155  # a grey ramp, not all white
    b = np.asarray(Image.open(imgs[1]))
    assert (b == 255).all()  # fully transparent red composited over white
    (project / "imgs/a16.txt").write_bytes("标题".encode("gbk"))
    r = _ingest(project)
    assert r.returncode == 1 and "caption file a16.txt is not UTF-8 text" in r.stdout


# ---------------------------------------------------------------- 7/9. interruptions at awkward moments

def test_kill_between_last_step_and_lora_export_resumes(base, tmp_path):
    proj = copy_project(base, tmp_path / "k")
    shutil.rmtree(proj.parent / ".storyc/cache/train")
    code = ("import os, signal, sys\nfrom storyc.stages.train import module as m\n"
            "m.LoRAModule.on_train_end = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
            "from storyc.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "build", str(proj), "--force", "train", "--until", "train"],
                       cwd=proj.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert any((proj.parent / ".storyc/cache/train").glob("*.partial/checkpoints/last.ckpt"))
    r = run_cli("build", proj, "--until", "train", cwd=proj.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _lora_bytes(proj) == _lora_bytes(base)


def test_ctrl_c_during_training_exits_130(copy):
    _edit(copy, "steps_per_epoch: 4,", "steps_per_epoch: 400,")
    p = _popen(copy, "--force", "train", "--until", "train", "--cache", str(copy.parent / "c"))
    assert _wait_for(lambda: any((copy.parent / "c/train").glob("*.partial/train_log.csv")))
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out
    assert "interrupted: finished outputs are kept" in out


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_a_killed_build_leaves_no_data_juicer_running(copy, sig):
    """SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C; SIGKILL gives storyc no chance at all, and
    Data-Juicer's process group still dies with it (the watchdog pipe), instead of running on forever."""
    _edit(copy, "max_ratio: 2.0", "max_ratio: 2.5")
    p = _popen(copy)
    assert _wait_for(lambda: (copy.parent / "build/t/data/output").exists() and _dj_pids(copy))
    p.send_signal(getattr(signal, sig))
    out = p.communicate(timeout=120)[0]
    if sig != "SIGKILL":
        assert p.returncode == 130 and "interrupted" in out, out
    assert _wait_for(lambda: not _dj_pids(copy), 30), _dj_pids(copy)


def _dj_pids(spec):
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace")
                cwd = os.readlink(f"/proc/{d}/cwd")
            except OSError:
                continue
            if "process_data" in cmd and cwd.startswith(str(spec.parent)):
                found.append(int(d))
    return found


# ---------------------------------------------------------------- 10/12. hostile names and texts

def test_names_and_texts_cannot_inject(project, cli):
    name = "evil\ntouch PWNED\n.yaml"
    spec = project / name
    spec.write_text("version: 1\nstory: {id: q, title: \"<script>alert(1)</script>\"}\nsubmission: {rules: none, images: 1}\n"
                    "scenes: [{id: a, prompt: \"=HYPERLINK(\\\"http://x\\\")\", seed: 0, caption: \"a|b\"}]\n", "utf-8")
    assert cli("compile", spec)[0] == 0
    for art in ("train/train.sh", "data/data_juicer.yaml"):
        lines = (project / "build/q" / art).read_text("utf-8").splitlines()
        assert not any(ln.startswith("touch PWNED") for ln in lines), art
        assert any("evil\\ntouch PWNED\\n.yaml" in ln for ln in lines)
    r = subprocess.run(["bash", "-n", str(project / "build/q/train/train.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_csv_and_readme_escape_spec_text():
    from storyc.render import csv_cell, markdown_text

    assert csv_cell('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert csv_cell("-1+1") == "'-1+1" and csv_cell("ok") == "ok" and csv_cell(3) == 3
    assert markdown_text("<script>a|b\nc") == "&lt;script&gt;a\\|b c"


def test_compiled_json_is_strict(tmp_path):
    from storyc.render import canonical_json

    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    for spec in sorted((REPO / "specs").glob("*.yaml")):
        from storyc.compiler import compile
        from storyc.spec import load_story

        for rel, text in compile(load_story(spec), tmp_path / spec.stem).artifacts.items():
            if rel.endswith(".json"):
                json.loads(text, parse_constant=lambda c: pytest.fail(f"{rel}: {c}"))


def test_a_very_long_extends_chain_is_a_clear_error(project, cli):
    for i in range(40):
        (project / f"s{i}.yaml").write_text(f"version: 1\nextends: s{i + 1}.yaml\n", "utf-8")
    (project / "s40.yaml").write_text("version: 1\nstory: {id: x}\nsubmission: {rules: none, images: 1}\n"
                                      "scenes: [{id: a, prompt: x, seed: 0}]\n", "utf-8")
    code, _, err = cli("validate", project / "s0.yaml")
    assert code == 1 and "`extends` chain is longer than 32 files" in err and "Traceback" not in err


def test_bom_jsonl_and_dangling_links_and_bombs(project):
    (project / "set").mkdir()
    Image.new("RGB", (64, 64), "red").save(project / "set/a.png")
    (project / "set/data.jsonl").write_bytes("\ufeff".encode() + json.dumps({"text": "t", "image": ["a.png"]}).encode()
                                             + b"\n")
    r = _ingest(project, SPEC_D.replace("{source: folder, path: imgs,", "{source: jsonl, path: set/data.jsonl,"))
    assert r.returncode == 0, r.stdout + r.stderr
    (project / "imgs").mkdir()
    Image.new("RGB", (64, 64), "red").save(project / "imgs/a.png")
    (project / "imgs/gone.png").symlink_to(project / "nowhere.png")  # dangling: skipped like any non-file
    Image.new("L", (8000, 8000)).save(project / "imgs/bomb.png")  # 64 MP, over Pillow's bomb limit once capped
    code = ("import sys, PIL.Image as I; I.MAX_IMAGE_PIXELS = 10_000_000\n"
            "from storyc.cli import main; sys.exit(main(sys.argv[1:]))\n")
    (project / "story.yaml").write_text(SPEC_D, "utf-8")
    r = subprocess.run([sys.executable, "-c", code, "run", "ingest", str(project / "story.yaml")], cwd=project,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ingest skipped bomb.png: DecompressionBombError" in r.stdout
    assert "gone.png" not in r.stdout


def test_score_skips_unreadable_files_and_never_the_storyboard(base, tmp_path, tiny_models):
    sub = tmp_path / "sub"
    shutil.copytree(base.parent / "build/t/submission/t", sub)
    (sub / "images/broken.png").write_bytes(b"not a png")
    r = run_cli("score", sub, "--model", tiny_models / "tiny-aesthetic", "--min", "-1", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    names = [ln.split()[0] for ln in r.stdout.splitlines()
             if ln.strip() and not ln.startswith(("mean", "warning", "style ", "prompt alignment"))]
    assert names == ["01-home.png", "02-concert.png", "03-stage.png"]  # prompts.json names the scene images
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(sub / "images/01-home.png", loose)
    (loose / "broken.png").write_bytes(b"not a png")
    r = run_cli("score", loose, "--model", tiny_models / "tiny-aesthetic", "--min", "-1", timeout=300)
    assert r.returncode == 0 and "warning: skipped broken.png" in r.stdout, r.stdout + r.stderr


def test_failed_bundle_leaves_no_partial_folder(copy, monkeypatch):
    from storyc.stages import bundle

    def full(*a, **k):
        raise OSError(28, "No space left on device", "storyboard.png")

    monkeypatch.setattr(bundle, "storyboard", full)
    _edit(copy, "caption: 舞台}", "caption: 大舞台}")
    from storyc.cli import main

    assert main(["build", str(copy), "-q"]) == 1
    assert not list((copy.parent / "build/t/submission").glob(".*partial"))
    assert (copy.parent / "build/t/submission/t/manifest.json").is_file()  # the previous bundle is intact


# ---------------------------------------------------------------- round 2: resource bounds and silent drops

def test_every_image_type_pillow_reads_is_ingested_and_other_files_are_named(project):
    """.gif, .bmp, .tif, .tiff and .jfif were dropped without a word; a file that is no image is said, by name."""
    (project / "imgs").mkdir()
    for ext, fmt in ((".gif", "GIF"), (".bmp", "BMP"), (".tif", "TIFF"), (".tiff", "TIFF"), (".jfif", "JPEG")):
        Image.new("RGB", (64, 64), (10, 200, 30)).save(project / f"imgs/x{ext}", fmt)
    (project / "imgs/notes.md").write_text("# not an image", "utf-8")
    (project / "imgs/x.txt").write_text("a caption, not a file to report", "utf-8")
    r = _ingest(project)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((project / "build/d/data/input/ingest_report.json").read_text("utf-8"))
    assert rep["records"] == 5
    assert [s["source"] for s in rep["skipped"]] == ["notes.md"] and "not an image type" in rep["skipped"][0]["reason"]
    assert "warning: ingest skipped notes.md: not an image type storyc reads" in r.stdout


def test_pipes_and_devices_are_never_read_as_specs_or_locks(project):
    spec = project / "fifo.yaml"
    os.mkfifo(spec)
    r = run_cli("validate", spec, cwd=project, timeout=30)
    assert r.returncode == 1 and "fifo.yaml is not a regular file (a pipe, a device or a socket)" in r.stderr
    (project / "s.yaml").write_text("version: 1\nstory: {id: s}\nsubmission: {rules: none, images: 1}\n"
                                    "scenes: [{id: a, prompt: x, seed: 0}]\n", "utf-8")
    r = run_cli("status", "s.yaml", "--lock", "/dev/zero", cwd=project, timeout=30)
    assert r.returncode == 1 and "/dev/zero is not a regular file" in r.stderr


def test_an_alias_bomb_in_a_committed_lock_is_refused_not_expanded(project):
    (project / "s.yaml").write_text("version: 1\nstory: {id: s}\nsubmission: {rules: none, images: 1}\n"
                                    "scenes: [{id: a, prompt: x, seed: 0}]\n", "utf-8")
    # a well-formed entry whose params alias a structure that doubles 40 times (saving it would write 2^40 items)
    bomb = "format: 1\nbomb:\n  b0: &b0 [x, x]\n"
    for i in range(1, 41):
        bomb += f"  b{i}: &b{i} [*b{i - 1}, *b{i - 1}]\n"
    bomb += ("stages:\n  ingest:\n    params: {a: *b40}\n    params_hash: h\n    digest: " + "0" * 64
             + "\n    outputs: {}\n")
    (project / "s.lock").write_text(bomb, "utf-8")
    r = run_cli("status", "s.yaml", cwd=project, timeout=60)
    assert r.returncode == 0 and "s.lock is not valid YAML" in r.stdout and "every stage is rechecked" in r.stdout


def test_a_long_caption_fits_in_log_time():
    """Fitting a caption to its cell measured it once per dropped character (quadratic): now by bisection."""
    import time

    from PIL import Image as PILImage
    from PIL import ImageDraw

    from storyc.stages.bundle import _fit, cjk_font

    font, _ = cjk_font(16)
    draw = ImageDraw.Draw(PILImage.new("RGB", (10, 10)))
    calls = []
    real = draw.textlength
    draw.textlength = lambda text, font=None: calls.append(1) or real(text, font=font)
    t = time.perf_counter()
    out = _fit(draw, "紫发女孩在舞台上唱歌\n第二行" * 2000, font, 200)
    assert out.endswith("…") and "\n" not in out and real(out, font=font) <= 200
    assert len(calls) < 40 and time.perf_counter() - t < 5  # ~log2(34000) measurements


def test_disk_full_while_writing_names_the_file_not_its_temporary(tmp_path, monkeypatch):
    from storyc.render import atomic_write
    from storyc.runner import explain

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "scores/01-home.json", "{}")
    assert e.value.filename == str(tmp_path / "scores/01-home.json")
    assert explain(e.value, "score").message == f"stage score: no space left on the device writing {e.value.filename}"
    assert not list((tmp_path / "scores").iterdir())  # no temporary left behind
