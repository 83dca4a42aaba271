"""Finished songs in: demo tracks rendered as mixes, separated by the weight-free separator through the real DVC
pipeline (`separate` ahead of `validate`), scored against the stems they were mixed from."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tasks.data.demo import build_demo_dataset, write_mixes
from tasks.data.separation_quality import sdr_improvement
from tasks.data.track_cache import read_jsonl
from tasks.data.versioning import check_source, reproduce, track_raw
from tests.conftest import ROOT, run
from v2m.audio import read_audio
from v2m.config import DemoConfig, load_params
from v2m.errors import UserError

# Three chorales, one style each, 12-16 s at 22.05 kHz (espeak + FluidSynth when installed, as the demo).
DEMO = DemoConfig(n_tracks=3, n_artists=3, styles=["rock", "pop", "disco"], styles_per_chorale=1,
                  min_duration_s=12, max_duration_s=16, sample_rate=22050, blank_label_fraction=0.0)
CHORALES = ROOT / ".v2m" / "cache" / "chorales"
NO_VOCAL = "no_vocal_rock"


def make_mixes(mixes: Path) -> dict[str, str]:
    """The demo tracks as mixes (true stems in mixes/stems), plus a song without a voice: the rock track's
    instrumental alone. Rock on purpose: overdriven guitars chugging eighths have no lead line, which is what the
    weight-free separator's lead estimate can tell; an instrumental with a lead instrument it cannot
    (bench/separation.py counts both). Returns track_id -> genre."""
    build_demo_dataset(mixes / "stems", DEMO, seed=5, cache_dir=CHORALES, workers=1)
    write_mixes(mixes / "stems", mixes)
    with open(mixes / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rock = next(r for r in rows if r["genre"] == "rock")
    inst, sr = sf.read(mixes / "stems" / rock["track_id"] / "instrumental.wav")
    sf.write(mixes / f"{NO_VOCAL}.wav", inst, sr)
    rows.append({**rock, "track_id": NO_VOCAL, "artist": "session_band", "title": "instrumental"})
    with open(mixes / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return {r["track_id"]: r["genre"] for r in rows}


@pytest.fixture
def mix_project(tmp_path: Path) -> Path:
    """A scratch git + DVC project whose params say the source is a folder of songs (data.mixes)."""
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy(ROOT / "dvc.yaml", proj)
    for pkg in ("tasks", "v2m", "models"):
        shutil.copytree(ROOT / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "params.yaml").read_text()
    assert "  mixes: []" in text, "params.yaml data.mixes line changed"
    (proj / "params.yaml").write_text(text.replace("  mixes: []", "  mixes: [data/mixes]", 1))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        res = run(cmd, proj)
        assert res.returncode == 0, res.stderr
    return proj


def test_songs_are_separated_by_the_dvc_pipeline_scored_quarantined_and_redone_per_track(mix_project: Path) -> None:
    proj, raw, mixes = mix_project, mix_project / "data/raw", mix_project / "data/mixes"
    genres = make_mixes(mixes)
    p = load_params(proj / "params.yaml")
    assert p.data.source == "mixes" and p.separate.method == "harmonic"

    assert track_raw(proj, p.data.input_dir) is True  # the songs are what DVC versions
    assert reproduce(proj, ["validate"]) == ["separate@data/mixes", "validate"]

    # The raw layout, for the songs with a voice; the metadata rows carried over.
    sung = sorted(t for t in genres if t != NO_VOCAL)
    for tid in sung:
        assert (raw / tid / "vocals.wav").is_file() and (raw / tid / "instrumental.wav").is_file()
    with open(raw / "metadata.csv", newline="") as f:
        assert sorted(r["track_id"] for r in csv.DictReader(f)) == sung
    report = {line["track_id"]: line for line in read_jsonl(raw / "separation.jsonl")}
    assert all(report[t]["status"] == "ok" and report[t]["method"] == "harmonic" for t in sung)
    assert all(set(report[t]["estimates"]) == {"vocal_share_db", "lead_db", "vocal_in_instrumental_db",
                                               "accompaniment_in_vocal_db", "residual_db"} for t in sung)

    # SDR improvement against the stems each song was mixed from: both stems closer to the truth than the mix.
    print("\nweight-free separation, SDRi (dB) on demo songs:")
    for tid in sung:
        mix, _ = read_audio(mixes / f"{tid}.wav")
        truth = {s: read_audio(mixes / "stems" / tid / f"{s}.wav")[0][0] for s in ("vocals", "instrumental")}
        est = {s: read_audio(raw / tid / f"{s}.wav")[0][0] for s in ("vocals", "instrumental")}
        sdri = {s: sdr_improvement(truth[s], est[s], mix[0]) for s in truth}
        print(f"  {tid} ({genres[tid]}): vocal {sdri['vocals']:+.2f}, instrumental {sdri['instrumental']:+.2f}")
        assert sdri["vocals"] > 0 and sdri["instrumental"] > 0, (tid, sdri)
        assert np.abs(mix[0] - est["vocals"] - est["instrumental"]).max() < 1e-3  # the stems add back to the song

    # The song without a voice is quarantined with its reason, in validate's report too; nothing trains on it.
    assert report[NO_VOCAL]["status"] == "quarantined" and report[NO_VOCAL]["reason"] == "no_vocal"
    assert "without vocals" in report[NO_VOCAL]["message"]
    quarantine = {q["track_id"]: q for q in read_jsonl(proj / "data/validated/quarantine.jsonl")}
    assert quarantine[NO_VOCAL]["reason"] == "no_vocal" and quarantine[NO_VOCAL]["stage"] == "separate"
    assert sorted(t["track_id"] for t in read_jsonl(proj / "data/validated/tracks.jsonl")) == sung

    # Nothing changed: DVC runs nothing. One song changed: the stage runs, and separates that song only.
    assert reproduce(proj, ["validate"]) == []
    changed = sung[0]
    audio, sr = sf.read(mixes / f"{changed}.wav")
    sf.write(mixes / f"{changed}.wav", 0.8 * audio, sr)
    assert track_raw(proj, p.data.input_dir) is True
    assert reproduce(proj, ["validate"]) == ["separate@data/mixes", "validate"]
    stats = json.loads((raw / "stats.json").read_text())
    assert (stats["processed"], stats["reused"]) == (1, len(genres) - 1)
    assert json.loads((proj / "data/validated/stats.json").read_text())["processed"] == 1

    # New thresholds re-judge the cached estimates: the stage runs, separates nothing, and lets the song through.
    params = proj / "params.yaml"
    params.write_text(params.read_text().replace("  min_quality: 0.5 ", "  min_quality: 0.0 ", 1))
    assert reproduce(proj, ["validate"]) == ["separate@data/mixes", "validate"]
    stats = json.loads((raw / "stats.json").read_text())
    assert (stats["processed"], stats["reused"]) == (0, len(genres))
    assert {line["track_id"]: line["status"] for line in read_jsonl(raw / "separation.jsonl")}[NO_VOCAL] == "ok"


def test_stems_tracked_by_hand_and_a_mixes_source_are_refused_with_what_to_do(mix_project: Path) -> None:
    p = load_params(mix_project / "params.yaml")
    (mix_project / "data").mkdir()
    (mix_project / "data/raw.dvc").write_text("outs:\n- path: raw\n")
    with pytest.raises(UserError, match=r"raw.dvc.*data\.mixes: \[\].*dvc remove raw\.dvc"):
        check_source(mix_project, p.data)


def test_another_host_adopts_the_separation_through_the_dvc_remote(mix_project: Path, tmp_path: Path) -> None:
    """Team mode's hand-off (flows/prepare_data.py separate_step): the GPU host separates and pushes; the CPU host,
    which never ran the stage, records its dvc.lock entry and pulls data/raw, and `dvc repro` goes on from there."""
    from tasks.data.versioning import _repo, adopt_stages, configure_remote, push, stage_locks
    from v2m.config import DvcConfig
    gpu_host = mix_project
    make_mixes(gpu_host / "data/mixes")
    p = load_params(gpu_host / "params.yaml")
    track_raw(gpu_host, p.data.input_dir)
    assert reproduce(gpu_host, ["separate"]) == ["separate@data/mixes"]
    remote = DvcConfig(remote="local", local_url=str(tmp_path / "dvc-remote"))
    assert push(gpu_host, remote) > 0
    lock = stage_locks(gpu_host, "separate")
    assert list(lock) == ["separate@data/mixes"]

    cpu_host = tmp_path / "cpu-host"  # the same commit (code, params, data/mixes.dvc), nothing it did not make
    shutil.copytree(gpu_host, cpu_host, ignore=shutil.ignore_patterns("raw", "mixes", "cache", "dvc.lock", "tmp"))
    assert not (cpu_host / "data/raw").exists() and not (cpu_host / "dvc.lock").exists()
    configure_remote(cpu_host, remote)
    with _repo(cpu_host) as repo:  # the songs, as tasks/handoff.py pull_raw does at the clone's data/mixes.dvc
        assert repo.pull(targets=["data/mixes.dvc"])["stats"]["fetched"] > 0
    assert adopt_stages(cpu_host, remote, lock) > 0
    assert reproduce(cpu_host, ["validate"]) == ["validate"]  # separate is done: its lock entry matches here
    for line in read_jsonl(cpu_host / "data/raw/separation.jsonl"):
        if line["status"] == "ok":
            a, b = (read_audio(h / "data/raw" / line["track_id"] / "vocals.wav")[0] for h in (gpu_host, cpu_host))
            assert np.array_equal(a, b)


def test_the_prepare_data_flow_separates_first_when_the_source_is_songs(mix_project: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.prepare_data import prepare_data
    make_mixes(mix_project / "data/mixes")
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-storage"))
    with prefect_test_harness(server_startup_timeout=120):
        version = prepare_data(project_dir=str(mix_project))
    assert version["stages_run"][:2] == ["separate@data/mixes", "validate"]
    assert version["stages_run"][-2:] == ["cache_musicgen", "cache_audioldm"]
    assert version["raw_changed"] is True and (mix_project / "data/mixes.dvc").is_file()
    assert not (mix_project / "data/raw.dvc").exists()  # data/raw is the stage's output, not the user's input
    assert version["stats"]["tracks"] == 3 and version["stats"]["quarantined"] == 1
    assert {"data/raw", "data/mixes"} <= set(version["outputs"])  # both in the data version
