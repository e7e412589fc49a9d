"""The scheduler and the runner against fake executors (the fast tier): what runs, in what order, why, what is
recorded, what a failure keeps, what status and a dry run say. Every build here is in-process and takes
milliseconds: the executors write small files instead of training or rendering. A kind added in a test is one
declaration and one executor, as the registry promises."""
import json
from dataclasses import replace

import pytest

from conftest import run_cli

SPEC = """\
version: 1
story: {id: f}
models: {kolors: m/kolors, vae: m/vae, aesthetic: m/aesthetic}
dataset: {source: folder, path: imgs}
submission: {rules: none, images: 2, min_aesthetic: 5.0}
scenes:
  - {id: a, prompt: 一个女孩, seed: 0}
  - {id: b, prompt: 两个女孩, seed: 1}
"""


@pytest.fixture
def proj(project):
    for m, files in (("kolors", ["text_encoder/config.json", "text_encoder/w.bin",
                                 "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]),
                     ("vae", ["diffusion_pytorch_model.safetensors"]),
                     ("aesthetic", ["config.json", "preprocessor_config.json"])):
        for f in files:  # the files a model folder must have (their bytes are never read here)
            (project / "m" / m / f).parent.mkdir(parents=True, exist_ok=True)
            (project / "m" / m / f).write_bytes(f.encode())
    (project / "imgs").mkdir()
    (project / "imgs/x.png").write_bytes(b"png")
    (project / "story.yaml").write_text(SPEC, "utf-8")
    return project / "story.yaml"


class Fakes:
    """Executors that write a file per stage derived from its params (and the data a filter keeps), and count
    their calls. ``score`` writes the score file the bundle's verdict reads."""

    def __init__(self, score=7.0, fail=None, kept="all", during=None):
        self.calls, self.score, self.fail, self.kept = [], score, fail, kept
        self.during = during or {}  # kind -> what happens while it runs (an edit by the user, say)

    def __call__(self, kind):
        def run(ctx, jobs):
            from storyc.render import atomic_write, canonical_json
            from storyc.stages.registry import Result

            self.calls.append((kind, [j.name for j in jobs]))
            if kind in self.during:
                self.during[kind](ctx)
            for j in jobs:
                if self.fail == j.name:
                    raise (self.fail_with if hasattr(self, "fail_with") else RuntimeError("boom"))
                if kind == "score":
                    rel = f"scores/{j.scene}.json"
                    atomic_write(ctx.path(rel), canonical_json({"score": self.score}))
                else:
                    rel = f"{kind}/{j.name}.txt"
                    body = self.kept if kind == "filter" else json.dumps(j.params, sort_keys=True, ensure_ascii=False)
                    atomic_write(ctx.path(rel), body)
                yield Result(j.name, [rel], {"fake": True})
            return f"{len(jobs)} fake"
        return run


def build(spec, fakes, **opts):
    from storyc.compiler import compile
    from storyc.options import RunOptions
    from storyc.runner import execute
    from storyc.spec import load_story

    plan = compile(load_story(spec))
    return execute(plan, RunOptions(quiet=True, live=False, **opts), executors=fakes)


def ran(res):
    return sorted(res.ran)


def test_a_fresh_build_runs_every_stage_in_order_then_nothing(proj):
    f = Fakes()
    res = build(proj, f)
    assert res.exit_code == 0 and not res.failures
    assert [k for k, _ in f.calls] == ["ingest", "filter", "train", "generate", "score", "bundle"]
    assert dict(f.calls)["generate"] == ["generate[a]", "generate[b]"]  # one executor call for every scene
    assert res.verdict_lines[0].startswith("submission VALID by its own gate (submission.rules: none: not a "
                                           "competition entry, whose gate is a mean of 6): mean aesthetic 7.000 >= 5")
    f2 = Fakes()
    res = build(proj, f2)
    assert f2.calls == [] and set(res.states.values()) == {"up to date"}


def test_a_prompt_edit_reruns_that_scene_and_what_reads_it(proj):
    build(proj, Fakes())
    proj.write_text(proj.read_text("utf-8").replace("两个女孩", "三个女孩"), "utf-8")
    r = run_cli("status", proj, cwd=proj.parent)
    assert "generate[b]  stale       scenes[1]: prompt changed" in r.stdout
    assert "score[b]     may rerun   if the output of generate[b] changes" in r.stdout
    assert "build folder: build/f/  lock: story.lock" in r.stdout
    f = Fakes()
    res = build(proj, f)
    assert ran(res) == ["bundle", "generate[b]", "score[b]"]  # bundle: its slice holds the prompts
    assert res.states["score[a]"] == "up to date" and res.states["train"] == "up to date"


def test_an_upstream_rerun_with_the_same_output_stops_there(proj):
    """A filter edit that keeps the same images: filter reruns, train only 'may rerun', and does not."""
    build(proj, Fakes())
    proj.write_text(proj.read_text("utf-8") + "filters: [{image_shape_filter: {min_width: 8}}]\n", "utf-8")
    from storyc.compiler import compile
    from storyc.options import RunOptions
    from storyc.runner import decide
    from storyc.spec import load_story

    d = {x.name: x for x in decide(compile(load_story(proj)), None, RunOptions())}
    assert d["filter"].stale and d["filter"].reasons == ("filters changed",)
    assert d["train"].state == "may rerun" and d["bundle"].state == "may rerun"
    res = build(proj, Fakes())
    assert ran(res) == ["filter"]


def test_forcing_selecting_and_missing_outputs(proj):
    build(proj, Fakes())
    f = Fakes()
    assert ran(build(proj, f, force="train")) == ["train"]  # forced, same output: nothing after it reruns
    res = build(proj, Fakes(), target="generate[a]", force="generate[a]")
    assert ran(res) == ["generate[a]"] and "bundle" not in res.states
    (proj.parent / "build/f/generate/generate[b].txt").unlink()
    (proj.parent / "build/f/train/train.txt").write_text("edited by hand", "utf-8")
    from storyc.compiler import compile
    from storyc.options import RunOptions
    from storyc.runner import decide
    from storyc.spec import load_story

    d = {x.name: x for x in decide(compile(load_story(proj)), None, RunOptions())}
    assert d["generate[b]"].reasons == ("generate/generate[b].txt missing",)
    assert d["train"].reasons == ("train/train.txt was modified",)
    assert ran(build(proj, Fakes())) == ["generate[b]", "train"]


def test_a_failure_keeps_what_finished_and_keep_going_runs_the_rest(proj):
    res = build(proj, Fakes(fail="generate[b]"))
    assert res.exit_code == 2 and res.failures[0].internal  # a RuntimeError in an executor is a storyc bug
    assert "internal error: RuntimeError: boom" in res.failures[0].message
    assert (proj.parent / "build/f/build_error.log").read_text("utf-8").count("boom") >= 1
    assert res.states["generate[a]"] == "ran" and res.states["generate[b]"] == "failed"
    assert res.states["score[a]"] == "skipped"
    lock = (proj.parent / "story.lock").read_text("utf-8")
    assert "generate[a]" in lock and "generate[b]" not in lock  # a's image is recorded: the rerun resumes at b
    f = Fakes(fail="generate[b]")
    f.fail_with = OSError(28, "No space left on device", "x.png")
    res = build(proj, f, keep_going=True)
    assert res.exit_code == 1 and "no space left on the device writing x.png" in res.failures[0].message
    assert res.states["score[a]"] == "ran" and res.states["score[b]"] == "blocked" and res.states["bundle"] == "blocked"
    res = build(proj, Fakes())
    assert ran(res) == ["bundle", "generate[b]", "score[b]"]


def test_the_verdict_is_recomputed_from_the_score_files(proj):
    res = build(proj, Fakes(score=1.0))
    assert res.exit_code == 3 and "mean aesthetic 1.000 < 5 (weakest" in res.verdict_lines[0]
    (proj.parent / "build/f/scores/a.json").write_text('{"score": 99}', "utf-8")  # an edit is not a better score
    from storyc.compiler import compile
    from storyc.options import RunOptions
    from storyc.runner import decide
    from storyc.spec import load_story

    assert {d.name for d in decide(compile(load_story(proj)), None, RunOptions()) if d.stale} == {"score[a]"}


def test_dry_run_and_status_write_nothing(proj):
    build(proj, Fakes())
    proj.write_text(proj.read_text("utf-8").replace("seed: 1", "seed: 5"), "utf-8")
    before = {p: p.read_bytes() for p in proj.parent.rglob("*") if p.is_file()}
    r = run_cli("build", proj, "--dry-run", cwd=proj.parent)
    assert r.returncode == 0, r.stderr
    assert "would run generate[b]: scenes[1]: seeds changed" in r.stdout
    assert "dry run: 1 stage(s) would run, 2 may run if their inputs come out different" in r.stdout
    run_cli("status", proj, cwd=proj.parent)
    assert {p: p.read_bytes() for p in proj.parent.rglob("*") if p.is_file()} == before


def test_a_malformed_or_foreign_lock_entry_is_stale_never_a_crash(proj):
    build(proj, Fakes())
    lock = proj.parent / "story.lock"
    text = lock.read_text("utf-8")
    lock.write_text(text.replace("params_hash:", "params_hash: 7\n    x:", 1), "utf-8")
    res = build(proj, Fakes())
    assert res.exit_code == 0 and ran(res) == ["bundle"]  # the damaged entry (the first: bundle) reran
    lock.write_text("format: 99\n", "utf-8")
    r = run_cli("status", proj, cwd=proj.parent)
    assert r.returncode == 1 and "written by a newer storyc" in r.stderr


def test_a_new_stage_kind_is_one_declaration_and_one_executor(proj, monkeypatch):
    """A throwaway kind `thumb[scene]` after generate: compile, the scheduler, the runner, status and the lock
    all pick it up from its declaration; an edit to one scene reruns that scene's thumb only."""
    from storyc.stages import registry

    def jobs(c):
        return [registry.StageSpec(f"thumb[{s['id']}]", "thumb", {"size": 32, "file": s["file"]},
                                   (f"generate[{s['id']}]",), s["id"]) for s in c.scenes]

    kinds = dict(registry.KINDS)
    kinds["thumb"] = registry.StageKind("thumb", 1, jobs, lambda job, story: (), "tests.no_such_module",
                                        lambda c, js: {"thumbs.json": json.dumps([j.name for j in js])})
    monkeypatch.setattr(registry, "KINDS", kinds)
    for mod in ("storyc.compiler", "storyc.schedule", "storyc.runner"):
        monkeypatch.setattr(f"{mod}.KINDS", kinds, raising=False)
    f = Fakes()
    res = build(proj, f)
    assert res.exit_code == 0 and {"thumb[a]", "thumb[b]"} <= set(res.ran)
    assert ("thumb", ["thumb[a]", "thumb[b]"]) in f.calls
    assert json.loads((proj.parent / "build/f/thumbs.json").read_text("utf-8")) == ["thumb[a]", "thumb[b]"]
    proj.write_text(proj.read_text("utf-8").replace("一个女孩", "一只猫"), "utf-8")
    res = build(proj, Fakes())
    assert ran(res) == ["bundle", "generate[a]", "score[a]", "thumb[a]"]


def test_the_scene_keys_of_a_kind_name_the_scene(proj):
    from storyc.stages.registry import KINDS

    assert KINDS["generate"].scene_keys and not KINDS["bundle"].scene_keys
    assert replace(KINDS["score"], oom_hint="x").oom_hint == "x"  # frozen declarations


def test_a_competition_entry_says_so_in_its_verdict(proj):
    text = proj.read_text("utf-8").replace("images: 2, min_aesthetic: 5.0}", "images: 8}").replace("rules: none, ", "")
    text += "".join(f"  - {{id: s{i}, prompt: 场景{i}, seed: {i + 10}}}\n" for i in range(6))
    proj.write_text(text, "utf-8")
    res = build(proj, Fakes(score=6.5))
    assert res.verdict_lines == ["submission VALID by the competition's rules (8 images, mean >= 6): mean aesthetic "
                                 "6.500 >= 6 -> build/f/submission/f/"]


def test_an_input_edited_while_its_stage_runs_is_not_recorded_as_built(proj):
    """The dataset's fingerprint is taken before ingest runs: an edit made meanwhile leaves ingest stale (it was
    taken after, so status said up to date while the old captions stayed ingested)."""
    def edit(ctx):
        (proj.parent / "imgs/x.txt").write_text("a caption written while ingest ran", "utf-8")

    res = build(proj, Fakes(during={"ingest": edit}))
    assert res.exit_code == 0
    r = run_cli("status", proj, cwd=proj.parent)
    assert "ingest       stale       dataset source changed" in r.stdout, r.stdout
    assert ran(build(proj, Fakes())) == ["ingest"]
