"""`storyc publish`: stage the model page (build/<id>/publish/model/) and POST.md from an up-to-date, valid bundle,
and upload the page with modelscope's own hub client."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import StorycError
from .model import plain
from .models.download import require_modelscope
from .render import render
from .submission import COMPETITION_NAME, PLACEHOLDER_TEAMS, Gate, display_name, files, read_json, sha256


def check_submission(plan) -> tuple[Path, Gate]:
    """The submission folder exactly as the up-to-date bundle wrote it, and its recomputed gate; a clear error
    when anything was edited, is stale or is below the gate."""
    from .options import RunOptions
    from .runner import decide

    story = plan.story
    folder = plan.build_dir / "submission" / story.id
    manifest = read_json(folder / "manifest.json")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise StorycError(f"no bundle at {story.rel(folder)}", f"run `storyc build {story.rel(story.spec_path)}` first")
    stale = [d for d in decide(plan, None, RunOptions()) if d.stale]
    if stale:
        raise StorycError(f"the bundle is not up to date with {story.spec_path.name} ({stale[0].name}: "
                          f"{'; '.join(stale[0].reasons)})", f"run `storyc build {story.rel(story.spec_path)}` first")
    on_disk = set(files(folder)) - {"manifest.json"}
    if on_disk != set(manifest["files"]):
        raise StorycError(f"{story.rel(folder)} holds other files than its manifest lists "
                          f"({', '.join(sorted(on_disk ^ set(manifest['files'])))})",
                          "rebuild the bundle: storyc build --force bundle")
    for name, rec in sorted(manifest["files"].items()):
        if not isinstance(rec, dict) or sha256(folder / name) != rec.get("sha256"):
            raise StorycError(f"{story.rel(folder / name)} was modified after the build (its sha256 differs from "
                              "the manifest)", "rebuild the bundle: storyc build --force bundle")
    values = list(((read_json(folder / "scores.json") or {}).get("images") or {}).values())
    if not values or not all(isinstance(v, (int, float)) for v in values):
        raise StorycError(f"{story.rel(folder)}/scores.json has no scores", "rebuild the bundle")
    gate = Gate.of(values, story.spec.submission.min_aesthetic)
    if not gate.valid:
        raise StorycError(f"the submission is invalid: mean aesthetic {gate.mean:.3f} < {gate.minimum:g}; refusing "
                          "to publish", "rework the weakest scenes and build again")
    return folder, gate


PUBLISHED = ("README.md", "configuration.json", "storyboard.png", "prompts.txt", "scores.json")


def competition_name(story, display: str | None, dry_run: bool = False) -> str:
    """The model's display name, checked against the competition's rule `<team>-可图Kolors训练-<anything>`.
    A placeholder team stops an upload; a dry run only warns."""
    team = (story.spec.story.team or "").strip()
    where = f"{story.rel(story.spec_path)}: story.team"
    if not team:
        raise StorycError(f"{where} is not set; the competition names the model `<team>-可图Kolors训练-<anything>`",
                          "add `team: <your team>` under `story:`")
    if team.lower() in PLACEHOLDER_TEAMS:
        if not dry_run:
            raise StorycError(f"{where} is still the placeholder `{team}`", "write your team's name there")
        print(f"warning: {where} is still the placeholder `{team}`; the upload will refuse it")
    name = display or display_name(plain(story.spec.story))
    prefix = COMPETITION_NAME.format(team=team, rest="")
    if not name.startswith(prefix) or len(name) == len(prefix):
        raise StorycError(f"model name `{name}` does not follow the competition's rule "
                          f"`{prefix}<anything>`", f"e.g. --display-name '{prefix}{story.id}'")
    return name


def stage_upload(plan, model_id: str, display: str | None = None, dry_run: bool = False) -> tuple[Path, Path, str]:
    """Write the exact tree `storyc publish` uploads (build/<id>/publish/model/) and POST.md, the text of the
    competition's discussion post, beside it. Returns (tree, post, display name)."""
    from .rules import modelscope_id_problem

    if modelscope_id_problem(model_id):
        raise StorycError(f"--model-id `{model_id}`: {modelscope_id_problem(model_id)}",
                          "e.g. --model-id my-team/purple-girl-story (ModelScope ids are ASCII; the Chinese "
                          "competition name is the model's display name)")
    story = plan.story
    folder, gate = check_submission(plan)
    name = competition_name(story, display, dry_run)
    manifest = read_json(folder / "manifest.json")["files"]
    keep = [f for f in manifest if f in PUBLISHED or f.endswith(".safetensors") or f.startswith("images/")]
    out = plan.build_dir / "publish"
    tree = out / "model"
    shutil.rmtree(out, ignore_errors=True)
    for rel in keep:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, tree / rel)
    from .reproduce import plan as reproduce_plan
    from .reproduce import stage as reproduce_stage

    reproduce_stage(reproduce_plan(story, plan_lock(plan)), tree)
    readme = (tree / "README.md").read_text("utf-8")
    missing = [t for t in _links(readme) if not (tree / t).is_file()]
    if missing:  # a model page with broken pictures is not what we upload
        raise StorycError(f"the model card links files that are not in the upload: {', '.join(missing)}",
                          "this is a storyc bug; please report it")
    prompts = read_json(folder / "prompts.json")["scenes"]
    post = render("post.md.j2", team=story.spec.story.team, name=name, model_id=model_id,
                  url=f"https://modelscope.cn/models/{model_id}", title=story.title, scenes=prompts, mean=gate.mean)
    (out / "POST.md").write_text(post, "utf-8")
    return tree, out / "POST.md", name


def plan_lock(plan) -> Path:
    from .options import RunOptions

    return RunOptions().lock_for(plan.story)


def _links(markdown: str) -> list[str]:
    """Relative targets of the markdown's links and images."""
    import re

    return [t for t in re.findall(r"\]\(([^)\s]+)\)", markdown) if "://" not in t and not t.startswith("#")]


def publish(plan, model_id: str, dry_run: bool = False, display: str | None = None) -> int:
    """Stage the model page (LoRA files, configuration.json, model card, storyboard, images) and upload it with
    modelscope's own hub client; --dry-run stops after staging and lists the tree."""
    story = plan.story
    tree, post, name = stage_upload(plan, model_id, display, dry_run)
    listed = files(tree)
    print(f"{'would upload' if dry_run else 'uploading'} {story.rel(tree)}/ to {model_id} ({name}):")
    width = max(len(rel) for rel in listed)
    for rel in listed:
        print(f"  {rel:<{width}}  {(tree / rel).stat().st_size:>11,d} B")
    print(f"discussion post: {story.rel(post)}")
    if dry_run:
        print("dry run: nothing uploaded")
        return 0
    token = os.environ.get("MODELSCOPE_API_TOKEN")
    if not token:
        raise StorycError("MODELSCOPE_API_TOKEN is not set", "export your ModelScope access token in that variable")
    require_modelscope("publish", "publish from a machine with network access; `--dry-run` stages the same tree")
    from modelscope.hub.api import HubApi

    from .stages._quiet import quiet_libraries

    quiet_libraries()
    api = HubApi()
    api.login(token)
    api.push_model(model_id=model_id, model_dir=str(tree), chinese_name=name,
                   license=story.spec.submission.license)
    print(f"published {story.id} to https://modelscope.cn/models/{model_id}")
    print(f"next: post {story.rel(post)} in the Kolors discussion area")
    return 0
