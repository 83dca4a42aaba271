"""Flow tests reuse the model tests' prepared project (data, segments and model-input caches)."""

import pytest

from tests.model.conftest import prepared_root, root  # noqa: F401  (pytest fixtures)


@pytest.fixture
def team_servers(tmp_path):
    """`team_servers(gpus)` starts the team stack's servers alone (workers are the test's own); stops them."""
    from v2m.stack import Stack
    started = []

    def up(gpus: int) -> Stack:
        st = Stack(tmp_path / "stack")
        started.append(st)
        st.up(servers_only=True, gpus=gpus)
        return st
    yield up
    for st in started:
        st.down()
