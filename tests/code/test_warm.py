"""Warm starts (v2m/warm.py): a launcher hands its process to a zygote's fork, which runs the module with the
launcher's environment, folder and standard streams; its exit status, signals and death travel both ways;
without a zygote the launcher runs the module itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1].parent
PROBE = "tests.code.warm_probe"


@pytest.fixture
def zygote(tmp_path: Path):
    """A zygote that preloaded `json` (the real one preloads torch and the rest: slow for a unit test)."""
    sock = tmp_path / "warm.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "v2m.warm", "serve", str(sock), "json"], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    yield proc, sock
    proc.kill()
    proc.wait()


def launch(sock: Path | None, cwd: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROBE": "from the launcher",
           "V2M_WARM_SOCKET": str(sock) if sock else ""}
    return subprocess.Popen([sys.executable, "-m", "v2m.warm", "run", PROBE, *args], cwd=cwd, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_the_module_runs_in_a_fork_of_the_zygote_as_the_launchers_process(zygote, tmp_path: Path) -> None:
    proc, sock = zygote
    run = launch(sock, tmp_path, "exit", "3")
    out, err = run.communicate("a line on stdin\n", timeout=60)
    probe = json.loads(out.splitlines()[0])
    assert run.returncode == 3, err  # the module's exit status is the launcher's
    assert probe["ppid"] == proc.pid and probe["pid"] != run.pid  # forked by the zygote, not started anew
    assert probe["json_loaded"]  # what the zygote preloaded is there already
    assert probe["project_modules"] == []  # no project module of the zygote's survives into the child
    assert probe["cwd"] == str(tmp_path) and probe["probe_env"] == "from the launcher"
    assert probe["argv"] == ["exit", "3"] and probe["stdin"] == "a line on stdin"
    assert "to stderr" in err


def test_signals_reach_the_child_and_a_killed_launcher_takes_its_child(zygote, tmp_path: Path) -> None:
    _, sock = zygote
    run = launch(sock, tmp_path, "sleep")
    run.stdin.write("\n")
    run.stdin.flush()
    child = json.loads(run.stdout.readline())["pid"]
    run.send_signal(signal.SIGTERM)  # cancellation: the worker signals its flow run's process
    assert run.wait(timeout=30) == -signal.SIGTERM  # ... and the launcher ends as the child ended
    assert not alive(child)

    run = launch(sock, tmp_path, "sleep")
    run.stdin.write("\n")
    run.stdin.flush()
    child = json.loads(run.stdout.readline())["pid"]
    run.kill()  # the launcher is lost (its worker killed): the zygote ends its child
    run.wait(timeout=30)
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the child outlived its launcher"
        time.sleep(0.1)


def test_without_a_zygote_the_launcher_runs_the_module_itself(tmp_path: Path) -> None:
    for sock in (None, tmp_path / "nobody-listens.sock"):
        run = launch(sock, tmp_path, "exit", "0")
        out, err = run.communicate("\n", timeout=60)
        assert run.returncode == 0, err
        assert json.loads(out.splitlines()[0])["pid"] == run.pid  # exec'd: the same process


def test_the_zygote_refuses_to_preload_numba(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", "from v2m.warm import preload; preload(['numba'])"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert res.returncode != 0 and "imported numba" in res.stderr


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not status.exists() or "Z" not in status.read_text().split()[2]
