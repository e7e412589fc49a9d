"""A fresh install gets the versions the suite passed with: the test tools are pinned exactly and every package
of storyc[run,test] comes from constraints.txt (hypothesis 6.170 broke hypothesis-jsonschema 0.23.1 once)."""
import re
from importlib import metadata
from pathlib import Path

from storyc.deps import closure, norm

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict:
    out = {}
    for ln in (REPO / "constraints.txt").read_text("utf-8").splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, _, version = ln.partition("==")
            out[norm(name)] = version.strip()
    return out


def test_every_test_tool_is_pinned_exactly():
    import tomllib

    pins = _pins()
    test = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]["optional-dependencies"]["test"]
    for req in test:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([\w.]+)", req)
        assert m, f"test extra `{req}` is not pinned to one version"
        assert pins.get(norm(m.group(1))) == m.group(2), req


def test_the_install_commands_use_the_constraints():
    for f in ("scripts/test.sh", "README.md"):
        text = (REPO / f).read_text("utf-8")
        installs = [ln for ln in text.splitlines() if "pip install" in ln and "-e '.[" in ln]
        assert installs and all("-c constraints.txt" in ln for ln in installs), (f, installs)
    assert "scripts/test.sh" in (REPO / ".ci/run").read_text("utf-8")


def test_this_environment_is_the_constrained_one():
    pins = _pins()
    installed = closure("storyc", ("run", "test"))
    drift = {k: (v, pins.get(k)) for k, v in installed.items() if pins.get(k) != v}
    assert not drift, f"installed vs constraints.txt: {drift} (reinstall with scripts/test.sh, or rewrite " \
                      "constraints.txt with scripts/constraints.py after testing the new versions)"
    assert metadata.version("hypothesis") == pins["hypothesis"]
