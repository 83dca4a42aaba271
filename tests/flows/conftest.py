"""Flow tests reuse the model tests' prepared project (data, segments and model-input caches)."""

from tests.model.conftest import prepared_root, root  # noqa: F401  (pytest fixtures)
