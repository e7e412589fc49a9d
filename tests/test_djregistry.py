import pytest


@pytest.mark.slow  # imports Data-Juicer
def test_shipped_op_snapshot_matches_installed_data_juicer():
    from storyc.djregistry import snapshot
    from storyc.rules import dj_registry

    assert snapshot() == dj_registry(), "regenerate: python -m storyc.djregistry --write"
