"""Nothing open on the network: every service of the team stack refuses a request without credentials or with
wrong ones, and each S3 role reaches only its own buckets. The secrets stay out of the logs."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
from botocore.exceptions import ClientError

from tests.flows.conftest import stop_stack
from v2m.s3server import SeaweedS3
from v2m.stack import Stack


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    st = Stack(tmp_path_factory.mktemp("auth") / "stack")
    state = st.up(servers_only=True, gpus=3)
    yield st, state
    stop_stack(st)


def status(url: str, auth: tuple[str, str] | None = None, auth_string: str = "", data: bytes | None = None) -> int:
    """HTTP status of a request with HTTP basic credentials (a user and password, or Prefect's auth string)."""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth or auth_string:
        token = auth_string or ":".join(auth)
        req.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_mlflow_asks_for_a_user_and_knows_each_role(servers) -> None:
    st, state = servers
    api = state["mlflow_url"] + "/api/2.0/mlflow/experiments/search"
    body = json.dumps({"max_results": 1}).encode()
    creds = st.credentials()["mlflow"]
    assert status(api, data=body) == 401
    assert status(api, ("cpu", "wrong-password"), data=body) == 401
    assert status(api, ("nobody", creds["cpu"]), data=body) == 401
    for user in ("cpu", "gpu", "admin"):
        assert status(api, (user, creds[user]), data=body) == 200, user


def test_prefect_asks_for_its_auth_string(servers) -> None:
    st, state = servers
    api = state["prefect_url"] + "/api/flows/filter"
    good = st.credentials()["prefect_auth"]
    assert status(api, data=b"{}") == 401
    assert status(api, auth_string="v2m:wrong", data=b"{}") == 401
    assert status(api, auth_string=good, data=b"{}") == 200, "the right auth string was refused"


def test_the_gpu_limit_is_the_configured_gpu_count(servers) -> None:
    st, state = servers
    req = urllib.request.Request(state["prefect_url"] + "/api/concurrency_limits/tag/gpu", headers={
        "Authorization": "Basic " + base64.b64encode(st.credentials()["prefect_auth"].encode()).decode()})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.loads(r.read())["concurrency_limit"] == 3  # up(gpus=3): all GPU hosts together


def test_s3_keys_per_role_reach_only_their_buckets(servers) -> None:
    st, state = servers
    keys = st.credentials()["s3"]
    s3 = SeaweedS3(st.state_dir / "unused", s3_port=int(state["s3_url"].rsplit(":", 1)[1]),
                   access_key=keys["admin"]["access_key"], secret_key=keys["admin"]["secret_key"])

    def client(role: str, secret: str = ""):
        return s3.client(keys[role]["access_key"], secret or keys[role]["secret_key"])

    client("cpu").put_object(Bucket="v2m-dvc", Key="probe", Body=b"1")
    assert client("gpu").get_object(Bucket="v2m-dvc", Key="probe")["Body"].read() == b"1"
    client("gpu").put_object(Bucket="v2m-checkpoints", Key="probe", Body=b"1")
    refused = [(lambda: client("gpu").put_object(Bucket="v2m-dvc", Key="x", Body=b"1")),   # gpu reads data only
               (lambda: client("cpu").list_objects_v2(Bucket="v2m-mlflow")),              # artifacts: MLflow's
               (lambda: client("gpu").list_objects_v2(Bucket="v2m-mlflow")),
               (lambda: client("mlflow").list_objects_v2(Bucket="v2m-dvc")),
               (lambda: client("cpu", "wrong-secret").list_objects_v2(Bucket="v2m-dvc")),
               (lambda: s3.client("unknown-key", "x").list_objects_v2(Bucket="v2m-dvc"))]
    for i, call in enumerate(refused):
        with pytest.raises(ClientError):
            call()
            pytest.fail(f"request {i} was allowed")
    assert status(state["s3_url"] + "/v2m-dvc/probe") == 403  # anonymous


def test_secrets_stay_out_of_logs_and_state(servers) -> None:
    st, _ = servers
    creds = st.credentials()
    secrets = [creds["prefect_auth"].split(":", 1)[1], *creds["mlflow"].values(),
               *(k["secret_key"] for k in creds["s3"].values())]
    texts = [p.read_text(errors="replace") for p in (st.state_dir / "logs").glob("*.log")]
    texts += [(st.state_dir / "state.json").read_text(), (st.state_dir / "mlflow-auth.ini").read_text()]
    for text in texts:
        assert not any(s in text for s in secrets)
    assert (st.state_dir / "credentials.json").stat().st_mode & 0o077 == 0
