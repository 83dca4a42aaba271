"""The blind listening test across hosts, for test_team_hosts.py: evaluation runs that carry the audio `v2m listen`
plays (so the listening host needs no model), `v2m listen` started in a host's own folder with the cpu role's
environment, and invited listeners who vote through its HTTP API by what they hear."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import requests
import soundfile as sf

from v2m.stack import NOT_INHERITED, Stack

SR = 16_000
LINK = re.compile(r"invitation for (\S+): (\S+)#invite=(\S+)")


def log_eval_audio(params, root: Path, backend: str, eval_run_id: str, hz: float, tmp: Path) -> None:
    """Give an evaluation run what a real one logs for the listening test (tasks/listening/clips.py reuses it):
    per test chunk a vocal and the model's output (here a silent vocal and a pure tone of `hz`), with the
    evaluation settings and the data version a fresh clone has."""
    from mlflow.tracking import MlflowClient

    from tasks.evaluation.evaluate import eval_chunks
    cfg, client = params.evaluation, MlflowClient()
    duration = params.listening.duration_s or cfg.duration_s
    for key, value in {"split": cfg.split, "seed": cfg.seed, "duration_s": duration}.items():
        client.log_param(eval_run_id, key, value)
    client.set_tag(eval_run_id, "data_version", "unversioned")  # tasks/training/finetune.py data_version_of
    folder = tmp / eval_run_id
    folder.mkdir(parents=True)
    t = np.arange(int(duration * SR)) / SR
    for chunk in eval_chunks(params, root, backend)[: params.listening.max_chunks]:
        sf.write(folder / f"{chunk['chunk_id']}_vocal.wav", np.zeros_like(t), SR)
        sf.write(folder / f"{chunk['chunk_id']}_output.wav", 0.5 * np.sin(2 * np.pi * hz * t), SR)
    client.log_artifacts(eval_run_id, str(folder), "audio")


def start_listen(stack: Stack, folder: Path, backend: str, names: list[str], log: Path) -> subprocess.Popen:
    """`v2m listen` as a person on another machine runs it: in that machine's clone, with the stack's URLs and
    the cpu role's credentials only (the votes' database among them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)}
    env |= stack.client_env("cpu") | {"PREFECT_HOME": str(folder / ".prefect")}
    cmd = [str(Path(sys.executable).parent / "v2m"), "listen", "--backend", backend,
           *(arg for name in names for arg in ("--invite", name))]
    return subprocess.Popen(cmd, cwd=folder, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def invitations(proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> dict[str, tuple[str, str]]:
    """name -> (page URL, token) from what `v2m listen` printed, once its server answers."""
    deadline = time.monotonic() + timeout_s
    while "listening test: " not in (text := log.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, text[-3000:]
        time.sleep(0.5)
    links = {m[1]: (m[2], m[3]) for m in LINK.finditer(text)}
    url = next(iter(links.values()))[0]
    while True:
        try:
            if requests.get(f"{url}/api/whoami", timeout=5).status_code == 200:
                return links
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.3)


def dominant_hz(wav: bytes) -> float:
    audio, sr = sf.read(io.BytesIO(wav))
    return float(np.argmax(np.abs(np.fft.rfft(audio))) * sr / len(audio))


def vote_by_ear(url: str, token: str) -> list[dict]:
    """One invited listener's session: both sides of every trial heard, the higher-pitched one chosen."""
    auth = {"Authorization": f"Bearer {token}"}
    session = requests.post(f"{url}/api/session", json={}, headers=auth, timeout=30)
    assert session.status_code == 200, session.text
    ballots = []
    for trial in session.json()["trials"]:
        pitch = {side: dominant_hz(requests.get(f"{url}/audio/{trial['trial_id']}/{side}", timeout=30).content)
                 for side in "AB"}
        r = requests.post(f"{url}/api/votes", headers=auth, timeout=30, json={
            "vote_id": uuid.uuid4().hex, "trial_id": trial["trial_id"], "answer": max(pitch, key=pitch.get)})
        assert r.status_code == 200, r.text
        ballots.append(r.json())
    return ballots
