"""The registry lease (tasks/registry/lease.py) between processes that share nothing but the MLflow store:
each runs in its own project folder (so no file lock could be shared), against one SQLite store, as two
hosts would against one MLflow server. A holder is killed (crash) or frozen (a stall past the TTL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks.registry.lease import BROKEN, lease_name, registry_lease

ROOT = Path(__file__).resolve().parents[2]
MODEL = "voice2music-musicgen"

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tasks.registry.lease import LeaseLost, registry_lease
    folder, ttl = Path(sys.argv[1]), float(sys.argv[2])
    with registry_lease("voice2music-musicgen", ttl_s=ttl, wait_s=60, purpose="test holder") as lease:
        print("held", lease.ticket, flush=True)
        while not (folder / "go").exists():
            time.sleep(0.05)
        try:
            lease.check()
            print("still held", flush=True)
        except LeaseLost as exc:
            print("lost:", exc, flush=True)
""")


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    import mlflow
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def start_holder(folder: Path, ttl_s: float) -> tuple[subprocess.Popen, int]:
    """A process in its own folder that takes the lease and holds it until `folder/go` exists."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(ttl_s)], cwd=folder, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline()
    assert line.startswith("held"), proc.stderr.read()[-3000:]
    return proc, int(line.split()[1])


def test_one_holder_at_a_time_across_project_folders_then_the_next_in_line(store, tmp_path: Path) -> None:
    first, ticket = start_holder(tmp_path / "host-a", ttl_s=30)
    try:
        with pytest.raises(TimeoutError, match="test holder"):  # host B waits for host A, and says for whom
            with registry_lease(MODEL, ttl_s=30, wait_s=1.5):
                pytest.fail("two holders at once")
        (tmp_path / "host-a" / "go").touch()
        out, err = first.communicate(timeout=60)
        assert "still held" in out, err[-2000:]
        t0 = time.monotonic()
        with registry_lease(MODEL, ttl_s=30, wait_s=30) as lease:  # released: the next ticket holds at once
            assert lease.ticket > ticket
            assert time.monotonic() - t0 < 10
    finally:
        first.kill()


def test_a_killed_holders_lease_lapses_after_its_ttl(store, tmp_path: Path) -> None:
    holder, ticket = start_holder(tmp_path / "host-a", ttl_s=2)
    holder.send_signal(signal.SIGKILL)  # a crash: no release, no heartbeat
    holder.wait(timeout=30)
    t0 = time.monotonic()
    with registry_lease(MODEL, ttl_s=2, wait_s=60):
        waited = time.monotonic() - t0
    assert waited < 30, waited
    tags = MlflowClient().get_model_version(lease_name(MODEL), str(ticket)).tags
    assert "not renewed" in tags[BROKEN]


def test_a_holder_that_stalled_past_its_ttl_finds_it_lost_and_writes_nothing(store, tmp_path: Path) -> None:
    holder, _ = start_holder(tmp_path / "host-a", ttl_s=2)
    try:
        holder.send_signal(signal.SIGSTOP)  # frozen: its heartbeat stops with it
        with registry_lease(MODEL, ttl_s=2, wait_s=60):  # taken over once the TTL has passed
            (tmp_path / "host-a" / "go").touch()
            holder.send_signal(signal.SIGCONT)
            out, err = holder.communicate(timeout=60)
        assert "lost:" in out and "still held" not in out, (out, err[-2000:])
    finally:
        holder.kill()
