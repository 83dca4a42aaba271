"""Who may use `v2m serve`, and what serve itself may use, checked when it starts.

    api_keys()              the clients' API keys, from the environment (a Kubernetes Secret, a compose .env)
    check_exposure()        no address beyond loopback without API keys: the embedded default stays open only
                            to this machine; a deployment puts keys in front, or an auth proxy with serve on
                            loopback / the pod network
    check_registry_access() the MLflow server answers serve's credentials (the `serve` role, read-only on the
                            registry): without them serve would start, never load a champion, and say so only
                            in /readyz; now it stops with the missing variable named
    rollout_permissions()   what serve's MLflow user may write, asked of the server; check_rollout_access()
                            stops serve when serve.rollout needs a write it may not do

One process, one MLflow identity: MLflow's client reads the credentials from the process environment on every
request (mlflow/utils/credentials.py), so the recorder cannot write as another user than the loader reads. The
identity is chosen by what the server must do, each role the least that does it (v2m/stack_init.py):
    serve     READ everywhere: serves, follows the alias; online.* only in /metrics (the recorder is off)
    rollout   + EDIT on experiment voice2music-online: records online.* and the shadow pairs
    rollback  + EDIT on the registered models and experiment voice2music-audit: auto_rollback moves `champion`
              back through tasks/registry/promotion.rollback (MLflow grants per registered model, so this role
              could move any alias of them: give it only to servers with auto_rollback on)
"""

from __future__ import annotations

import ipaddress
import os
import re

from v2m.errors import UserError

API_KEYS_ENV = "V2M_SERVE_API_KEYS"  # "name:key,name:key": the name is who the key is (logs, per-client limits)
MIN_KEY_CHARS = 16
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


class AccessError(UserError, ValueError):
    """serve cannot start safely as configured; the message names the variable or setting to fix."""


def api_keys(environ: dict[str, str] | None = None) -> dict[str, str]:
    """name -> key from V2M_SERVE_API_KEYS; {} when unset (no key needed)."""
    raw = (os.environ if environ is None else environ).get(API_KEYS_ENV, "").strip()
    keys: dict[str, str] = {}
    for n, entry in enumerate(filter(None, (e.strip() for e in raw.split(","))), 1):
        name, sep, key = entry.partition(":")
        if not sep or not NAME.match(name) or len(key) < MIN_KEY_CHARS or name in keys:
            raise AccessError(f"{API_KEYS_ENV}: entry {n} must be NAME:KEY with a unique NAME of letters, digits or "
                              f"._@- and a KEY of at least {MIN_KEY_CHARS} characters")
        keys[name] = key
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: dict[str, str]) -> None:
    if not keys and not is_loopback(host):
        raise AccessError(f"refusing to serve on {host} without authentication: set {API_KEYS_ENV} (NAME:KEY,...) "
                          f"or bind 127.0.0.1 behind an auth proxy")


def check_registry_access(tracking_uri: str, model_name: str, environ: dict[str, str] | None = None) -> None:
    """One read of the registered model with serve's credentials; an MLflow server that asks for credentials
    serve lacks (or refuses them) stops serve here. Local stores (sqlite, files) have no credentials."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests
    env = os.environ if environ is None else environ
    user, password = env.get("MLFLOW_TRACKING_USERNAME", ""), env.get("MLFLOW_TRACKING_PASSWORD", "")
    try:
        r = requests.get(f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/registered-models/get",
                         params={"name": model_name}, auth=(user, password) if user or password else None, timeout=30)
    except requests.RequestException as exc:
        raise AccessError(f"cannot reach the MLflow server at {tracking_uri} (MLFLOW_TRACKING_URI): "
                          f"{type(exc).__name__}") from None
    if r.status_code == 401:
        missing = [k for k, v in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)) if not v]
        if missing:
            raise AccessError(f"the MLflow server at {tracking_uri} asks for credentials: set "
                              f"{' and '.join(missing)} (the serve role's)")
        raise AccessError(f"the MLflow server at {tracking_uri} refused user {user!r}: check MLFLOW_TRACKING_PASSWORD")
    if r.status_code == 403:
        raise AccessError(f"MLflow user {user!r} may not read {model_name} at {tracking_uri}: grant it READ")


# --- serve.rollout's writes -----------------------------------------------------------------------------------
ONLINE_EXPERIMENT, AUDIT_EXPERIMENT = "voice2music-online", "voice2music-audit"
WRITE = ("EDIT", "MANAGE")


def rollout_permissions(tracking_uri: str, model_name: str, environ: dict[str, str] | None = None) -> dict[str, bool]:
    """What serve's MLflow user may write: {"record": EDIT on experiment voice2music-online, "rollback": that plus
    EDIT on `model_name` and on experiment voice2music-audit}. Asked of the server (the basic-auth app's
    `users/permissions/get` for oneself), without writing anything. Local stores: everything."""
    if not tracking_uri.startswith(("http://", "https://")):
        return {"record": True, "rollback": True}
    import requests
    env = os.environ if environ is None else environ
    user, password = env.get("MLFLOW_TRACKING_USERNAME", ""), env.get("MLFLOW_TRACKING_PASSWORD", "")
    base, auth = tracking_uri.rstrip("/"), (user, password) if user or password else None

    def may_write(kind: str, resource: str | None) -> bool:
        if resource is None:
            return False
        if auth is None:  # a server without auth: anyone writes
            return True
        r = requests.get(f"{base}/api/3.0/mlflow/users/permissions/get", auth=auth, timeout=30,
                         params={"username": user, "resource_type": kind, "resource_id": resource})
        return r.status_code == 200 and r.json().get("permission") in WRITE

    def experiment(name: str) -> str | None:
        r = requests.get(f"{base}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name},
                         auth=auth, timeout=30)
        return r.json()["experiment"]["experiment_id"] if r.status_code == 200 else None

    try:
        record = may_write("experiment", experiment(ONLINE_EXPERIMENT))
        rollback = record and may_write("registered_model", model_name) and \
            may_write("experiment", experiment(AUDIT_EXPERIMENT))
    except requests.RequestException as exc:
        raise AccessError(f"cannot reach the MLflow server at {tracking_uri} (MLFLOW_TRACKING_URI): "
                          f"{type(exc).__name__}") from None
    return {"record": record, "rollback": rollback}


def check_rollout_access(mode: str, auto_rollback: bool, allowed: dict[str, bool], model_name: str,
                         user: str) -> None:
    """A rollout that needs writes its MLflow user may not do stops serve at start, naming the role to use:
    `rollout` (records online.*), `rollback` (also moves `champion` back), both made by `v2m stack init`."""
    if auto_rollback and not allowed["rollback"]:
        raise AccessError(f"serve.rollout.auto_rollback moves {model_name}@champion and writes the audit trail: MLflow "
                          f"user {user or '(none)'!r} may not (needs EDIT on {model_name}, experiments "
                          f"{ONLINE_EXPERIMENT} and {AUDIT_EXPERIMENT}); run serve as the `rollback` role")
    if mode != "off" and not allowed["record"]:
        raise AccessError(f"serve.rollout.mode {mode} records online evidence in experiment {ONLINE_EXPERIMENT}: "
                          f"MLflow user {user or '(none)'!r} may not write there; run serve as the `rollout` role")
