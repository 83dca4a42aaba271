"""A private PostgreSQL server: the team stack's database for the listening votes, and the tests' throwaway one.

    with PrivatePostgres(dir, password="...") as pg:
        pg.create_database("listening"); pg.url("listening")   # postgresql://listening@127.0.0.1:PORT/listening

The cluster is made on first start (initdb) in `data_dir`, which keeps it across restarts. Two ways in:
- TCP on `host`, with a password (SCRAM): the role `user` has one (what every host uses), the superuser none;
- the Unix socket in the data folder, for the superuser `postgres` without a password: only the folder's owner
  (and root) can reach it, and this class uses it to create the role and the databases.
The password never reaches the server in clear: the role gets its SCRAM verifier (nothing to log).

PostgreSQL refuses to run as root: as root, the server runs as the system user `postgres`, with one capability,
CAP_DAC_READ_SEARCH, so that it can reach a data folder under directories only root may enter (pytest's
temporary folders, /root/...). Its role `user` is not a superuser, so no client can use that to read files.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from v2m.s3server import free_port

SERVER_USER = "postgres"  # the system account the server runs as when we are root (Debian's package makes it)


def bin_dir() -> Path:
    """Where initdb and postgres are: on PATH, else the newest of Debian's /usr/lib/postgresql/<version>/bin."""
    if found := shutil.which("initdb"):
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    raise FileNotFoundError("PostgreSQL's server programs (initdb, postgres) were not found on PATH or under "
                            "/usr/lib/postgresql/*/bin; install them: apt-get install postgresql")


def available() -> bool:
    try:
        bin_dir()
        return True
    except FileNotFoundError:
        return False


@dataclass
class PrivatePostgres:
    data_dir: Path
    password: str
    host: str = "127.0.0.1"
    port: int = 0
    user: str = "listening"  # the one role hosts log in as (owner of the databases made here)
    durable: bool = True  # False (tests): no fsync; a crash may lose the cluster
    log_file: Path | None = None  # default: <data_dir>/postgres.log
    proc: subprocess.Popen | None = None

    @property
    def socket_dir(self) -> Path:
        """The cluster folder, unless its path is too long for a Unix socket (107 bytes with the socket's own
        name, `.s.PGSQL.<port>`; pytest-xdist's temporary folders pass it): then a folder of its own under /tmp,
        named after the cluster's path, reachable like the cluster by the server's account only."""
        cluster = Path(self.data_dir).resolve() / "cluster"
        if len(str(cluster)) <= 80:
            return cluster
        import hashlib
        return Path("/tmp") / f"v2m-pg-{hashlib.sha256(str(cluster).encode()).hexdigest()[:16]}"

    def url(self, database: str) -> str:
        """The URL hosts use; it holds no password (that travels in the environment)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    # --- start -------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> "PrivatePostgres":
        self.launch()
        self.wait_ready(timeout_s)
        return self

    def launch(self) -> None:
        """initdb on first use, then start the server (detached: its own session)."""
        self.data_dir = Path(self.data_dir).resolve()
        cluster = self.data_dir / "cluster"
        if not (cluster / "PG_VERSION").is_file():
            self._initdb(cluster)
        self.port = self.port or free_port()
        if self.socket_dir != cluster:
            self._private_socket_folder(self.socket_dir)
        settings = {"listen_addresses": self.host, "port": self.port, "unix_socket_directories": self.socket_dir,
                    "shared_buffers": "32MB", "max_connections": 40, "password_encryption": "scram-sha-256"}
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        cmd = [str(bin_dir() / "postgres"), "-D", str(cluster), *(f"-c{k}={v}" for k, v in settings.items())]
        log = open(self.log_file or self.data_dir / "postgres.log", "ab")
        self.proc = subprocess.Popen(self._as_server_user(cmd), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _initdb(self, cluster: Path) -> None:
        shutil.rmtree(cluster, ignore_errors=True)  # a half-made one from an interrupted first start
        cluster.mkdir(parents=True, mode=0o700)
        for path in (self.data_dir, cluster):
            self._own_folder(path)
        cmd = [str(bin_dir() / "initdb"), "-D", str(cluster), "-U", "postgres", "-E", "UTF8", "--locale=C",
               "--auth-local=trust", "--auth-host=reject", *([] if self.durable else ["--no-sync"])]
        res = subprocess.run(self._as_server_user(cmd), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed in {cluster}: {res.stdout[-1000:]}{res.stderr[-1000:]}")
        # The socket (superuser, no password) is reachable by the data folder's owner only; TCP needs a password,
        # and the superuser has none.
        (cluster / "pg_hba.conf").write_text(
            "local all postgres trust\nhost all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")

    @staticmethod
    def _own_folder(path: Path) -> None:
        """`path` exists and, as root, belongs to the account the server runs as (mode 700 when made here)."""
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise RuntimeError(f"PostgreSQL does not run as root and there is no system user {SERVER_USER!r} "
                                   "to run it as (Debian's postgresql package makes one)") from None
            os.chown(path, account.pw_uid, account.pw_gid)

    def _private_socket_folder(self, path: Path) -> None:
        """The socket folder under /tmp: the superuser's socket (trusted without a password) goes there, and
        anyone may create a name in /tmp first. Made here with mode 700 for the server's account; one that is
        already there is used only when it is a real folder of that account's, closed to others."""
        uid = pwd.getpwnam(SERVER_USER).pw_uid if os.geteuid() == 0 else os.geteuid()
        try:
            os.mkdir(path, 0o700)
            os.lchown(path, uid, -1)
            return
        except FileExistsError:
            pass
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
            raise RuntimeError(f"{path}: PostgreSQL's socket folder already exists and is not a private folder of "
                               f"uid {uid} (mode 700); remove it, or start the server from a shorter data folder")

    @staticmethod
    def _as_server_user(cmd: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return cmd
        return ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups",
                "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", *cmd]

    def _admin(self, database: str = "postgres"):
        import psycopg
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres",
                               dbname=database, autocommit=True, connect_timeout=5)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the server answers; then the role exists with the current password."""
        import psycopg
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}; see {self.log_file or self.data_dir}")
            try:
                with self._admin() as db:
                    verifier = db.pgconn.encrypt_password(self.password.encode(), self.user.encode(),
                                                          b"scram-sha-256").decode()
                    exists = db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,)).fetchone()
                    verb = "ALTER" if exists else "CREATE"
                    db.execute(f'{verb} ROLE "{self.user}" LOGIN NOSUPERUSER PASSWORD {_literal(verifier)}')
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"postgres in {self.data_dir} not ready after {timeout_s} s: {exc}") from None
                time.sleep(0.2)

    def create_database(self, name: str) -> str:
        """A database owned by the role (nothing if it exists); returns its URL."""
        with self._admin() as db:
            if not db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                db.execute(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return self.url(name)

    # --- stop --------------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 15.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected, the data is checkpointed), SIGKILL if it hangs."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        if self.socket_dir.parent == Path("/tmp"):
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> "PrivatePostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _literal(text: str) -> str:
    """A SQL string literal (DDL takes no bound parameters); the verifier holds no quote, but be exact."""
    return "'" + text.replace("'", "''") + "'"
