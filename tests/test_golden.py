"""Refactors keep every stage's hashed slice: a project built before them rebuilds with nothing rerun. The
params hash of each stage of the shipped specs (and of a spec with every hashing rule) is pinned here; a change
to it is a decision (bump a stage version, say why), never an accident."""
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((REPO / "tests/fixtures/golden/params_hashes.json").read_text("utf-8"))


@pytest.mark.parametrize("spec", sorted(GOLDEN))
def test_stage_slices_hash_as_before(spec):
    from storyc.compiler import compile
    from storyc.spec import load_story

    plan = compile(load_story(REPO / spec))
    assert {n: j.params_hash[:16] for n, j in plan.stages.items()} == GOLDEN[spec]
