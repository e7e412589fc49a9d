"""`storyc watch`: a save rebuilds what it changed through the same runner, with the models held in memory, and
the outputs are byte-identical to a cold build's; a no-op save builds nothing; a spec error is shown and the last
good storyboard stays; a save never retrains unless --train; the live page is loopback-only, read-only and serves
the build folder alone."""
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from conftest import edit, run_cli


class Watch:
    def __init__(self, spec, *extra):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "storyc", "watch", str(spec), "--port", "0", "--interval",
                                      "0.2", *extra], cwd=spec.parent, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        first = self.proc.stdout.readline()
        assert "storyc watch: http://127.0.0.1:" in first, first
        self.url = first.split()[2]
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "state", timeout=10) as r:
            return json.loads(r.read())

    def wait(self, build: int, timeout=240) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.state()
            if s["build"] >= build and s["phase"] != "building":
                return s
            assert self.proc.poll() is None, self.proc.stdout.read()
            time.sleep(0.2)
        raise AssertionError(f"no build {build} in {timeout}s: {self.state()}")

    def get(self, path, method="GET"):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request(method, path)
        r = c.getresponse()
        return r.status, r.read()

    def stop(self):
        self.proc.terminate()
        try:
            return self.proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()[0]


def _page_shot(url, png, wait_ms):
    """Headless Chromium on the live page (its event stream never ends, so no virtual-time budget: --timeout takes
    the picture at the page's load event, which ``?hold=`` keeps back: ``wait_ms``, or "next" for until the next
    build is shown). Returns the running process; its picture is ``png``."""
    from conftest import CHROMIUM

    return subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--disable-background-networking", f"--user-data-dir={png.with_suffix('')}-profile",
                             f"--screenshot={png}", "--window-size=1000,1400", f"{url}?hold={wait_ms}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _pixels(png):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def _outputs(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "build/t").rglob("*"))
            if p.is_file() and p.suffix in (".png", ".json", ".csv", ".txt", ".md", ".safetensors", ".html")
            and p.name not in ("build_report.json", "build_times.json")}


@pytest.fixture
def watched(copy):
    w = Watch(copy)
    yield copy, w
    w.stop()


def test_a_save_rebuilds_its_scene_and_an_undo_gives_the_cold_build_back(watched, tmp_path):
    spec, w = watched
    root = spec.parent
    s = w.wait(1)
    assert s["ran"] == {} and s["storyboard"] == "submission/t/storyboard.png" and len(s["scenes"]) == 3
    cold = _outputs(root)

    # the page: loopback only, read-only, the build folder and nothing else
    code, page = w.get("/")
    assert code == 200 and b"new EventSource('events')" in page
    code, board = w.get("/build/submission/t/storyboard.png")
    assert code == 200 and board == (root / "build/t/submission/t/storyboard.png").read_bytes()
    (root / "build/t/escape.png").symlink_to(root / "story.yaml")
    for bad in ("/build/../story.yaml", "/build/%2e%2e/story.yaml", "/build/submission/t/../../../../story.yaml",
                "/build/escape.png", "/build//etc/passwd", "/build/nothing.png", "/story.yaml"):
        assert w.get(bad)[0] == 404, bad
    (root / "build/t/escape.png").unlink()
    assert w.get("/state", "POST")[0] == 405 and w.get("/build/plan.json", "DELETE")[0] == 405

    # the live stream: an event for every change
    events = urllib.request.urlopen(w.url + "events", timeout=60)
    assert json.loads(events.readline().decode().removeprefix("data: "))["build"] == 1

    # the page in a browser: an edit on disk redraws it through the event stream, without a reload
    from conftest import CHROMIUM

    live = None
    if CHROMIUM:
        _page_shot(w.url, tmp_path / "before.png", 3000).wait(60)
        live = _page_shot(w.url, tmp_path / "live.png", "next")  # shoots once the next build is on the page
        end = time.monotonic() + 90
        while not w.state()["holding"] and time.monotonic() < end:  # the page is loaded, its load event held
            time.sleep(0.1)
        assert w.state()["holding"] == 1
    edit(spec, "seed: 0, caption: 在家", "seed: 7, caption: 在家")
    s = w.wait(2)
    if live is not None:
        live.wait(150)
        _page_shot(w.url, tmp_path / "fresh.png", 3000).wait(60)
        before, after, fresh = (_pixels(tmp_path / f"{n}.png") for n in ("before", "live", "fresh"))
        assert (after == fresh).all(), "the live page differs from the same state loaded afresh"
        assert (after != before).any()
    assert set(s["ran"]) == {"generate[home]", "score[home]", "bundle"}, s
    assert s["ran"]["generate[home]"] == "scenes[0]: seeds changed" and s["scenes"][0]["seed"] == 7
    seen = []
    while not seen or seen[-1]["build"] < 2 or seen[-1]["phase"] == "building":
        line = events.readline().decode()
        if line.startswith("data: "):
            seen.append(json.loads(line[6:]))
    assert [e["phase"] for e in seen][-1] == "built" and "building" in [e["phase"] for e in seen]
    events.close()
    new = (root / "build/t/images/01-home.png").read_bytes()
    assert new != cold["build/t/images/01-home.png"]

    # undo: every output is the cold build's again, byte for byte (models held, not reloaded)
    edit(spec, "seed: 7, caption: 在家", "seed: 0, caption: 在家")
    s = w.wait(s["build"] + 1)
    assert _outputs(root) == cold
    times = json.loads((root / "build/t/build_times.json").read_text("utf-8"))["metrics"]
    assert times["generate.unet_vae_load_and_merge_s"] < 0.5  # the merged pipeline was held since build 2

    # a save that changes nothing builds nothing
    spec.write_text(spec.read_text("utf-8"), "utf-8")
    time.sleep(1.5)
    assert w.state()["build"] == s["build"]

    # a spec error: said with its line, the last good storyboard stays
    edit(spec, "seed: 0, caption: 在家", "seed: -1, caption: 在家")
    s = w.wait(s["build"] + 1)
    assert "story.yaml:" in s["error"] and "$.scenes[0].seed" in s["error"]
    assert s["storyboard"] == "submission/t/storyboard.png" and w.get("/build/submission/t/storyboard.png")[0] == 200

    edit(spec, "seed: -1, caption: 在家", "seed: 0, caption: 在家")
    s = w.wait(s["build"] + 1)
    assert s["error"] is None and s["ran"] == {}

    # a save during a build stops it (finished stages kept) and builds the new state
    edit(spec, "seed: 2, caption: 舞台", "seed: 11, caption: 舞台")
    end = time.monotonic() + 120
    while w.state()["phase"] != "building" and time.monotonic() < end:
        time.sleep(0.05)
    edit(spec, "seed: 11, caption: 舞台", "seed: 12, caption: 舞台")
    end = time.monotonic() + 240
    while not (s := w.state())["scenes"][2]["seed"] == 12 and time.monotonic() < end:
        time.sleep(0.2)
    assert s["scenes"][2]["seed"] == 12 and s["phase"] == "built", s
    r = run_cli("status", spec, cwd=root)
    assert "everything up to date" in r.stdout, r.stdout

    # a save that makes the LoRA stale never retrains without --train
    edit(spec, "lora: {rank: 4", "lora: {rank: 8")
    s = w.wait(s["build"] + 1)
    assert "LoRA stale" in s["note"] and "storyc build" in s["note"]
    out = w.stop()
    assert "Traceback" not in out
    lock = yaml.safe_load((root / "story.lock").read_text("utf-8"))["stages"]
    assert lock["train"]["params"]["lora"]["rank"] == 4

