"""The prepare-data Prefect flow runs the DVC pipeline and returns (and records) the data version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.prepare_data import prepare_data
from tasks.data.versioning import VERSION_FILE


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    import os
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-storage"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_the_pipeline_and_returns_the_data_version(project: Path, prefect_harness) -> None:
    state = prepare_data(project_dir=str(project), push=True, return_state=True)
    assert state.is_completed(), state
    version = state.result()
    assert version["stages_run"] == ["validate", "normalize", "label", "split", "segment", "cache_musicgen",
                                     "cache_audioldm"]
    assert version["raw_changed"] is True
    assert len(version["data_version"]) == 12 and version["git_revision"]
    stats = version["stats"]
    assert stats["tracks"] == 6 and stats["quarantined"] == 0 and stats["artists"] == 3
    assert sum(stats["splits"].values()) == 6 and stats["chunks_musicgen"] > 0
    recorded = json.loads((project / VERSION_FILE).read_text())
    assert recorded["data_version"] == version["data_version"]
    # Each backend's test-set fingerprint is recorded with the data version, and matches its manifest.
    from tasks.data.segment import test_fingerprint
    from tasks.data.track_cache import read_jsonl
    for backend in ("musicgen", "audioldm"):
        manifest = read_jsonl(project / f"data/segments/{backend}.jsonl")
        assert recorded["test_fingerprint"][backend] == test_fingerprint(manifest)
    # The default remote is a local folder under .v2m/ that now holds the content-addressed files.
    assert version["pushed_files"] > 0
    assert len([p for p in (project / ".v2m" / "dvc-remote").rglob("*") if p.is_file()]) >= version["pushed_files"]

    again = prepare_data(project_dir=str(project))
    assert again["stages_run"] == [] and again["data_version"] == version["data_version"]
