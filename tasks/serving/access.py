"""Who may use `v2m serve`, and what serve itself may use, checked when it starts.

    api_keys()              the clients' API keys, from the environment (a Kubernetes Secret, a compose .env)
    check_exposure()        no address beyond loopback without API keys: the embedded default stays open only
                            to this machine; a deployment puts keys in front, or an auth proxy with serve on
                            loopback / the pod network
    check_registry_access() the MLflow server answers serve's credentials (the `serve` role, read-only on the
                            registry): without them serve would start, never load a champion, and say so only
                            in /readyz; now it stops with the missing variable named
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
