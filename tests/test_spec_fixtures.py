"""Example-file tests: every valid fixture validates; every invalid one gives its exact `line:col: path: message`."""
from pathlib import Path

import pytest

from storyc.errors import SpecError

HERE = Path(__file__).parent / "fixtures"
VALID = sorted((HERE / "valid").glob("*.yaml"))
INVALID = sorted((HERE / "invalid").glob("*.yaml"))


def test_enough_invalid_cases():
    assert len(INVALID) >= 30
    assert all(p.with_suffix(".expected").is_file() for p in INVALID)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid(cli, path):
    code, out, err = cli("validate", path)
    assert code == 0, err
    assert "ok:" in out and "error" not in err


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid(cli, path, monkeypatch):
    monkeypatch.chdir(path.parent)
    expected = path.with_suffix(".expected").read_text("utf-8").strip()
    code, out, err = cli("validate", path.name)
    assert code == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert f"error: {path.name}:{expected}" in errors, err
    assert "Traceback" not in err + out


def test_every_problem_in_one_pass(cli, project):
    spec = project / "s.yaml"
    spec.write_text(
        "version: 1\nstory: {id: Bad}\nlora: {rank: 0, alpah: 2}\nsubmission: {rules: none, images: 3}\nscenes:\n"
        "  - {id: a, prompt: x, seed: 1}\n  - {id: a, prompt: y, seed: 1}\n", "utf-8")
    code, _, err = cli("validate", spec)
    assert code == 1
    for needle in ("2:13: $.story.id: `Bad` is not a valid slug", "3:14: $.lora.rank: must be at least 1",
                   "3:17: $.lora.alpah: unknown key `alpah`", "hint: did you mean `alpha`?",
                   "$.scenes[1].id: scene id `a` is already used", "$.scenes[1].seed: seed 1 is already used",
                   "$.scenes: the story has 2 scenes but `submission.images` is 3", "6 problems"):
        assert needle in err, (needle, err)


def test_extends_errors_point_at_the_base_file(cli, project):
    (project / "base.yaml").write_text("version: 1\nstory: {id: base}\nlora: {rank: -3}\n", "utf-8")
    (project / "child.yaml").write_text(
        "version: 1\nextends: base.yaml\nstory: {id: child}\nsubmission: {rules: none, images: 1}\n"
        "scenes: [{id: a, prompt: x, seed: 0}]\n", "utf-8")
    code, _, err = cli("validate", project / "child.yaml")
    assert code == 1
    assert "base.yaml:3:14: $.lora.rank: must be at least 1, got -3" in err


def test_extends_merges_deeply_and_lists_replace(project):
    from storyc.spec import load_story

    (project / "base.yaml").write_text(
        "version: 1\nstory: {id: base, team: t}\ntrain: {epochs: 3, seed: 9}\n"
        "filters: [{image_shape_filter: {min_width: 10}}, {image_aspect_ratio_filter: {}}]\n", "utf-8")
    (project / "child.yaml").write_text(
        "version: 1\nextends: base.yaml\nstory: {id: child}\ntrain: {epochs: 1}\n"
        "filters: [{image_shape_filter: {min_width: 20}}]\nsubmission: {rules: none, images: 1}\n"
        "scenes: [{id: a, prompt: x, seed: 0}]\n", "utf-8")
    s = load_story(project / "child.yaml")
    assert (s.spec.story.id, s.spec.story.team, s.spec.story.title) == ("child", "t", None)
    assert s.spec.train.epochs == 1 and s.spec.train.seed == 9
    assert s.spec.filters == (("image_shape_filter", {"min_width": 20}),)
    assert [p.name for p in s.files] == ["child.yaml", "base.yaml"]


def test_extends_cycle_through_two_files(cli, project):
    (project / "a.yaml").write_text("version: 1\nextends: b.yaml\n", "utf-8")
    (project / "b.yaml").write_text("version: 1\nextends: a.yaml\n", "utf-8")
    code, _, err = cli("validate", project / "a.yaml")
    assert code == 1 and "`extends` cycle:" in err and "a.yaml -> " in err


def test_dates_stay_strings_and_yes_is_not_a_key_bool(project):
    from storyc.spec import load_story

    (project / "s.yaml").write_text(
        "version: 1\nstory: {id: d, title: 2024-08-09}\nsubmission: {rules: none, images: 1}\n"
        "scenes: [{id: a, prompt: x, seed: 0, caption: 2024-01-01}]\n", "utf-8")
    s = load_story(project / "s.yaml")
    assert s.title == "2024-08-09" and s.scenes[0].caption == "2024-01-01"
    # a key spelled `yes`, `on` or `1` stays that text (YAML 1.1 would make it True or 1): the spec can name it
    from storyc.yamlio import load

    (project / "k.yaml").write_text("filters:\n  - yes: {on: 1, 1: x}\n", "utf-8")
    op = load(project / "k.yaml").data["filters"][0]
    assert op == {"yes": {"on": 1, "1": "x"}}
    (project / "s.yaml").write_text(
        "version: 1\nstory: {id: d}\nsubmission: {rules: none, images: 1}\nscenes: [{id: a, prompt: x, seed: 0}]\n"
        "filters: [{yes: {}}]\n", "utf-8")
    with pytest.raises(SpecError, match="unknown Data-Juicer op `yes`"):
        load_story(project / "s.yaml")


def test_alias_bomb_is_refused_quickly(cli):
    import time

    t = time.perf_counter()
    code, _, err = cli("validate", HERE / "invalid" / "alias_bomb.yaml")
    assert code == 1 and "alias bomb" in err
    assert time.perf_counter() - t < 5.0  # milliseconds when idle; seconds would mean the bomb expanded


def test_prompt_length_counts_kolors_tokens():
    from storyc import tokens

    count = tokens.counter()
    assert count is not None, tokens.why_unavailable()
    assert count("") == tokens.SPECIAL
    assert count("二次元，一个紫色短发小女孩") < count("二次元，一个紫色短发小女孩，在家中沙发上坐着")
