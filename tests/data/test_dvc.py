"""The real DVC pipeline in a scratch project: repro, incremental re-runs, and push/pull through real S3."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tasks.data.track_cache import read_jsonl
from tasks.data.versioning import data_version, pull, push, reproduce, track_raw
from tests.conftest import write_track
from v2m.config import DvcConfig, S3RemoteConfig
from v2m.s3server import SeaweedS3

STAGES = ["validate", "normalize", "label", "split", "segment", "cache_musicgen", "cache_audioldm"]
PER_TRACK = ["validate", "normalize", "label", "segment"]


def stage_stats(proj: Path) -> dict[str, dict]:
    dirs = {"validate": "validated", "normalize": "normalized", "label": "labelled", "segment": "segments",
            "cache_musicgen": "cache/musicgen", "cache_audioldm": "cache/audioldm"}
    return {s: json.loads((proj / "data" / d / "stats.json").read_text()) for s, d in dirs.items()}


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_repro_skips_unchanged_and_redoes_only_the_changed_track(project: Path) -> None:
    assert track_raw(project, "data/raw") is True
    assert reproduce(project) == STAGES
    first = data_version(project)
    assert len(first["data_version"]) == 12 and "data/segments" in first["outputs"]
    assert [stage_stats(project)[s]["processed"] for s in PER_TRACK] == [6, 12, 6, 6]  # normalize: per stem

    assert track_raw(project, "data/raw") is False
    assert reproduce(project) == []  # DVC: nothing changed, nothing runs
    assert data_version(project)["data_version"] == first["data_version"]

    # A test-split track: a training track would also change the tiny base model, which is seeded from the
    # first training chunks, and so every cached input (rightly: they depend on it).
    changed = next(t["track_id"] for t in read_jsonl(project / "data/split/tracks.jsonl") if t["split"] == "test")
    write_track(project / "data/raw", changed, seed=123, seconds=12.0)
    assert track_raw(project, "data/raw") is True
    assert reproduce(project) == STAGES  # DVC reruns every stage downstream of the raw data ...
    stats = stage_stats(project)
    assert [stats[s]["processed"] for s in PER_TRACK] == [1, 2, 1, 1]  # ... which redo one track each
    assert [stats[s]["reused"] for s in PER_TRACK] == [5, 10, 5, 5]
    # ... and the model-input caches re-encode that track's chunks only.
    for cache in ("cache_musicgen", "cache_audioldm"):
        chunks = [c for c in (project / "data/segments").glob(f"{cache.split('_')[1]}/{changed}/*_instrumental.wav")]
        assert stats[cache]["processed"] == len(chunks) > 0
        assert stats[cache]["reused"] == stats[cache]["chunks"] - len(chunks)
    assert data_version(project)["data_version"] != first["data_version"]


def test_push_and_pull_through_seaweedfs(project: Path, tmp_path: Path, monkeypatch) -> None:
    track_raw(project, "data/raw")
    reproduce(project)
    before = tree_digest(project / "data")
    with SeaweedS3(tmp_path / "s3", buckets=["v2m-data"]) as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        cfg = DvcConfig(remote="s3", s3=S3RemoteConfig(url="s3://v2m-data/dvc", endpoint_url=s3.endpoint_url))
        pushed = push(project, cfg)
        assert pushed > 0
        # Verify on the server itself: a wrong bucket URL can report "up to date" without sending anything.
        listed = s3.client().list_objects_v2(Bucket="v2m-data", Prefix="dvc/")
        assert listed.get("KeyCount", 0) >= pushed

        # Lose everything local: the cache and every DVC-tracked folder.
        shutil.rmtree(project / ".dvc" / "cache")
        for d in ("raw", "validated", "normalized", "labelled", "split", "segments"):
            shutil.rmtree(project / "data" / d)
        assert pull(project, cfg) > 0
    after = tree_digest(project / "data")
    assert after == before  # byte for byte, every file


def test_push_with_wrong_credentials_fails(project: Path, tmp_path: Path, monkeypatch) -> None:
    track_raw(project, "data/raw")
    with SeaweedS3(tmp_path / "s3", buckets=["v2m-data"]) as s3:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        cfg = DvcConfig(remote="s3", s3=S3RemoteConfig(url="s3://v2m-data/dvc", endpoint_url=s3.endpoint_url))
        with pytest.raises(Exception):
            push(project, cfg)
        assert s3.client().list_objects_v2(Bucket="v2m-data").get("KeyCount", 0) == 0
