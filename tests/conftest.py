import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CPU thread per process (set before torch is imported; every storyc the tests start inherits it). With two
# xdist workers on two cores, torch's default of one thread per core put 4+ threads on 2 cores, and the tiny
# models' ops are too small to gain from threads: test_build.py + test_train.py took 366 s, 168 s with this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The fast tier (`python -m pytest -m "not slow"`): everything but the tests that build with the real models.
# A test is slow when it uses a built project or the tiny models, or says so with @pytest.mark.slow.
SLOW_FIXTURES = {"tiny_models", "base", "copy", "built", "trained", "filtered"}


# The longest tests (0.5-1.6 min each on 2 cores, 2026-12-02), run first: collected last (test_sweep.py,
# test_train.py), one of them would keep one xdist worker busy for minutes after the other ran out of work.
LONGEST = ("test_sweep.py::test_sweep_runs_variants_as_ray_tune_trials_and_resumes",
           "test_sweep.py::test_a_sweep_on_a_two_node_ray_cluster_trains_once",
           "test_data_stages.py::test_ray_executor",
           "test_sweep.py::test_a_killed_sweep_resumes_without_redoing_finished_trials",
           "test_properties.py::test_every_generated_spec_is_rejected_clearly_or_compiles",
           "test_properties.py::test_a_sample_of_valid_specs_builds_without_internal_errors",
           "test_train.py::test_ddp_on_two_processes_equals_one_process_at_the_global_batch",
           "test_train.py::test_resume_with_ema_and_previews_matches_uninterrupted",
           "test_reliability.py::test_concurrent_builds_refuse_wait_and_take_over_stale_locks")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda it: rank.get(it.nodeid.split("/")[-1], len(rank)))  # stable: the rest keep their order


# Commands that run stages (torch, diffsynth, transformers: ~8 s of imports a process on 2 cores) run in this test
# process through the same entry point, `storyc.cli.main`, unless a test sets environment variables for them (or
# STORYC_TEST_SUBPROCESS=1 asks for every command in its own process). The light commands always run as a user
# runs them, in a process of their own: that is what proves they stay light.
IN_PROCESS = {"build", "run", "score"}


def run_cli(*args, cwd=None, env=None, timeout=600, subprocess_=False):
    """Run the real CLI (as a user would); return CompletedProcess with text output."""
    if args and args[0] in IN_PROCESS and env is None and not subprocess_ and \
            os.environ.get("STORYC_TEST_SUBPROCESS") != "1":
        return _in_process([str(a) for a in args], cwd or REPO)
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "storyc", *map(str, args)], cwd=cwd or REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def _in_process(argv, cwd):
    import contextlib
    import io

    import storyc.cache
    from storyc.cli import main

    storyc.cache._verified.clear()  # a new process would verify the cache's bytes afresh: so does this run
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["storyc", *argv], code, out.getvalue(), err.getvalue())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium_render(html, tmp, no_system_fonts=False):
    """Open a page in headless Chromium (as a user's browser would): its screenshot (RGB array) and its DOM.
    ``no_system_fonts``: as on a machine without fonts (an empty fontconfig): only the page's own fonts render."""
    import numpy as np
    from PIL import Image

    env = dict(os.environ)
    tmp.mkdir(parents=True, exist_ok=True)
    if no_system_fonts:
        conf = tmp / "fonts.conf"
        conf.write_text(f"<?xml version='1.0'?><fontconfig><dir>{tmp / 'no-fonts'}</dir>"
                        f"<cachedir>{tmp / 'fc-cache'}</cachedir></fontconfig>", "utf-8")
        env["FONTCONFIG_FILE"] = str(conf)
    shot = tmp / f"{html.stem}-shot.png"
    # --disable-dev-shm-usage: in a container /dev/shm is small and shared with the tests' torch data loaders; a
    # renderer that cannot map it draws nothing (CI once shot three all-white pages in a row)
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage", "--run-all-compositor-stages-before-draw"]  # its web font drawn
    for attempt in range(4):  # on a loaded machine headless Chromium now and then shoots before its first paint
        shot.unlink(missing_ok=True)
        r = subprocess.run([*base, f"--virtual-time-budget={10000 * (attempt + 1)}",
                            f"--user-data-dir={tmp / f'profile{attempt}'}", f"--screenshot={shot}",
                            "--window-size=1000,1400", html.as_uri()], capture_output=True, text=True, timeout=180,
                           env=env)
        assert shot.exists(), r.stderr
        if np.asarray(Image.open(shot).convert("L")).min() < 255:  # something was drawn
            break
        time.sleep(2 * (attempt + 1))
    else:
        raise AssertionError(f"headless Chromium drew a blank page four times; its last stderr:\n{r.stderr[-3000:]}")
    dom = subprocess.run([*base, "--virtual-time-budget=10000", "--dump-dom", f"--user-data-dir={tmp / 'profile2'}", html.as_uri()],
                         capture_output=True, text=True, timeout=120, env=env).stdout
    return np.asarray(Image.open(shot).convert("RGB")).astype(int), dom


def colourful(img) -> float:
    """The share of a screenshot's pixels that are coloured (not text, not background): where pictures drew."""
    return float(((img.max(axis=2) - img.min(axis=2)) > 15).mean())


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process (fast); return (exit code, stdout, stderr)."""
    from storyc.cli import main

    def go(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


@pytest.fixture
def project(tmp_path):
    """An empty project folder (a .storyc marker makes it the project root)."""
    (tmp_path / ".storyc").mkdir()
    return tmp_path


# ---------------------------------------------------------------- projects with tiny models

BASE_SPEC = """\
version: 1
story: {id: t}
models: {kolors: "tiny:kolors", vae: "tiny:sdxl-vae", aesthetic: "tiny:aesthetic"}
dataset: {source: folder, path: data, caption: 二次元}
filters:
  - image_shape_filter: {min_width: 1024, min_height: 1024, any_or_all: any}
  - image_aspect_ratio_filter: {min_ratio: 0.5, max_ratio: 2.0, any_or_all: any}
processing: {workers: 1}
lora: {rank: 4, alpha: 4.0}
train: {epochs: 1, steps_per_epoch: 4, resolution: 64, precision: "32", gradient_checkpointing: false, checkpoint_every: 2}
style: {prefix: "二次元，", negative: 丑陋}
generation: {width: 64, height: 64, steps: 2, cfg_scale: 4.0, batch_size: 8}
submission: {rules: none, images: 3, min_aesthetic: -1.0, lora_formats: [diffsynth]}
scenes:
  - {id: home, prompt: 一个紫色短发小女孩在家, seed: 0, caption: 在家}
  - {id: concert, prompt: 一个紫色短发小女孩在演唱会, seed: 1, caption: 演唱会}
  - {id: stage, prompt: 一个紫色长发少女在舞台上, seed: 2, caption: 舞台}
"""


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The three tiny random-init models, built once per test session."""
    from storyc.models import tiny

    root = tmp_path_factory.mktemp("tiny-models")
    for name in ("kolors", "sdxl-vae", "aesthetic"):
        tiny.ensure(name, root / f"tiny-{name}")
    return root


def write_images(folder, sizes):
    """Flat-colour PNGs of the given sizes (cheap to write, a few kB each)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        im = Image.new("RGB", (w, h), (40 * i % 255, 90, 160))
        ImageDraw.Draw(im).ellipse([w // 4, h // 4, w // 2, h // 2], fill=(200, 30 * i % 255, 90))
        im.save(folder / f"img{i:02d}.png")


def make_project(root, tiny_models, spec=BASE_SPEC, sizes=((1024, 1024), (1100, 1024), (512, 512))):
    root.mkdir(parents=True, exist_ok=True)
    (root / ".storyc" / "models").mkdir(parents=True, exist_ok=True)
    for d in tiny_models.iterdir():
        link = root / ".storyc" / "models" / d.name
        if not link.exists():
            link.symlink_to(d)
    write_images(root / "data", sizes)
    (root / "story.yaml").write_text(spec, "utf-8")
    return root / "story.yaml"


def copy_project(spec, root):
    """A copy of a project (as a clone would be) with what it has built so far; returns the copy's spec."""
    import shutil

    shutil.copytree(spec.parent, root, symlinks=True)
    return root / spec.name


def build_report(spec) -> dict:
    import json

    from storyc.spec import load_story

    story = load_story(spec)
    return json.loads((story.root / "build" / story.id / "build_report.json").read_text("utf-8"))["stages"]


def ran(spec) -> set:
    return {k for k, v in build_report(spec).items() if v == "ran"}


# One scene per UNet batch: an image's bytes then never depend on which other scenes were stale with it
# (across batch sizes images agree only to float tolerance, see test_generate), so locks compare byte for byte.
SPEC1 = BASE_SPEC.replace("batch_size: 8}", "batch_size: 1}")


@pytest.fixture(scope="session")
def base(tmp_path_factory, tiny_models):
    """SPEC1 built once for the session, in a subprocess as the interruption tests' builds are; read-only."""
    spec = make_project(tmp_path_factory.mktemp("base") / "p", tiny_models, SPEC1)
    r = run_cli("build", spec, "-q", cwd=spec.parent, subprocess_=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(build_report(spec).values()) == {"ran"}
    return spec


@pytest.fixture
def copy(base, tmp_path):
    """A private copy of the built base project, to edit and rebuild."""
    return copy_project(base, tmp_path / "p")


def edit(spec, old, new):
    text = spec.read_text("utf-8")
    assert old in text, old
    spec.write_text(text.replace(old, new), "utf-8")


# The data-stage spec: a folder of images, one scene (ingest/filter tests never train)
DATA_SPEC = """\
version: 1
story: {id: d}
dataset: {source: folder, path: imgs, caption: 二次元}
processing: {workers: 1}
submission: {rules: none, images: 1}
scenes: [{id: a, prompt: x, seed: 0}]
"""


@pytest.fixture(scope="session")
def built(tmp_path_factory, tiny_models):
    """A project built end to end with a team, every LoRA format and lora_scale 0.5 (read-only: copy to edit)."""
    spec = make_project(tmp_path_factory.mktemp("gen"), tiny_models,
                        BASE_SPEC.replace("lora_formats: [diffsynth]", "lora_formats: [diffsynth, kohya, diffusers]")
                        .replace("story: {id: t}", "story: {id: t, team: 测试队, title: 紫发女孩}")
                        .replace("negative: 丑陋}", "negative: 丑陋}\ngeneration: {width: 64, height: 64, steps: 2, "
                                 "cfg_scale: 4.0, batch_size: 8, lora_scale: 0.5}").replace(
                            "generation: {width: 64, height: 64, steps: 2, cfg_scale: 4.0, batch_size: 8}\n", ""))
    from storyc.cli import main

    assert main(["build", str(spec), "-q"]) == 0
    return spec
