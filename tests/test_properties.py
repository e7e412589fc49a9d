"""Validated means runnable: specs generated from the shipped JSON Schema (hypothesis-jsonschema) either fail
validation with clear diagnostics or compile to strict artifacts; a bounded sample, scaled down to the tiny
models, runs through a real build with no internal error."""
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from conftest import write_images

RAW = json.loads((Path(__file__).resolve().parents[1] / "storyc/schema/story.schema.json").read_text("utf-8"))


def _inline(node, defs):
    """The schema with every local $ref replaced by its definition (hypothesis-jsonschema resolves refs
    nested in oneOf only partly)."""
    if isinstance(node, list):
        return [_inline(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _inline(defs[node["$ref"].split("/")[-1]], defs)
        return {**target, **{k: _inline(v, defs) for k, v in node.items() if k != "$ref"}}
    return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}


SCHEMA = _inline(RAW, RAW.get("$defs", {}))


@st.composite
def specs(draw, fixed: bool | None = None):
    spec = draw(from_schema(SCHEMA))
    spec.pop("extends", None)
    if draw(st.booleans()) if fixed is None else fixed:  # meet the cross-field rules (half the time by default)
        scenes = spec["scenes"][:64]
        for i, s in enumerate(scenes):
            s["id"], s["seed"] = f"s{i}", i
        spec["scenes"] = scenes
        spec.setdefault("submission", {})["images"] = len(scenes)
        spec["submission"]["rules"] = "none"  # any number of scenes and any gate
        if isinstance(spec.get("dataset"), dict) and spec["dataset"].get("source") in ("folder", "jsonl"):
            spec["dataset"]["source"] = "modelscope"
            spec["dataset"]["id"] = "AI-ModelScope/lowres_anime"
    return spec


def _write(root: Path, spec: dict) -> Path | None:
    try:
        text = yaml.safe_dump(spec, allow_unicode=True, sort_keys=False)
        (root / "story.yaml").write_text(text, "utf-8")
    except (UnicodeEncodeError, yaml.YAMLError):
        return None
    return root / "story.yaml"


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


@settings(max_examples=120, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(spec=specs())
def test_every_generated_spec_is_rejected_clearly_or_compiles(tmp_path, spec):
    from storyc.compiler import compile
    from storyc.errors import SpecError
    from storyc.spec import load_story

    (tmp_path / ".storyc").mkdir(exist_ok=True)
    path = _write(tmp_path, spec)
    assume(path is not None)
    try:
        story = load_story(path)
    except SpecError as e:
        assert e.diagnostics
        for d in e.diagnostics:  # each at its file:line:col, with its $.path, in the rendered text
            assert d.message and d.mark is not None and d.mark.line >= 1, d
            assert d.mark.file.endswith("story.yaml") and d.render().startswith(f"{d.mark}: {d.path}: "), d.render()
        return
    plan = compile(story, tmp_path / "build")
    for rel, text in plan.artifacts.items():
        if rel.endswith(".json"):
            _strict(text)
    assert set(plan.stages) >= {"ingest", "filter", "train", "bundle"}


def _printable(node):
    """Every string with its control characters replaced, so most sampled specs validate and reach the build."""
    import unicodedata

    if isinstance(node, str):
        return "".join("x" if unicodedata.category(c) in ("Cc", "Cs") else c for c in node)
    if isinstance(node, list):
        return [_printable(x) for x in node]
    if isinstance(node, dict):
        return {_printable(k): _printable(v) for k, v in node.items()}
    return node


def _scaled_down(spec: dict, data: str) -> dict:
    """The same choices at tiny-model scale (sizes, steps, counts), on a local dataset."""
    s = _printable(dict(spec))  # control characters are refused at their line: the compile test covers that
    s.pop("characters", None)  # they need reference images in the project: test_characters builds them
    n = min(len(s["scenes"]), 3)
    s["scenes"] = [{**{k: v for k, v in sc.items() if k != "characters"}, "id": f"s{i}", "seed": i}
                   for i, sc in enumerate(s["scenes"][:n])]
    s["models"] = {"kolors": "tiny:kolors", "vae": "tiny:sdxl-vae", "aesthetic": "tiny:aesthetic"}
    s["dataset"] = {"source": "folder", "path": data, "caption": "二次元"}
    s["filters"] = [{"image_shape_filter": {"min_width": 64, "min_height": 64}}]
    s["processing"] = {"workers": 1}
    lora = dict(s.get("lora") or {})
    lora["rank"] = min(lora.get("rank", 4), 4)
    s["lora"] = lora
    tr = dict(s.get("train") or {})
    tr.update(epochs=1, steps_per_epoch=min(tr.get("steps_per_epoch", 2), 2), resolution=64, precision="32",
              strategy="auto", devices="auto", num_workers=0, compile=False,
              batch_size=min(tr.get("batch_size", 1), 2), accumulate_grad_batches=1)
    s["train"] = tr
    gen = dict(s.get("generation") or {})
    gen.update(width=64, height=64, steps=min(gen.get("steps", 2), 2), candidates=min(gen.get("candidates", 1), 2))
    s["generation"] = gen
    sub = dict(s.get("submission") or {})
    sub["images"], sub["rules"] = n, "none"
    s["submission"] = sub
    s["style"] = {k: v[:40] for k, v in (s.get("style") or {}).items()}
    return s


@settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(spec=specs(fixed=True))
def test_a_sample_of_valid_specs_builds_without_internal_errors(tmp_path_factory, tiny_models, spec):
    from storyc.cli import main
    from storyc.errors import SpecError
    from storyc.spec import load_story

    root = tmp_path_factory.mktemp("prop")
    (root / ".storyc" / "models").mkdir(parents=True)
    for d in tiny_models.iterdir():
        (root / ".storyc" / "models" / d.name).symlink_to(d)
    write_images(root / "data", [(96, 96), (64, 80)])
    path = _write(root, _scaled_down(spec, "data"))
    assume(path is not None)
    try:
        load_story(path)
    except SpecError:
        assume(False)  # this test is about specs that validate
    code = main(["build", str(path), "-q"])
    assert code in (0, 3), code  # built: VALID or INVALID, never an error on a validated spec
    report = json.loads((root / "build" / load_story(path).id / "build_report.json").read_text("utf-8"))
    assert set(report["stages"].values()) == {"ran"}
