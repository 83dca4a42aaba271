"""`v2m data import`: MUSDB-like, MoisesDB-like and plain stem folders made here, and the real stem file that
stempeg ships (MUSDB18's .stem.mp4 format, decoded by ffmpeg), into the raw layout that validate accepts."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from tasks.data.importers import import_dataset
from tasks.data.track_cache import read_jsonl
from tasks.data.validate import validate_dataset
from v2m.config import ValidateConfig

SR = 22050


def tone(seed: int, seconds: float = 6.0, channels: int = 2, sr: int = SR) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = 0.15 * np.sin(2 * np.pi * (110 + 40 * seed) * t) + 0.01 * rng.standard_normal(t.size)
    return np.stack([y * (1 - 0.2 * c) for c in range(channels)], axis=1).astype(np.float32)


def rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["track_id"]: r for r in csv.DictReader(f)}


def v2m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "v2m.cli", *args], capture_output=True, text=True, timeout=300)


def test_musdb_hq_folders(tmp_path: Path) -> None:
    src = tmp_path / "musdb18hq"
    stems = {}
    for split, name in (("train", "Artist A - Song One"), ("test", "Band B - Second Song")):
        folder = src / split / name
        folder.mkdir(parents=True)
        stems[name] = {s: tone(i) for i, s in enumerate(("drums", "bass", "other", "vocals"))}
        for s, y in stems[name].items():
            sf.write(folder / f"{s}.wav", y, SR, subtype="FLOAT")
        sf.write(folder / "mixture.wav", sum(stems[name].values()), SR, subtype="FLOAT")
    no_vocals = src / "test" / "Quiet C - Instrumental"  # a track without a vocal stem
    no_vocals.mkdir()
    for s in ("drums", "bass", "other"):
        sf.write(no_vocals / f"{s}.wav", tone(5), SR)
    (tmp_path / "labels.csv").write_text("track,genre\nBand B - Second Song,rock\n")

    res = v2m("data", "import", str(src), "--format", "musdb", "--out", str(tmp_path / "raw"), "--language", "en",
              "--metadata", str(tmp_path / "labels.csv"))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "raw"
    meta = rows(out / "metadata.csv")
    one, two = "musdb_artist_a_-_song_one", "musdb_band_b_-_second_song"
    assert set(meta) == {one, two}
    assert (meta[one]["artist"], meta[one]["title"], meta[one]["language"]) == ("Artist A", "Song One", "en")
    assert meta[two]["genre"] == "rock" and meta[one]["genre"] == ""  # from the CSV, never guessed
    assert "have no genre" in res.stderr and one in res.stderr
    inst, _ = sf.read(out / one / "instrumental.wav")
    want = stems["Artist A - Song One"]
    assert np.allclose(inst, want["drums"] + want["bass"] + want["other"], atol=1e-4)  # 16-bit; mixture.wav not used
    assert np.allclose(sf.read(out / one / "vocals.wav")[0], want["vocals"], atol=1e-4)  # 16-bit
    report = {line["track_id"]: line for line in read_jsonl(out / "import.jsonl")}
    assert report["musdb_quiet_c_-_instrumental"]["status"] == "quarantined"
    assert report["musdb_quiet_c_-_instrumental"]["reason"] == "missing_stem"

    # validate reads the layout: the track without a genre and the one without vocals are quarantined, with reasons
    v = validate_dataset(out, tmp_path / "validated", ValidateConfig(), workers=1)
    assert [t["track_id"] for t in v["accepted"]] == [two]
    reasons = {q["track_id"]: (q["reason"], q["message"]) for q in v["quarantined"]}
    assert reasons[one][0] == "metadata_invalid" and "genre is empty" in reasons[one][1]
    assert reasons["musdb_quiet_c_-_instrumental"][0] == "missing_stem"

    # importing again redoes nothing, and keeps what is there; a second dataset into the same folder adds to it
    mtime = (out / one / "vocals.wav").stat().st_mtime_ns
    assert v2m("data", "import", str(src), "--format", "musdb", "--out", str(out), "--genre", "pop").returncode == 0
    assert (out / one / "vocals.wav").stat().st_mtime_ns == mtime
    assert rows(out / "metadata.csv")[one]["genre"] == "pop"


def test_moisesdb_folders(tmp_path: Path) -> None:
    track = tmp_path / "moisesdb" / "moisesdb_v0.1" / "0a1b2c3d-0000-4000-8000-00000000beef"
    parts = {("vocals", "lead", "v1"): tone(1), ("vocals", "backing", "v2"): tone(2),
             ("guitar", "electric", "g1"): tone(3, channels=1), ("drums", "kit", "d1"): tone(4, seconds=5.5)}
    spec: dict = {"artist": "Duo D", "song": "Night Drive", "genre": "pop", "stems": []}
    for (stem, kind, tid), y in parts.items():
        (track / stem).mkdir(parents=True, exist_ok=True)
        sf.write(track / stem / f"{tid}.wav", y, SR, subtype="FLOAT")
        entry = next((s for s in spec["stems"] if s["stemName"] == stem), None)
        if entry is None:
            entry = {"stemName": stem, "id": stem, "tracks": []}
            spec["stems"].append(entry)
        entry["tracks"].append({"id": tid, "trackType": kind, "extension": "wav", "has_bleed": False})
    (track / "data.json").write_text(json.dumps(spec))

    res = import_dataset("moisesdb", tmp_path / "moisesdb", tmp_path / "raw", {"language": "es"})
    tid = "moisesdb_0a1b2c3d-0000-4000-8000-00000000beef"
    assert [line["status"] for line in res["report"]] == ["ok"] and not res["lacking"]
    meta = rows(tmp_path / "raw" / "metadata.csv")[tid]
    assert (meta["artist"], meta["title"], meta["genre"], meta["language"]) == ("Duo D", "Night Drive", "pop", "es")
    vocals, _ = sf.read(tmp_path / "raw" / tid / "vocals.wav")
    inst, _ = sf.read(tmp_path / "raw" / tid / "instrumental.wav")
    # lead + backing vocals; guitar (mono) + drums (shorter): channels differ, so the instrumental is a mono sum
    assert np.allclose(vocals, parts[("vocals", "lead", "v1")] + parts[("vocals", "backing", "v2")], atol=1e-4)  # 16-bit
    drums = np.pad(parts[("drums", "kit", "d1")].mean(axis=1), (0, int(0.5 * SR)))
    assert inst.ndim == 1 and np.allclose(inst, parts[("guitar", "electric", "g1")][:, 0] + drums, atol=1e-4)  # 16-bit


def test_a_folder_of_stems_by_name_patterns(tmp_path: Path) -> None:
    song = tmp_path / "stems" / "my_song"
    song.mkdir(parents=True)
    for name, seed in (("Lead Vocal", 1), ("Guitar", 2), ("Keys", 3), ("Full Mix", 4)):
        sf.write(song / f"{name}.wav", tone(seed), SR, subtype="FLOAT")
    res = import_dataset("stems", tmp_path / "stems", tmp_path / "raw",
                         {"artist": "Me", "genre": "folk", "language": "fr"})
    assert res["report"][0]["status"] == "ok" and res["report"][0]["vocal_files"] == 1
    inst, _ = sf.read(tmp_path / "raw" / "my_song" / "instrumental.wav")
    assert np.allclose(inst, tone(2) + tone(3), atol=1e-4)  # the full mix is skipped, not counted as accompaniment
    assert rows(tmp_path / "raw" / "metadata.csv")["my_song"]["title"] == "my_song"


def test_the_stem_mp4_that_stempeg_ships(tmp_path: Path) -> None:
    assert shutil.which("ffmpeg") and shutil.which("ffprobe"), \
        "ffmpeg is not installed: `make test` installs it (apt-get install ffmpeg)"
    import stempeg
    src = tmp_path / "musdb18" / "test"
    src.mkdir(parents=True)
    shutil.copy(stempeg.example_stem_path(), src)
    res = import_dataset("musdb", tmp_path / "musdb18", tmp_path / "raw", {"genre": "rock", "language": "en"})
    tid = "musdb_the_easton_ellises_-_falcon_69"
    assert res["report"][0]["status"] == "ok" and res["report"][0]["track_id"] == tid
    streams, sr = stempeg.read_stems(str(stempeg.example_stem_path()), dtype=np.float32)
    vocals, vsr = sf.read(tmp_path / "raw" / tid / "vocals.wav", dtype="float32")
    inst, _ = sf.read(tmp_path / "raw" / tid / "instrumental.wav", dtype="float32")
    assert vsr == sr == 44100 and vocals.shape == streams[4].shape  # stereo, ~6 s
    assert np.allclose(vocals, streams[4], atol=1e-4) and np.allclose(inst, streams[1:4].sum(axis=0), atol=1e-4)
    meta = rows(tmp_path / "raw" / "metadata.csv")[tid]
    assert (meta["artist"], meta["title"]) == ("The Easton Ellises", "Falcon 69")
    v = validate_dataset(tmp_path / "raw", tmp_path / "validated", ValidateConfig(), workers=1)
    assert [t["track_id"] for t in v["accepted"]] == [tid]
