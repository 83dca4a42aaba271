"""v2m/postgres.py: a data folder too deep for a Unix socket puts the socket in a private folder under /tmp."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from v2m.postgres import PrivatePostgres


def deep(tmp_path: Path) -> Path:
    return tmp_path / ("d" * 60) / ("e" * 60) / "postgres"  # past the 107 bytes of a socket path


def test_a_deep_data_folder_serves_through_a_private_socket_folder_removed_at_stop(tmp_path: Path) -> None:
    with PrivatePostgres(deep(tmp_path), password=secrets.token_urlsafe(12), durable=False) as pg:
        sock = pg.socket_dir
        assert sock.parent == Path("/tmp") and (os.lstat(sock).st_mode & 0o777) == 0o700
        pg.create_database("probe")  # through the superuser's socket
        assert pg.url("probe").endswith("/probe")
    assert not sock.exists()


@pytest.mark.parametrize("plant", ["open folder", "symlink"])
def test_a_socket_folder_someone_made_first_is_refused(tmp_path: Path, plant: str) -> None:
    pg = PrivatePostgres(deep(tmp_path), password="x", durable=False)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    if plant == "symlink":
        pg.socket_dir.symlink_to(target)
    else:
        pg.socket_dir.mkdir(mode=0o777)
        os.chmod(pg.socket_dir, 0o777)
    try:
        with pytest.raises(RuntimeError, match="not a private folder"):
            pg.start(timeout_s=20)
        assert pg.proc is None and (target.stat().st_mode & 0o777) == 0o755 and target.stat().st_uid == os.getuid()
    finally:
        pg.socket_dir.unlink() if pg.socket_dir.is_symlink() else shutil.rmtree(pg.socket_dir, ignore_errors=True)
