"""Recaptioning as a data stage: a source's `recaption` captions its images with models.captioner through
Data-Juicer's image_captioning_mapper (a tiny random BLIP-2 in the release layout), keeps the captions in a jsonl
beside the spec that a hand edit wins in, and training reads them; bad settings are spec errors at their line."""
import csv
import json

from conftest import edit, ran, run_cli

SOURCE = "dataset: {source: folder, path: data, caption: 二次元}"
MODELS = 'models: {kolors: "tiny:kolors", vae: "tiny:sdxl-vae", aesthetic: "tiny:aesthetic"}'


def _captions(root):
    return [json.loads(line) for line in (root / "captions.jsonl").read_text("utf-8").splitlines()]


def _train_texts(root):
    with open(root / "build/t/data/train/metadata.csv", encoding="utf-8-sig", newline="") as f:
        return [r["text"] for r in csv.DictReader(f)]


def _recaption(copy, spec_extra='template: "{source}，{caption}"'):
    edit(copy, MODELS, MODELS.replace("}", ', captioner: "tiny:captioner"}'))
    edit(copy, SOURCE, SOURCE.replace("}", f", recaption: {{{spec_extra}}}}}"))


def test_recaption_captions_keeps_hand_edits_and_rebuilds_nothing_when_nothing_changed(copy):
    root = copy.parent
    (root / "data" / "img01.txt").write_text("自己的标题", "utf-8")  # an own caption (sidecar)
    _recaption(copy)
    r = run_cli("build", copy, "--until", "filter", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recaption: 3 image(s) captioned" in r.stdout + r.stderr
    caps = _captions(root)
    assert [c["image"] for c in caps] == ["img00.png", "img01.png", "img02.png"]
    for c in caps:
        assert c["source"] == "data" and len(c["sha256"]) == 64 and c["model"].startswith("w")  # the BLIP-2's words
    assert caps[0]["caption"] == caps[0]["auto"] == f"二次元，{caps[0]['model']}"
    assert caps[1]["caption"] == f"自己的标题，{caps[1]['model']}"  # {source}: the image's own caption
    assert _train_texts(root) == [caps[0]["caption"], caps[1]["caption"]]  # img02 (512 px) is filtered out
    first = (root / "captions.jsonl").read_bytes()

    r = run_cli("build", copy, "--until", "filter", cwd=root)  # nothing changed: nothing runs
    assert r.returncode == 0 and not ran(copy) & {"ingest", "filter"}, r.stdout + r.stderr

    (root / "captions.jsonl").unlink()  # the file lost: the same captions again (seeded by the image's bytes)
    r = run_cli("build", copy, "--until", "filter", cwd=root)
    assert r.returncode == 0 and (root / "captions.jsonl").read_bytes() == first
    assert "filter" not in ran(copy)  # ingest made the same data: nothing after it reruns

    lines = (root / "captions.jsonl").read_text("utf-8").splitlines()  # a hand edit of img00's caption
    e = json.loads(lines[0])
    e["caption"] = "手写的标题"
    lines[0] = json.dumps(e, ensure_ascii=False, sort_keys=True)
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    r = run_cli("status", copy, cwd=root)
    assert "captions file changed" in r.stdout
    r = run_cli("build", copy, "--until", "filter", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {"ingest", "filter"} <= ran(copy)
    assert "recaption: 0 image(s) captioned" in r.stdout + r.stderr and "1 caption(s) of data edited by hand" in r.stdout
    assert _train_texts(root)[0] == "手写的标题" and _captions(root)[0]["caption"] == "手写的标题"

    edit(copy, 'template: "{source}，{caption}"', 'template: "{caption}", mode: keep')  # a new template
    r = run_cli("build", copy, "--until", "filter", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recaption: 0 image(s) captioned" in r.stdout + r.stderr  # the captioner's words are reused
    caps = _captions(root)
    assert caps[0]["caption"] == "手写的标题"  # the hand edit still wins
    assert caps[1]["caption"] == "自己的标题"  # keep: its own caption
    assert caps[2]["caption"] == caps[2]["model"]
    assert _train_texts(root) == ["手写的标题", "自己的标题"]


def test_recaption_settings_that_cannot_work_are_spec_errors(project):
    spec = project / "story.yaml"
    (project / "data").mkdir()
    base = ("version: 1\nstory: {id: d}\n%s\ndataset:\n  source: folder\n  path: data\n  recaption: {%s}\n"
            "scenes: [{id: a, prompt: x, seed: 0}]\nsubmission: {images: 1, rules: none}\n")
    spec.write_text(base % ("", "mode: append"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "story.yaml:7:" in r.stderr
    assert "$.dataset.recaption: recaption needs a captioner, and `models.captioner` is not set" in r.stderr
    models = 'models: {captioner: "tiny:captioner"}'
    spec.write_text(base % (models, 'template: "{captoin}"'), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "$.dataset.recaption.template: unknown field `{captoin}`" in r.stderr
    assert "did you mean `caption`" in r.stderr
    spec.write_text(base % (models, 'template: "{source}"'), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "does not use `{caption}`" in r.stderr
    spec.write_text(base % (models, "mode: rewrite"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "`rewrite` is not one of: replace, append, keep" in r.stderr
    (project / "caps").mkdir()
    spec.write_text(base % (models, "file: caps"), "utf-8")
    r = run_cli("validate", spec, cwd=project)
    assert r.returncode == 1 and "$.dataset.recaption.file: `caps` is a folder" in r.stderr
    spec.write_text(base % (models, 'template: "{source}，{caption}", prompt: a picture of'), "utf-8")
    assert run_cli("validate", spec, cwd=project).returncode == 0
    r = run_cli("plan", spec, cwd=project)
    assert "data data: recaptioned by models.captioner, mode replace, template {source}，{caption}, kept in " \
           "captions.jsonl" in r.stdout


def test_compose_follows_the_mode_and_the_template():
    from storyc.stages.ingest import compose

    rc = {"template": "{source}，{caption}"}
    assert compose(rc, "a girl", "二次元", own=False) == "二次元，a girl"
    assert compose({**rc, "mode": "append"}, "a girl", "二次元", own=True) == "二次元，二次元，a girl"
    assert compose({"mode": "append"}, "a girl", "自己的", own=True) == "自己的，a girl"
    assert compose({"mode": "keep"}, "a girl", "自己的", own=True) == "自己的"
    assert compose({"mode": "keep"}, "a girl", "二次元", own=False) == "a girl"
    assert compose({}, "a {source} girl", "x", own=False) == "a {source} girl"  # the captioner's words stay as said
