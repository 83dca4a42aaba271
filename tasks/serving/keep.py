"""Opt-in (serve.rollout.keep_audio): a sample of shadow pairs kept on this server's disk for a listening test.

Production audio is not stored by default: without keep_audio nothing of a request is written anywhere. With it,
a `keep_share` of the shadow pairs, at most `keep_per_day` a day, goes to

    <audio_dir>/<YYYY-MM-DD>/<random id>/vocal.flac, champion.flac, challenger.flac, pair.json

(pair.json: the two model versions, the prompt, seed, duration and the online scores; no client id, address or
time finer than the day). Folders of days past `retention_days` are deleted at start and when a new day's
first pair is kept. The files stay on this machine: nothing here sends them to MLflow.
"""

from __future__ import annotations

import calendar
import json
import secrets
import shutil
import threading
import time
from pathlib import Path

import soundfile as sf

from models.longform import Request
from tasks.serving.batcher import Result
from tasks.serving.online import Pair, utc_day
from v2m.config_serve import RolloutConfig


class Keeper:
    def __init__(self, cfg: RolloutConfig, root: Path):
        self.cfg = cfg
        self.dir = (Path(root) / cfg.audio_dir).resolve()
        self._rng = secrets.SystemRandom()
        self._lock = threading.Lock()
        self.sweep()

    def offer(self, req: Request, champion: Result, challenger: Result, pair: Pair) -> Path | None:
        """Keep this pair if it is drawn and today's quota is not used up; the folder written, else None."""
        if self._rng.random() >= self.cfg.keep_share:
            return None
        day = self.dir / utc_day()
        with self._lock:
            if not day.is_dir():
                self.sweep()  # a new day: the oldest one may have passed its retention
            elif sum(1 for _ in day.iterdir()) >= self.cfg.keep_per_day:
                return None
            folder = day / secrets.token_hex(8)
            folder.mkdir(parents=True)
        if req.vocal is not None:
            sf.write(folder / "vocal.flac", req.vocal, req.vocal_sr)
        for name, r in (("champion", champion), ("challenger", challenger)):
            sf.write(folder / f"{name}.flac", r.audio, r.sample_rate)
        (folder / "pair.json").write_text(json.dumps({
            "champion": pair.champion, "challenger": pair.challenger, "day": pair.day, "prompt": req.prompt,
            "seed": req.seed, "duration_s": req.duration_s, "scores": pair.scores}, indent=1, default=str))
        return folder

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete the day folders past retention_days; returns the days deleted."""
        if not self.dir.is_dir():
            return []
        cutoff = (time.time() if now is None else now) - self.cfg.retention_days * 86400
        gone = []
        for day in sorted(self.dir.iterdir()):
            try:
                end_of_day = calendar.timegm(time.strptime(day.name, "%Y-%m-%d")) + 86400  # UTC days
            except ValueError:  # not a day folder of ours: leave it
                continue
            if end_of_day < cutoff:
                shutil.rmtree(day, ignore_errors=True)
                gone.append(day.name)
        return gone
