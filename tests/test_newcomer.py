"""What a new user hit in an afternoon (issue 21), each through the CLI: build folders shared by two specs, models
found missing late, exit codes that disagreed with the README, a starter project git would track, scenes that
could not be edited through `extends`, the competition's rules unchecked."""
import pytest

from conftest import run_cli

STORY = """\
version: 1
story: {id: x, team: t}
models: {kolors: models/kolors, vae: models/vae, aesthetic: models/aesthetic}
dataset: {source: folder, path: imgs}
submission: {images: 1, min_aesthetic: -1.0, rules: none}
scenes: [{id: a, prompt: 一个女孩, seed: 0}]
"""


def _project(project, text=STORY):
    (project / "imgs").mkdir(exist_ok=True)
    (project / "imgs/i.png").write_bytes(b"not read here")
    (project / "story.yaml").write_text(text, "utf-8")
    return project / "story.yaml"


def test_two_specs_never_share_a_build_folder(project):
    """A sweep spec that `extends` the story inherits its story.id: building it overwrote the story's build."""
    spec = _project(project)
    (project / "variant.yaml").write_text("version: 1\nextends: story.yaml\ngeneration: {cfg_scale: 5.0}\n", "utf-8")
    assert run_cli("compile", spec, cwd=project).returncode == 0
    r = run_cli("build", "variant.yaml", cwd=project)
    assert r.returncode == 1
    assert "error: build/x/ is the build folder of story.yaml; variant.yaml has the same story.id `x`" in r.stderr
    assert "give variant.yaml a story.id of its own" in r.stderr and "-o DIR" in r.stderr
    assert (project / "build/x/.storyc-spec").read_text("utf-8") == "story.yaml\n"
    r = run_cli("status", "variant.yaml", cwd=project)
    assert "build folder: build/x/ (the build of story.yaml: same story.id; building this spec is refused)" in r.stdout
    assert run_cli("compile", "variant.yaml", "-o", "other", cwd=project).returncode == 0
    assert run_cli("status", spec, cwd=project).stdout.startswith("build folder: build/x/  lock: story.lock")


def test_missing_models_are_found_before_the_first_stage(project):
    spec = _project(project)
    r = run_cli("build", spec, cwd=project)
    assert r.returncode == 1
    assert f"error: models.aesthetic: model folder {project}/models/aesthetic does not exist" in r.stderr
    assert "hint: download it: `modelscope download --model AI-ModelScope/aesthetics-predictor" in r.stderr
    assert "or write `models.aesthetic: modelscope:AI-ModelScope/" in r.stderr
    assert not (project / "build/x/data/input").exists() and "run  ingest" not in r.stdout
    v = run_cli("validate", spec, cwd=project)  # the same hint as validate's warning
    assert "hint: download it: `modelscope download --model Kwai-Kolors/Kolors --local_dir models/kolors`" in v.stderr


def test_usage_errors_exit_64_and_a_failed_score_exits_3(project):
    r = run_cli("sweep", "show", cwd=project)
    assert r.returncode == 64 and "usage: storyc sweep show SPEC" in r.stderr
    assert run_cli("sweep", "apply", "x.yaml", cwd=project).returncode == 64


def test_the_competitions_rules_are_checked_unless_the_spec_opts_out(project):
    spec = _project(project, STORY.replace(", rules: none", ""))
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1
    assert "$.submission.images: the competition takes 8 images; this story has `submission.images: 1`" in r.stderr
    assert "$.submission.min_aesthetic: the competition's gate is a mean aesthetic score of 6; `min_aesthetic: -1`" \
           in r.stderr
    assert "or set `submission.rules: none` for a story that is not a competition entry" in r.stderr
    spec.write_text(STORY.replace("lora_formats", "x"), "utf-8")
    assert run_cli("validate", spec, cwd=project).returncode == 0  # rules: none: any count, any gate
    demo = run_cli("validate", "specs/demo.yaml")  # the shipped demo opts out, and says why
    assert demo.returncode == 0


def test_init_sets_up_a_project_git_can_track(project):
    import subprocess

    subprocess.run(["git", "init", "-q", str(project)], check=True)
    r = run_cli("init", project, cwd=project)
    assert r.returncode == 0 and "wrote" in r.stdout
    assert (project / ".gitignore").read_text("utf-8").splitlines()[1:] == ["/build/", "/.storyc/", "/models/"]
    v = run_cli("validate", "story.yaml", cwd=project)
    assert v.returncode == 0 and "story.team is still the placeholder `my-team`" in v.stderr
    assert run_cli("compile", "story.yaml", cwd=project).returncode == 0
    (project / ".storyc/models").mkdir(parents=True)
    (project / ".storyc/models/big.bin").write_bytes(b"x")
    st = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert sorted(st.splitlines()) == ["?? .gitignore", "?? story.yaml"]
    (project / ".gitignore").write_text("*.pyc\n", "utf-8")
    run_cli("init", project, "--force", cwd=project)  # an existing .gitignore is extended, never replaced
    assert (project / ".gitignore").read_text("utf-8") == "*.pyc\n/build/\n/.storyc/\n/models/\n"


def test_a_spec_that_extends_another_edits_scenes_by_id(project):
    """Lists replace under `extends`, but scenes that all name scenes of the base are edited in place."""
    from storyc.spec import load_story

    base = STORY.replace("scenes: [{id: a, prompt: 一个女孩, seed: 0}]",
                         "scenes:\n  - {id: a, prompt: 一个女孩, seed: 0, caption: 一}\n  - {id: b, prompt: 两个女孩, seed: 1}\n"
                         "  - {id: c, prompt: 三个女孩, seed: 2}").replace("images: 1", "images: 3")
    _project(project, base)
    (project / "edit.yaml").write_text("version: 1\nextends: story.yaml\nstory: {id: y}\n"
                                       "scenes:\n  - {id: b, seed: 7}\n  - {id: a, caption: 二}\n", "utf-8")
    s = load_story(project / "edit.yaml")
    assert [(x.id, x.seed, x.caption) for x in s.scenes] == [("a", 0, "二"), ("b", 7, ""), ("c", 2, "")]
    (project / "edit.yaml").write_text("version: 1\nextends: story.yaml\nstory: {id: y}\n"
                                       "scenes:\n  - {id: b, seed: -1}\n", "utf-8")
    r = run_cli("validate", "edit.yaml", cwd=project)  # an error in an edit points at the edit's own line
    assert "edit.yaml:5:19: $.scenes[1].seed: must be at least 0, got -1" in r.stderr
    (project / "new.yaml").write_text("version: 1\nextends: story.yaml\nstory: {id: z}\n"
                                      "scenes: [{id: d, prompt: 猫, seed: 5}]\nsubmission: {images: 1}\n", "utf-8")
    assert [x.id for x in load_story(project / "new.yaml").scenes] == ["d"]  # new ids: the list replaces


@pytest.mark.slow  # Data-Juicer
def test_a_relative_output_folder_builds(project):
    """`-o DIR` relative to where storyc runs: Data-Juicer (which runs in the build folder) found its config at
    DIR/<id>/DIR/<id>/data/... and failed."""
    import json

    from conftest import write_images

    spec = _project(project, STORY.replace("models: {kolors: models/kolors, vae: models/vae, aesthetic: models/aesthetic}\n", ""))
    write_images(project / "imgs", [(1024, 1024)])
    (project / "imgs/i.png").unlink()
    r = run_cli("build", spec, "--until", "filter", "-o", "out", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((project / "out/x/data/filter_report.json").read_text("utf-8"))["kept"] == 1
