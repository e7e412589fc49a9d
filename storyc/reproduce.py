"""What a stranger needs to rebuild a published story from its model page alone, decided once: the model card's
Reproduce steps (written by the bundle) and the `reproduce/` folder `storyc publish` uploads beside them (the spec
and every file it extends, its lock, small dataset folders, storyc itself as a wheel, the constraints it was
tested with). Paths keep their place in the project, under reproduce/ (an empty storyc.toml marks it the root),
so the spec's relative paths still resolve. Light: no heavy imports."""
from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import __version__

SMALL_DATASET = 50 * 2 ** 20  # a folder dataset up to this size travels with the page
FOLDER = "reproduce"


PACKAGE = Path(__file__).resolve().parent


def storyc_commit() -> str | None:
    """The git commit storyc runs from: its checkout's HEAD (+modified when storyc/ has uncommitted changes), or the
    commit recorded in the wheel it was installed from (BUILD_COMMIT); None when neither is known."""
    root = PACKAGE.parent
    if (root / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10)
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                    "storyc"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        if head.returncode == 0:
            return head.stdout.strip()[:12] + ("+modified" if dirty.stdout.strip() else "")
        return None
    try:
        return (PACKAGE / "BUILD_COMMIT").read_text("utf-8").strip() or None
    except OSError:
        return None


def wheel_name() -> str:
    return f"storyc-{__version__}-py3-none-any.whl"


def pack_wheel(out: Path) -> Path:
    """storyc as it runs here, as a wheel (the package's files, its installed metadata, the commit it was built
    from): the same whether storyc runs from a checkout or was itself installed from such a wheel. Deterministic
    (sorted entries, fixed timestamps)."""
    import base64
    import hashlib
    import zipfile
    from importlib import metadata

    dist = metadata.distribution("storyc")
    info = f"storyc-{__version__}.dist-info"
    entries = {}
    for f in sorted(PACKAGE.rglob("*")):
        rel = f.relative_to(PACKAGE)
        if f.is_file() and "__pycache__" not in rel.parts and f.suffix != ".pyc" and rel.name != "BUILD_COMMIT":
            entries[f"storyc/{rel.as_posix()}"] = f.read_bytes()
    entries["storyc/BUILD_COMMIT"] = ((storyc_commit() or "") + "\n").encode()
    # an egg-info (setuptools' editable install leaves one in the checkout, found first from its root) has PKG-INFO:
    # the same core-metadata text under its older name
    entries[f"{info}/METADATA"] = (dist.read_text("METADATA") or dist.read_text("PKG-INFO")).encode()
    entries[f"{info}/entry_points.txt"] = (dist.read_text("entry_points.txt") or "").encode()
    entries[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: storyc\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in entries.items()) + f"{info}/RECORD,,\n"
    entries[f"{info}/RECORD"] = record.encode()
    path = Path(out) / wheel_name()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return path


def constraints() -> str:
    """The versions of everything storyc[run] installed here (what the build ran with), as pip constraints."""
    from .deps import closure

    pins = closure("storyc", ("run",))
    return "# the package versions this story was built with\n" + "".join(f"{k}=={v}\n" for k, v in sorted(pins.items()))


@dataclass(frozen=True)
class Reproduce:
    files: tuple  # (source path, path under reproduce/)
    datasets_left_out: tuple  # project-relative paths of dataset sources too large to publish
    datasets_included: bool  # some dataset folder travels with the page
    steps: tuple  # shell lines, run in a clone of the model repository
    notes: tuple  # sentences for the card


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def plan(story, lock_path: Path) -> Reproduce:
    rel = story.rel
    files = [(p, rel(p)) for p in story.files]
    files.append((Path(lock_path), rel(lock_path)))
    left, included = [], False
    for src, path in zip(story.spec.datasets, story.dataset_paths):
        if path is None:
            continue
        folder = path if src.source == "folder" else path.parent
        if path.exists() and _size(folder) <= SMALL_DATASET:
            files.append((folder, rel(folder)))
            included = True
        else:
            left.append(rel(path))
    steps = [f"cd {FOLDER}", "python3 -m venv .venv && . .venv/bin/activate",
             f"python3 -m pip install -c constraints.txt './{wheel_name()}[run]'"]
    notes = []
    for key, ref in story.models.items():
        if ref.scheme == "local":
            from .models.kolors import MODELSCOPE_IDS

            steps.append(f"modelscope download --model {MODELSCOPE_IDS[key]} --local_dir {shlex.quote(rel(ref.path))}")
    schemes = {ref.scheme for ref in story.models.values()}
    if schemes == {"tiny"}:
        notes.append("No model to download: the spec uses the tiny random-weight models storyc builds itself.")
    elif "modelscope" in schemes:
        notes.append("The `modelscope:` models download on the first build (network needed).")
    if any(src.source == "modelscope" for src in story.spec.datasets):
        notes.append("The ModelScope dataset downloads on the first build (network needed).")
    if left:
        notes.append("The training images are not in this repository (too large): put them at "
                     + ", ".join(f"`{p}`" for p in left) + " first.")
    steps.append(f"storyc build {shlex.quote(rel(story.spec_path))}")
    steps.append(f"git diff --stat -- {shlex.quote(rel(lock_path))}")
    notes.append(f"`{rel(lock_path)}` holds the digest of every output of the published build: on the same kind of "
                 "device the rebuild leaves it unchanged (`git diff` shows nothing); on another, the images agree to "
                 "float tolerance.")
    return Reproduce(tuple(files), tuple(left), included, tuple(steps), tuple(notes))


def stage(rp: Reproduce, tree: Path) -> list[str]:
    """Copy the plan's files into tree/reproduce/ with storyc's wheel and constraints; the paths written."""
    import shutil

    out = tree / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    (out / "storyc.toml").write_text("# the project root of this reproduction (see the model card)\n", "utf-8")
    for src, dst in rp.files:
        if src.is_dir():
            shutil.copytree(src, out / dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
        else:
            (out / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / dst)
    (out / "constraints.txt").write_text(constraints(), "utf-8")
    pack_wheel(out)
    return sorted(p.relative_to(tree).as_posix() for p in out.rglob("*") if p.is_file())
