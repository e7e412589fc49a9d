"""Sweeps in the spec language: validation with file:line, deterministic variants, shared trainings."""
import os

from conftest import REPO, run_cli

SWEEP = """\
sweep:
  parameters:
    generation.cfg_scale: [3.5, 5.0]
    style.prefix: ["二次元，", "日系动漫，"]
  scenes:
    wishing-star: [{seed: 101}, {seed: 102}]
  objective: {weights: {mean_aesthetic: 1.0, style_coherence: 2.0}}
"""


def _sweep_spec(project, text=SWEEP, base="specs/demo.yaml"):
    """A sweep file beside a copy of the shipped specs: it extends the demo story."""
    import shutil

    shutil.copytree(REPO / "specs", project / "specs", dirs_exist_ok=True)
    spec = project / "specs" / "sweep.yaml"
    spec.write_text(f"version: 1\nextends: {base.split('/')[-1]}\n" + text, "utf-8")
    return spec


def test_variants_are_expanded_deterministically_and_share_trainings(project):
    from storyc.sweep import load_sweep

    spec = _sweep_spec(project)
    a, b = load_sweep(spec), load_sweep(spec)
    assert len(a.variants) == 8 and [v.id for v in a.variants] == [v.id for v in b.variants]
    assert len({v.id for v in a.variants}) == 8
    # cfg, prefix and a scene's seed are generation settings: all 8 variants share one training
    assert a.trainings == 1
    v = a.variants[-1]
    assert v.overrides == {"generation.cfg_scale": 5.0, "style.prefix": "日系动漫，", "scenes[wishing-star]": {"seed": 102}}
    assert v.story.spec.generation.cfg_scale == 5.0
    assert [s.seed for s in v.story.scenes if s.id == "wishing-star"] == [102]
    assert a.objective == {"mean_aesthetic": 1.0, "style_coherence": 2.0}


def test_training_parameters_need_their_own_trainings(project):
    from storyc.sweep import load_sweep

    spec = _sweep_spec(project, "sweep:\n  parameters:\n    lora.rank: [4, 8]\n    generation.cfg_scale: [3, 4, 5]\n")
    sw = load_sweep(spec)
    assert len(sw.variants) == 6 and sw.trainings == 2
    rnd = _sweep_spec(project, "sweep:\n  method: random\n  samples: 3\n  seed: 5\n  parameters:\n"
                      "    generation.cfg_scale: [3, 4, 5, 6]\n    generation.steps: [20, 30]\n")
    first, again = load_sweep(rnd), load_sweep(rnd)
    assert len(first.variants) == 3 and [v.id for v in first.variants] == [v.id for v in again.variants]


def test_sweep_errors_name_the_sweep_line(project):
    spec = _sweep_spec(project, """\
sweep:
  parameters:
    generation.cfg_scal: [3, 4]
    generation.steps: [20, 0]
  scenes:
    wishng-star: [{seed: 1}]
  objective: mean_aesthetc
""")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    err = r.stderr
    assert "sweep.yaml:5:5: $.sweep.parameters['generation.cfg_scal']: `generation.cfg_scal`: the spec has no `cfg_scal` under `generation`" in err
    assert "did you mean `cfg_scale`?" in err
    assert "sweep.yaml:8:5: $.sweep.scenes.wishng-star: no scene `wishng-star`" in err and "`wishing-star`" in err
    assert "sweep.yaml:9:14: $.sweep.objective: `mean_aesthetc` is not one of" in err


def test_a_bad_value_is_reported_at_its_sweep_line(project):
    spec = _sweep_spec(project, "sweep:\n  parameters:\n    generation.steps: [20, 0]\n")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1
    assert "sweep.yaml:5:28: $.generation.steps: must be at least 1, got 0 (in the variant generation.steps = 0)" in r.stderr


def test_plan_lists_variants_and_trainings(project):
    spec = _sweep_spec(project, "sweep:\n  parameters:\n    lora.rank: [4, 8]\n    generation.cfg_scale: [3, 5]\n")
    r = run_cli("plan", spec, cwd=project)
    assert r.returncode == 0, r.stderr
    assert "4 variants, 2 trainings" in r.stdout and "v-" in r.stdout
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 0 and "sweep of 4 variants, 2 trainings" in r.stdout


def test_sweep_runs_variants_as_ray_tune_trials_and_resumes(base, tmp_path):
    """2 variants that differ only in a generation setting, 2 trials at once: one training, both bundles."""
    import json

    from conftest import copy_project

    spec = copy_project(base, tmp_path / "p")
    sweep = spec.parent / "sweep.yaml"
    sweep.write_text("version: 1\nextends: story.yaml  # the story under test\n# which guidance suits it?\n"
                     "sweep:\n  parameters:\n    lora.rank: [2]\n    generation.cfg_scale: [4.0, 5.0]\n", "utf-8")
    r = run_cli("sweep", sweep, "--concurrent", "2", "-q", cwd=spec.parent, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Token authentication" not in r.stdout + r.stderr  # Ray's notice about the mode it picked
    folder = spec.parent / "build/t/sweeps/sweep"
    rows = json.loads((folder / "results.json").read_text("utf-8"))["variants"]
    assert [row["state"] for row in rows] == ["done", "done"]
    assert sum(row["trained"] for row in rows) == 1  # the second variant reused the first one's LoRA
    assert all(row["valid"] for row in rows)
    for row in rows:  # Data-Juicer ran once, before the trials; each trial linked its result in
        vb = folder / row["variant"] / "build"
        assert not {"ingest", "filter"} & set(json.loads((vb / "build_times.json").read_text("utf-8"))["stages"])
        assert sorted(p.name for p in (vb / "data/train").iterdir()) == \
            sorted(p.name for p in next((folder / "data").iterdir()).joinpath("build/data/train").iterdir())
    assert len(list((folder / "data").iterdir())) == 1
    html = (folder / "compare.html").read_text("utf-8")
    assert html.count("data:image/png;base64,") == 2
    from conftest import CHROMIUM, chromium_render, colourful

    if CHROMIUM:  # .ci/run installs it; the page as a browser shows it: both boards drawn, best first
        img, dom = chromium_render(folder / "compare.html", tmp_path)
        assert colourful(img) > 0.03, colourful(img)
        ids = [row["variant"] for row in rows]
        assert dom.count("<img ") == 2 and dom.index(f"id=\"{ids[0]}\"") < dom.index(f"id=\"{ids[1]}\"")
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("v-*/result.json")}
    r = run_cli("sweep", sweep, "-q", cwd=spec.parent, timeout=600)  # again: every trial is up to date
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in folder.glob("v-*/result.json")} == stamps
    r = run_cli("sweep", "show", sweep, cwd=spec.parent)
    assert r.returncode == 0 and "cache hit" in r.stdout and "trained" in r.stdout

    # apply the cfg 5.0 variant: an ordinary story (comments kept) that builds to that variant's lock
    import yaml

    winner = next(row["variant"] for row in rows if row["values"]["generation.cfg_scale"] == 5.0)
    r = run_cli("sweep", "apply", sweep, winner, cwd=spec.parent)
    assert r.returncode == 0, r.stderr
    text = sweep.read_text("utf-8")
    assert "# the story under test" in text and "# which guidance suits it?" in text
    assert yaml.safe_load(text)["generation"]["cfg_scale"] == 5.0 and yaml.safe_load(text)["lora"]["rank"] == 2
    # one CPU thread, as Ray gives a 1-CPU trial: on CPU, float reductions (and so PNG bytes) follow the thread count
    r = run_cli("build", sweep, "-q", cwd=spec.parent, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "build/t/ is the build folder of story.yaml" in r.stderr  # the same story.id
    r = run_cli("build", sweep, "-q", "-o", "applied", cwd=spec.parent, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    ours = yaml.safe_load((spec.parent / "sweep.lock").read_text("utf-8"))["stages"]
    theirs = yaml.safe_load((folder / winner / "story.lock").read_text("utf-8"))["stages"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name]["params_hash"] == theirs[name]["params_hash"], name
        # the model card (and so the manifest) names the spec and lock it was built from: sweep.yaml here, the
        # trial's own variant file there; every other byte is the variant's
        card = ("/README.md", "/manifest.json")
        assert {k: v["sha256"] for k, v in ours[name]["outputs"].items() if not k.endswith(card)} == \
            {k: v["sha256"] for k, v in theirs[name]["outputs"].items() if not k.endswith(card)}, name
    readme = next((spec.parent / "applied").rglob("submission/t/README.md")).read_text("utf-8")
    assert "storyc build sweep.yaml" in readme

    # as honest as a build: a raised gate reruns the bundles (now INVALID), a new grid value runs, nothing else
    sweep.write_text(sweep.read_text("utf-8").replace("[4.0, 5.0]", "[4.0, 5.0, 6.0]")
                     + "submission: {min_aesthetic: 100}\n", "utf-8")
    r = run_cli("sweep", sweep, "--concurrent", "2", "-q", cwd=spec.parent, timeout=600)
    assert r.returncode == 3 and "no variant is a valid submission" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    rows3 = json.loads((folder / "results.json").read_text("utf-8"))["variants"]
    assert len(rows3) == 3 and not any(row["valid"] for row in rows3)
    assert {row["variant"]: row["stages_ran"] for row in rows3 if row["variant"] in stamps_ids(stamps)} == \
        {v: 1 for v in stamps_ids(stamps)}  # only the bundle reran in the two earlier variants
    assert sum(row["trained"] for row in rows3) == 1  # the new value took the cached LoRA


def stamps_ids(stamps: dict) -> set:
    return {p.parent.name for p in stamps}


def test_a_killed_sweep_resumes_without_redoing_finished_trials(base, tmp_path):
    """SIGKILL the whole sweep (driver, Ray and its workers) after the first trial finished; `storyc sweep` again
    finishes the rest and leaves the finished trial's build and result alone."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import copy_project

    spec = copy_project(base, tmp_path / "p")
    sweep = spec.parent / "sweep.yaml"
    sweep.write_text("version: 1\nextends: story.yaml\n"
                     "sweep:\n  parameters:\n    lora.rank: [2]\n    generation.cfg_scale: [3.0, 6.0]\n", "utf-8")
    folder = spec.parent / "build/t/sweeps/sweep"
    cache = tmp_path / "shared-cache"  # as a cluster's trials would share it
    proc = subprocess.Popen([sys.executable, "-m", "storyc", "sweep", str(sweep), "--concurrent", "1", "-q",
                             "--cache", str(cache)],
                            cwd=spec.parent, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 400
    while not list(folder.glob("v-*/result.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    done = list(folder.glob("v-*/result.json"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(done) == 1, "the first trial did not finish before the deadline"
    first = done[0]
    stamp = first.stat().st_mtime_ns
    lock_stamp = (first.parent / "story.lock").stat().st_mtime_ns
    assert not (folder / "results.json").exists()  # killed before the sweep's end

    r = run_cli("sweep", sweep, "-q", "--cache", cache, cwd=spec.parent, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((folder / "results.json").read_text("utf-8"))["variants"]
    assert [row["state"] for row in rows] == ["done"] * 2
    assert len([e for e in (cache / "train").iterdir() if e.is_dir()]) == 1  # the one LoRA, in the given cache
    assert first.stat().st_mtime_ns == stamp and (first.parent / "story.lock").stat().st_mtime_ns == lock_stamp
    assert sum(row["trained"] for row in rows) == 1  # one LoRA for both, trained before the kill


def test_a_sweep_on_a_two_node_ray_cluster_trains_once(base, tmp_path):
    """A Ray cluster of two nodes on loopback (a head and a second node, one CPU each, as `ray start` makes them
    on two machines) sharing one --cache: the two variants' trials run one on each node, and the LoRA they share
    is trained once (the second node waits on the cache entry, or takes it)."""
    import json
    import secrets
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    from conftest import copy_project

    spec = copy_project(base, tmp_path / "p")
    sweep = spec.parent / "sweep.yaml"
    sweep.write_text("version: 1\nextends: story.yaml\n"
                     "sweep:\n  parameters:\n    lora.rank: [2]\n    generation.cfg_scale: [3.0, 6.0]\n", "utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address=127.0.0.1",
           "--num-cpus=1", "--disable-usage-stats"]
    head = subprocess.Popen([*ray, "--head", f"--port={port}", "--include-dashboard=false",
                             f"--temp-dir={tempfile.mkdtemp(prefix='ray-')}"],  # short: socket paths fit 107 B
                            env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = [head]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        nodes.append(subprocess.Popen([*ray, f"--address=127.0.0.1:{port}"], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        probe = ("import ray, time; ray.init(address='127.0.0.1:%d', log_to_driver=False)\n"
                 "t = time.time()\nwhile len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() - t < 120:"
                 " time.sleep(0.5)\nprint(len([n for n in ray.nodes() if n['Alive']]))" % port)
        assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                              timeout=180).stdout.strip().endswith("2")
        cache = tmp_path / "shared-cache"
        r = run_cli("sweep", sweep, "--address", f"127.0.0.1:{port}", "--concurrent", "2", "--cache", cache, "-q",
                    cwd=spec.parent, env={k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        for n in nodes:  # `ray start --block` ends what it started on SIGTERM: never `ray stop`
            os.killpg(n.pid, signal.SIGTERM)
        for n in nodes:
            n.wait(timeout=120)
    rows = json.loads((spec.parent / "build/t/sweeps/sweep/results.json").read_text("utf-8"))["variants"]
    assert [row["state"] for row in rows] == ["done", "done"]
    assert len({json.loads((spec.parent / "build/t/sweeps/sweep" / row["variant"] / "result.json")
                           .read_text("utf-8"))["node"] for row in rows}) == 2  # one trial on each node
    assert sum(row["trained"] for row in rows) == 1
    assert len([e for e in (cache / "train").iterdir() if e.is_dir()]) == 1
