"""`storyc watch SPEC`: rebuild on every save with the models kept in memory, and a live page of the build.

One process: the builds go through the same runner as `storyc build` (same lock, same outputs), with
``storyc.resident`` holding the models between builds. A poller watches the spec, the files it extends, the dataset
folders and the characters' reference images, by content: a save that changes nothing builds nothing. A save during
a build interrupts it (finished stages are kept, as with Ctrl-C) and the next build starts from there. A spec error
is printed (file:line) and shown on the page; the last good storyboard stays up. Training is never started by a save
unless ``--train``: the page says the LoRA is stale instead.

The page (``--port``, 127.0.0.1 only) serves the build folder read-only: GET only, paths resolved inside it, no
symlink or ``..`` escapes. It listens to /events (server-sent events) and redraws without a reload.
"""
from __future__ import annotations

import _thread
import hashlib
import io
import json
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import SpecError, StorycError


class State:
    """What the page shows; every change wakes the /events streams."""

    def __init__(self):
        self.cond = threading.Condition()
        self.version = 0
        self.doc = {"build": 0, "phase": "starting", "error": None, "note": None, "ran": {}, "scenes": [],
                    "storyboard": None, "verdict": [], "log": []}
        self.build_dir: Path | None = None
        self.holding = 0  # pages waiting on ?hold=next (a test's browser)

    def update(self, **kw):
        with self.cond:
            self.doc.update(kw)
            self.version += 1
            self.doc["version"] = self.version
            self.cond.notify_all()

    def snapshot(self) -> tuple[int, str]:
        with self.cond:
            return self.version, json.dumps(self.doc, ensure_ascii=False)

    def wait(self, seen: int, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.version != seen, timeout)


class _Tee(io.TextIOBase):
    """Everything a build prints: to the terminal, and the last lines to the page."""

    def __init__(self, out, lines: deque):
        self.out, self.lines, self.part = out, lines, ""

    def write(self, s):
        self.out.write(s)
        self.part += s.replace("\r", "\n")
        *done, self.part = self.part.split("\n")
        self.lines.extend(x for x in done if x.strip())
        return len(s)

    def flush(self):
        self.out.flush()


# ---------------------------------------------------------------- what is watched

def sources(spec: Path) -> tuple[list[Path], list[Path]]:
    """What a build reads from the project, as the spec names it: (the spec and the files it extends, the dataset
    paths and reference images). Loading the spec validates it (reference images included), so the watcher does
    this only when a spec file changed. On a spec that does not load: the spec file alone."""
    try:
        from .spec import load_story

        story = load_story(spec)
    except (SpecError, StorycError, OSError):
        return [spec], []
    refs = [p for paths in story.character_paths.values() for p in paths]
    masks = [p for p in (*story.mask_paths, *story.caption_paths, story.validation_path) if p is not None]
    return list(story.files), [p for p in story.dataset_paths if p is not None] + masks + refs


def expand(paths: list[Path]) -> list[Path]:
    """Every file under the given files and folders (a dataset folder's images and captions), listed now: an image
    added to a folder is seen without the spec being loaded again."""
    out = []
    for p in paths:
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out


class Snapshot:
    """The content of the watched files, hashed again only when a file's size or mtime moved."""

    def __init__(self):
        self.seen: dict = {}  # path -> (mtime_ns, size, sha256)

    def digest(self, files: list[Path]) -> str:
        h = hashlib.sha256()
        for f in files:
            try:
                st = f.stat()
                old = self.seen.get(f)
                if old is None or old[:2] != (st.st_mtime_ns, st.st_size):
                    old = (st.st_mtime_ns, st.st_size, hashlib.sha256(f.read_bytes()).hexdigest())
                    self.seen[f] = old
                h.update(f"{f}\0{old[2]}\n".encode())
            except OSError:
                h.update(f"{f}\0missing\n".encode())
        return h.hexdigest()


# ---------------------------------------------------------------- the page

PAGE = """<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>storyc watch</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:1em auto}td{border:1px solid #ccc;padding:4px;vertical-align:top}
table{border-collapse:collapse}#error{color:#b00;white-space:pre-wrap}#note{color:#a60}pre{background:#f6f6f6;padding:6px}</style>
</head><body><h1>storyc watch: <span id="title"></span></h1>
<p>build <b id="build">-</b> · <span id="phase">starting</span></p><p id="note"></p><div id="error"></div>
<img id="storyboard" style="max-width:100%" alt="storyboard">
<table id="scenes"></table><h3>Stages that ran</h3><ul id="ran"></ul><p id="verdict"></p><h3>Log</h3><pre id="log"></pre>
<script>
const $ = id => document.getElementById(id);
function esc(s){return String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));}
function show(d){
  $('title').textContent = d.title || ''; $('build').textContent = d.build; $('phase').textContent = d.phase;
  $('note').textContent = d.note || ''; $('error').textContent = d.error || '';
  if (d.storyboard) $('storyboard').src = 'build/' + d.storyboard + '?v=' + d.stamp;
  $('scenes').innerHTML = d.scenes.map(s => `<tr><td><img width="160" src="build/${esc(s.file)}?v=${d.stamp}"></td>
    <td><b>${esc(s.scene)}</b> seed ${esc(s.seed)} · score ${esc(s.score)}<br>${esc(s.prompt)}</td></tr>`).join('');
  $('ran').innerHTML = Object.entries(d.ran).map(([k, v]) => `<li>${esc(k)}: ${esc(v)}</li>`).join('');
  $('verdict').textContent = d.verdict.join(' '); $('log').textContent = d.log.join('\\n');
}
fetch('state').then(r => r.json()).then(show);
new EventSource('events').onmessage = e => show(JSON.parse(e.data));
</script></body></html>
"""


def _handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # the terminal shows the builds, not every request
            pass

        def do_GET(self):  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            path, hold = unquote(url.path), _hold(url.query)
            if path in ("/", "/index.html"):
                page = PAGE if hold is None else PAGE.replace(
                    "<body>", f'<body><img hidden src="hold?hold={hold}&build={state.doc["build"]}">')
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            if path == "/hold" and hold is not None:  # answers late: the page's load event waits for it
                if hold == "next":  # until the build after the one the page was served with is shown, and 3 s more
                    seen = int(parse_qs(url.query).get("build", ["0"])[0] or 0)
                    end = time.monotonic() + 120
                    state.holding += 1
                    try:
                        while time.monotonic() < end and not (state.doc["build"] > seen
                                                              and state.doc["phase"] != "building"):
                            state.wait(state.version, 1.0)
                    finally:
                        state.holding -= 1
                    time.sleep(3)
                else:
                    time.sleep(hold / 1000)
                return self._send(200, PIXEL, "image/gif")
            if path == "/state":
                doc = json.loads(state.snapshot()[1]) | {"holding": state.holding}
                return self._send(200, json.dumps(doc, ensure_ascii=False).encode(), "application/json; charset=utf-8")
            if path == "/events":
                return self._events()
            if path.startswith("/build/") and state.build_dir is not None:
                f = _inside(state.build_dir, path[len("/build/"):])
                if f is not None:
                    kind = {".png": "image/png", ".json": "application/json", ".html": "text/html; charset=utf-8",
                            ".txt": "text/plain; charset=utf-8", ".csv": "text/csv; charset=utf-8"}
                    return self._send(200, f.read_bytes(), kind.get(f.suffix, "application/octet-stream"))
            self._send(404, b"not found", "text/plain")

        def _refuse(self):
            self._send(405, b"read-only", "text/plain")

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

        def _send(self, code, body, kind):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _events(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            seen = -1
            try:
                while True:
                    version, doc = state.snapshot()
                    if version != seen:
                        self.wfile.write(f"data: {doc}\n\n".encode())
                        self.wfile.flush()
                        seen = version
                    state.wait(seen, 15.0)
                    if state.version == seen:  # a comment line keeps proxies and the browser from timing out
                        self.wfile.write(b": idle\n\n")
                        self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


PIXEL = bytes.fromhex("47494638396101000100800000ffffff00000021f90401000000002c00000000010001000002024401003b")


def _hold(query: str):
    """``?hold=MS`` (at most two minutes) or ``?hold=next`` (until the next build is shown, and 3 s more): the page
    keeps its load event back, so a headless browser that takes its picture at load (Chromium's --screenshot) sees
    what the event stream drew meanwhile."""
    v = (parse_qs(query).get("hold") or [""])[0]
    if v == "next":
        return v
    return min(int(v), 120_000) if v.isdigit() else None


def _inside(root: Path, rel: str) -> Path | None:
    """``rel`` resolved inside ``root`` (symlinks followed), a file; None for anything that escapes or is missing."""
    if "\0" in rel:
        return None
    root = root.resolve()
    try:
        f = (root / rel).resolve()
        f.relative_to(root)
    except (ValueError, OSError):
        return None
    return f if f.is_file() else None


def serve(state: State, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------- the loop

class Watcher:
    def __init__(self, spec: Path, opts_of, train: bool, interval: float, state: State, output=None):
        self.output = output
        self.spec, self.opts_of, self.train, self.interval, self.state = spec, opts_of, train, interval, state
        self.snap = Snapshot()
        self.cancel = threading.Event()
        self.lines: deque = deque(maxlen=200)
        self.builds = 0
        self.specs, self.reads, self.specs_key = [spec], [], None  # what the spec reads, as last loaded

    def current(self) -> str:
        """The digest of every watched file. The spec is loaded again (to learn what it reads) only when one of its
        own files changed; the dataset folders are listed on every look."""
        key = self.snap.digest(self.specs)
        if key != self.specs_key:
            self.specs, self.reads = sources(self.spec)
            self.specs_key = self.snap.digest(self.specs)
        return self.snap.digest(self.specs + expand(self.reads))

    def run(self, max_builds: int | None = None) -> int:
        done = None
        while max_builds is None or self.builds < max_builds:
            try:
                now = self.current()
                if now != done:
                    time.sleep(self.interval)  # an editor's save can be several writes: build once they settle
                    if self.current() != now:
                        continue
                    done = now if self._build(now) else done
                    continue
                time.sleep(self.interval)
            except KeyboardInterrupt:
                if not self.cancel.is_set():
                    raise  # the user's Ctrl-C
                self.cancel.clear()  # a save's interrupt that landed after its build: look again
        return 0

    def _poll_during_build(self, started: str, stop: threading.Event):
        while not stop.wait(self.interval):
            if self.current() != started and not stop.is_set():  # a save mid-build: stop it, build the new state
                self.cancel.set()
                _thread.interrupt_main()
                return

    def _build(self, digest: str) -> bool:
        """One build of the spec as it is now; False when a save interrupted it (the loop builds again)."""
        from .compiler import compile
        from .runner import decide
        from .spec import load_story
        from .views import build

        self.builds += 1
        self.lines.clear()
        st = self.state
        try:
            plan = compile(load_story(self.spec), self.output)
        except (SpecError, StorycError) as e:
            text = ("\n".join(f"error: {d.render()}" for d in e.diagnostics) if isinstance(e, SpecError)
                    else f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""))
            print(text, file=sys.stderr, flush=True)
            st.update(build=self.builds, phase="spec error: the last good build is shown", error=text)
            return True
        st.build_dir = plan.build_dir
        opts = self.opts_of(plan)
        decisions = decide(plan, None, opts)
        stale = {d.name: d.reasons for d in decisions if d.stale}
        lora = [d for d in decisions if d.name in ("ingest", "filter", "train") and (d.stale or d.maybe)]
        if lora and not self.train:  # the dataset, the filters or the training changed: only --train retrains
            note = (f"LoRA stale ({lora[0].name}: {'; '.join(lora[0].reasons)}): run `storyc build {self.spec}` (or "
                    "watch with --train); nothing was rebuilt")
            print(note)
            st.update(build=self.builds, phase="waiting for a save", error=None, note=note)
            return True
        st.update(build=self.builds, phase="building", error=None, note=None, ran={})
        stop = threading.Event()
        poller = threading.Thread(target=self._poll_during_build, args=(digest, stop), daemon=True)
        self.cancel.clear()
        poller.start()
        tee = _Tee(sys.stdout, self.lines)
        old, sys.stdout = sys.stdout, tee
        code = None
        try:
            code = build(plan, opts)
        except KeyboardInterrupt:
            if not self.cancel.is_set():
                raise  # the user's Ctrl-C
        finally:
            stop.set()
            sys.stdout = old
            poller.join()
        if self.cancel.is_set():
            print("a save during the build: building again")
            return False
        self._publish(plan, stale, code)
        print(f"watch: build {self.builds} done; waiting for a save", flush=True)
        if code in (0, 3):
            self._warm(plan, opts)
        return True

    def _warm(self, plan, opts) -> None:
        """Load the generation models the next edit needs, once (a build that ran no scene loaded none): the page
        shows the build meanwhile, and a save waits at most for these loads, which its build would pay anyway."""
        from .runner import open_context
        from .stages.generate import warm

        jobs = [j for j in plan.stages.values() if j.kind == "generate"]
        try:
            t = time.monotonic()
            loaded = warm(open_context(plan, opts), jobs)
        except (StorycError, OSError) as e:  # a model missing: the next build says so at its stage
            print(f"watch: models not preloaded ({getattr(e, 'message', e)})", flush=True)
            return
        if loaded:
            print(f"watch: {' and '.join(loaded)} loaded for the next edit in {time.monotonic() - t:.1f}s", flush=True)

    def _publish(self, plan, stale: dict, code: int | None):
        """The page's state from what the build wrote: the storyboard, the scenes, what ran and why."""
        sid = plan.story.id
        sub = plan.build_dir / "submission" / sid
        scenes, verdict = [], []
        try:
            prompts = json.loads((sub / "prompts.json").read_text("utf-8"))["scenes"]
            scores = json.loads((sub / "scores.json").read_text("utf-8"))
            scenes = [{"scene": s["scene"], "seed": s["seed"], "prompt": s["prompt"],
                       "file": f"submission/{sid}/{s['file']}",
                       "score": round(scores["images"].get(s["file"], float("nan")), 3)} for s in prompts]
            verdict = [f"mean aesthetic {scores['mean']:.3f}: {'VALID' if scores['valid'] else 'INVALID'}"]
        except (OSError, ValueError, KeyError):
            pass
        try:
            report = json.loads((plan.build_dir / "build_report.json").read_text("utf-8"))["stages"]
        except (OSError, ValueError, KeyError):
            report = {}
        ran = {n: "; ".join(stale.get(n, ["an upstream output changed"])) for n, s in report.items() if s == "ran"}
        board = f"submission/{sid}/storyboard.png" if (sub / "storyboard.png").is_file() else None
        self.state.update(phase="built" if code == 0 else f"build failed (exit {code})", title=plan.story.title,
                          ran=ran, scenes=scenes, storyboard=board, verdict=verdict, log=list(self.lines),
                          stamp=self.builds)


def warm_imports(train: bool) -> None:
    """The libraries the stages import, imported before the first build: a save interrupts a build by raising
    KeyboardInterrupt in it, and one that lands inside a first import leaves that library half-imported."""
    import importlib

    from .stages._quiet import quiet_libraries, silent_stdout

    quiet_libraries()
    with silent_stdout():
        for name in ("torch", "transformers", "diffsynth", "aesthetics_predictor", "safetensors.torch",
                     *(("peft", "lightning", "data_juicer") if train else ())):
            importlib.import_module(name)


def watch(spec: Path, opts_of, port: int | None, train: bool, interval: float, max_builds: int | None = None,
          output=None) -> int:
    from . import resident

    resident.enable()
    state = State()
    if port is not None:
        server = serve(state, port)
        print(f"storyc watch: http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops)", flush=True)
    w = Watcher(Path(spec), opts_of, train, interval, state, output)
    try:
        state.update(phase="loading libraries")
        warm_imports(train)
        return w.run(max_builds)
    except KeyboardInterrupt:
        print("stopped")
        return 130


__all__ = ["watch", "sources", "expand", "Snapshot", "State"]
