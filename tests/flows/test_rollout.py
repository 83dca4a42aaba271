"""Evidence from production, end to end: real `v2m serve` processes over one MLflow registry of tiny versions.

    shadow   v1 answers, v2 shadows every request of a bounded client loop of hidden-like vocals (chorales the
             demo data never used); the pairs reach MLflow, and `v2m rollout status` agrees with a computation
             made here from scratch (the two versions loaded in this process, the same seeds, the evaluation's
             metric functions, the promotion gates' bootstrap)
    canary   v3 (its decoder scaled to silence) answers a share of the clients, fails the sanity bound, and is
             taken out of the canary; the champion's clients see nothing of it
    rollback v3 is promoted; the server rolls it back within the window through the registry (audited like
             `v2m rollback`) while a client keeps sending, and no request fails

Each server gets its own params file; the registry and the audit trail are shared. Clients of the canary come
from their own loopback addresses (the client id the canary hashes).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import soundfile as sf
import yaml

from tasks.serving.rollout import in_canary
from tests.conftest import ROOT
from tests.flows.serving_support import (hidden_vocals, register_tiny, set_champion, start_server, stop_server,
                                         wait_ready, write_params)
from v2m.config import load_params
from v2m.s3server import free_port

MODEL = "voice2music-musicgen"
SR, SECONDS, N_REQUESTS = 32000, 1.0, 10
KEY = "rollout-test-key-0123456789"
# A test waits for scores, not for a budget; the harmonic-fit bound is out of reach of random tiny models (the
# silent one fails on sanity, which reads the raw output).
FAST = {"score_cpu": 2.0, "background_nice": 0, "record_every_s": 1.0, "min_harmonic_fit": -0.5}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    write_params(root)
    versions = {"v1": register_tiny(root, seed=1), "v2": register_tiny(root, seed=2),
                "silent": register_tiny(root, seed=3, gain=0.0)}
    set_champion(root, versions["v1"])
    return root, versions


def running(root: Path, name: str, **serve):
    """A `v2m serve` on its own params file (serve: overrides); yields (client, base url, log)."""
    write_params(root, name=f"{name}.yaml", **serve)
    port, log = free_port(), root / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "V2M_SERVE_API_KEYS")}
    proc = start_server(root, port, log, env={**env, "V2M_ROLLOUT_KEY": KEY}, params=f"{name}.yaml")
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc, log, timeout_s=180)
    deadline = time.monotonic() + 120
    while httpx.get(base + "/readyz").json()["rollout"]["challenger"] is None and time.monotonic() < deadline:
        time.sleep(0.3)
    return proc, base, log


def wav(audio: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="WAV")
    return buf.getvalue()


def post(base: str, vocal: np.ndarray | None, seed: int, prompt: str | None = None, addr: str = "127.0.0.1",
         duration: float = SECONDS) -> httpx.Response:
    data = {"duration": str(duration), "seed": str(seed)} | ({"prompt": prompt} if prompt else {})
    with httpx.Client(transport=httpx.HTTPTransport(local_address=addr), timeout=120) as c:
        return c.post(base + "/v1/generate", data=data, files={"vocal": ("take.wav", wav(vocal))} if vocal is not None
                      else None)


def metric(base: str, line_start: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


# --- shadow ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shadow(registry):
    root, versions = registry
    # max_batch 1: a MusicGen output reproduces from its seed only when it ran alone (models/longform.py)
    proc, base, log = running(root, "shadow", poll_s=0.5, max_batch=1, rollout={
        "mode": "shadow", "challenger": f"{MODEL}/{versions['v2']}", "share": 1.0, "max_shadow_pending": 16,
        **FAST})
    try:
        yield root, versions, base, log
    finally:
        stop_server(proc)


# The same codes decode to audio that differs by ~1e-4 between two processes; onset envelopes of these noisy tiny
# outputs move a little with it. Sanity is 0 or 1: it must agree exactly.
TOLERANCE = {"harmonic_fit": 5e-4, "rhythm_fit": 2e-2, "sanity_pass": 0.0}


def recorded_pairs(champion: str, challenger: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (challenger, champion) values of the shadow pairs, read straight from MLflow's runs."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("voice2music-online")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("online.kind") == "pairs"
            and (r.data.tags["online.champion"], r.data.tags["online.challenger"]) == (champion, challenger)]
    out = {}
    for m in ("harmonic_fit", "rhythm_fit", "sanity_pass"):
        sides = []
        for side in ("challenger", "champion"):
            points = sorted((r.info.start_time, h.step, h.value) for r in runs
                            for h in client.get_metric_history(r.info.run_id, f"online.pair.{side}.{m}"))
            sides.append(np.array([v for _, _, v in points]))
        out[m] = tuple(sides)
    return out


LINE = re.compile(r"^\s+(\w+): ([+-]\d+\.\d+) \[([+-]\d+\.\d+), ([+-]\d+\.\d+)\] n=(\d+)$")


def test_shadow_pairs_reach_mlflow_and_rollout_status_agrees_with_a_direct_computation(shadow) -> None:
    from models import configure_torch
    from models.longform import Request, generate_batch_raw
    from models.refs import resolve_model
    from tasks.evaluation.metrics import compute_sample_metrics
    root, versions, base, log = shadow
    v1, v2 = f"{MODEL}/{versions['v1']}", f"{MODEL}/{versions['v2']}"
    vocals = hidden_vocals(N_REQUESTS, 1.5, SR)
    sent = []
    for i, vocal in enumerate(vocals):  # a bounded client loop, one request at a time
        prompt = "Pop music for input vocals" if i % 2 else None
        r = post(base, vocal, seed=100 + i, prompt=prompt)
        assert r.status_code == 200, r.text
        assert r.headers["X-V2M-Variant"] == "champion" and r.headers["X-V2M-Model"] == v1  # shadow never answers
        sent.append((vocal, prompt, 100 + i, sf.read(io.BytesIO(r.content), dtype="float32")[0]))
    pairs_metric = f'v2m_online_shadow_pairs_total{{challenger="{v2}",champion="{v1}"}}'
    until(lambda: metric(base, pairs_metric) == N_REQUESTS, 300, f"{N_REQUESTS} shadow pairs scored")
    p = load_params(root / "shadow.yaml")
    mlflow.set_tracking_uri(p.tracking.uri)
    stored = until(lambda: (s := recorded_pairs(v1, v2)) and len(s["sanity_pass"][0]) == N_REQUESTS and s,
                   60, "the pairs recorded in MLflow")

    res = subprocess.run([sys.executable, "-m", "v2m.cli", "rollout", "status", "--backend", "musicgen", "--params",
                          str(root / "shadow.yaml")], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # root/models/ holds model folders
    assert res.returncode == 0, res.stderr
    printed = {m.group(1): tuple(map(float, m.groups()[1:4])) + (int(m.group(5)),)
               for m in map(LINE.match, res.stdout.splitlines()) if m}
    assert set(printed) == {"harmonic_fit", "rhythm_fit", "sanity_pass"}, res.stdout
    assert f"{N_REQUESTS} shadow pairs" in res.stdout
    assert "WAITING online_evidence" in res.stdout and f"{N_REQUESTS} of 30" in res.stdout  # min_pairs 30 > 10

    # From scratch: both versions here, the same requests and seeds, the evaluation's metric function.
    configure_torch(p.torch_threads)
    models = {name: resolve_model(label) for name, label in (("champion", v1), ("challenger", v2))}
    scores: dict[str, dict[str, list[float]]] = {side: {m: [] for m in printed} for side in models}
    for vocal, prompt, seed, got in sent:
        for side, backend in models.items():
            g = generate_batch_raw(backend, [Request(vocal, SR, prompt, SECONDS, seed)], p.generate)[0]
            if side == "champion":  # what the client received is this generation (same codes; the decoder's
                assert np.abs(g.audio - got).max() < 2e-3  # float sums differ by 1e-4 between processes)
            m = compute_sample_metrics(vocal[: int(SECONDS * SR)], SR, g.audio, SR, raw=g.raw)
            for name in printed:
                scores[side][name].append(m[name])
    pr = p.promotion
    for name, (estimate, low, high, n) in printed.items():
        # The status is the gates' paired bootstrap over the pairs MLflow holds, recomputed here by hand ...
        a, b = stored[name]
        d = a - b
        means = d[np.random.default_rng(pr.bootstrap_seed).integers(0, d.size, (pr.bootstrap_resamples, d.size))]
        lo, hi = np.quantile(means.mean(axis=1), [(1 - pr.confidence) / 2, (1 + pr.confidence) / 2])
        assert n == d.size == N_REQUESTS and np.isfinite(d).all(), name
        assert abs(estimate - d.mean()) < 6e-5 and abs(low - lo) < 6e-5 and abs(high - hi) < 6e-5, name
        # ... and those pairs are what the two versions give on the requests sent (scored from scratch here)
        for values, side in ((a, "challenger"), (b, "champion")):
            np.testing.assert_allclose(values, scores[side][name], atol=TOLERANCE[name], err_msg=f"{name} {side}")


def test_online_metrics_per_version_and_day_are_in_mlflow_and_nothing_else_of_a_request(shadow) -> None:
    root, versions, base, log = shadow
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("voice2music-online")
    runs = client.search_runs([exp.experiment_id], "tags.`online.kind` = 'version'")
    by = {(r.data.tags["online.model"], r.data.tags["online.variant"]): r for r in runs}
    champion = by[(f"{MODEL}/{versions['v1']}", "champion")]
    shadowed = by[(f"{MODEL}/{versions['v2']}", "shadow")]
    for run in (champion, shadowed):
        m = run.data.metrics
        assert m["online.requests"] >= N_REQUESTS and m["online.scored"] >= N_REQUESTS
        assert m["online.sanity_pass"] == 1.0 and -1 <= m["online.harmonic_fit"] <= 1
        assert m["online.latency_p95_s"] > 0 and m["online.realtime_factor"] > 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", run.data.tags["online.day"])
    # Privacy: no audio stored, no artifact logged, no address or prompt in what left the process.
    assert not [p for p in root.rglob("*") if p.suffix in (".wav", ".flac", ".mp3", ".npy")]
    everything = client.search_runs([exp.experiment_id])
    for run in everything:
        assert not client.list_artifacts(run.info.run_id)
        text = json.dumps([run.data.tags, run.data.params])
        assert "127.0.0" not in text and "addr:" not in text and "Pop music" not in text, text


def test_metrics_carry_the_model_label_and_the_grafana_dashboard_queries_only_real_metrics(shadow) -> None:
    root, versions, base, log = shadow
    text = httpx.get(base + "/metrics").text
    v1 = f"{MODEL}/{versions['v1']}"
    for name in ("v2m_online_harmonic_fit", "v2m_online_rhythm_fit", "v2m_online_sanity_pass",
                 "v2m_online_latency_seconds", "v2m_online_realtime_factor"):
        assert f'# TYPE {name} histogram' in text
        assert f'{name}_count{{model="{v1}",variant="champion"}}' in text
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", text, re.M))
    names = {n for n, _ in exported}
    series = names | {f"{n}_{s}" for n, kind in exported if kind == "histogram" for s in ("bucket", "sum", "count")} \
        | {f"{n}_total" for n, kind in exported if kind == "counter"}
    dash = json.loads((ROOT / "infra" / "grafana" / "v2m-serve.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"]) and len(panels) >= 10
    queries = [(p["title"], t["expr"]) for p in panels for t in p["targets"]] + \
        [("annotation", a["expr"]) for a in dash["annotations"]["list"]]
    alerts = yaml.safe_load((ROOT / "infra" / "grafana" / "v2m-alerts.yml").read_text())
    queries += [(r["alert"], r["expr"]) for g in alerts["groups"] for r in g["rules"]]
    for title, expr in queries:
        used = set(re.findall(r"\bv2m_\w+", expr))
        assert used and used <= series, (title, used - series)
        assert expr.count("(") == expr.count(")"), title
    assert any("v2m_online_rollbacks_total" in e for t, e in queries if t.startswith("V2M"))  # alerting on it


# --- canary and auto-rollback ---------------------------------------------------------------------------------
WINDOW = 4


@pytest.fixture(scope="module")
def canary(registry):
    root, versions = registry
    proc, base, log = running(root, "canary", poll_s=0.5, max_per_client=2, rollout={
        "mode": "canary", "challenger": f"{MODEL}/{versions['silent']}", "share": 0.5, "auto_rollback": True,
        "window": WINDOW, **FAST})
    try:
        yield root, versions, base, log
    finally:
        stop_server(proc)


def addresses(in_the_canary: bool, n: int) -> list[str]:
    """Loopback clients the canary's keyed hash puts in (or out of) the canary's share."""
    pool = [f"127.0.0.{k}" for k in range(10, 250)]
    return [a for a in pool if in_canary(KEY.encode(), f"addr:{a}", 0.5) == in_the_canary][:n]


def client_loop(base: str, addr: str, vocals: list[np.ndarray], out: list, stop: threading.Event) -> None:
    for i in range(100):
        if stop.is_set():
            return
        r = post(base, vocals[i % len(vocals)], seed=i, addr=addr, duration=0.6)
        audio = sf.read(io.BytesIO(r.content), dtype="float32")[0] if r.status_code == 200 else None
        out.append((r.status_code, r.headers.get("X-V2M-Variant"), r.headers.get("X-V2M-Model"),
                    None if audio is None else float(np.abs(audio).max())))


def test_a_silent_canary_challenger_is_taken_out_and_the_champions_clients_notice_nothing(canary) -> None:
    root, versions, base, log = canary
    v1, silent = f"{MODEL}/{versions['v1']}", f"{MODEL}/{versions['silent']}"
    assert httpx.get(base + "/readyz").json()["rollout"]["canary"] == silent
    vocals = hidden_vocals(4, 1.0, SR)
    clients = {a: [] for a in addresses(True, 2) + addresses(False, 2)}
    stop = threading.Event()
    threads = [threading.Thread(target=client_loop, args=(base, a, vocals, out, stop)) for a, out in clients.items()]
    for t in threads:
        t.start()
    until(lambda: metric(base, f'v2m_online_canary_removals_total{{model="{silent}"}}') == 1, 240,
          "the silent challenger taken out of the canary")
    removed_at = {a: len(out) for a, out in clients.items()}  # answers each client had when it was taken out
    time.sleep(3)  # a few more answers after it
    stop.set()
    for t in threads:
        t.join(timeout=120)
    canaried, champions = list(clients.items())[:2], list(clients.items())[2:]
    for addr, answers in champions:  # no client of the champion notices anything
        assert answers and all(a[:3] == (200, "champion", v1) and a[3] > 0.1 for a in answers), (addr, answers)
    challenged = 0
    for addr, answers in canaried:
        assert all(a[0] == 200 for a in answers), answers
        variants = [a[1] for a in answers]
        assert variants[0] == "challenger" and variants[-1] == "champion", variants  # sticky, then taken out
        # never back in once out (the one request in flight then may have been routed to it); before, its
        # clients may get the champion while its answers wait for their scores (rollout.route)
        assert set(variants[removed_at[addr] + 1:]) == {"champion"}, variants
        mine = [a for a in answers if a[1] == "challenger"]
        assert all(a[2] == silent and a[3] < 1e-3 for a in mine)  # the canary's answers were silent
        challenged += len(mine)
    assert WINDOW <= challenged <= WINDOW + 6  # judged on a window of its outputs, taken out right after
    assert metric(base, f'v2m_online_canary_active{{model="{silent}"}}') == 0.0
    assert httpx.get(base + "/readyz").json()["rollout"]["canary"] is None
    assert f"{silent} taken out of the canary: online sanity_pass" in log.read_text()
    client = mlflow.MlflowClient()
    until(lambda: any(r.data.tags.get("online.canary_removed", "").startswith("online sanity_pass")
                      for r in client.search_runs([client.get_experiment_by_name("voice2music-online").experiment_id],
                                                  f"tags.`online.model` = '{silent}'")),
          30, "the removal recorded in MLflow")


def test_a_promoted_version_that_fails_the_bounds_is_rolled_back_within_the_window(canary) -> None:
    from tasks.registry.registry import audit, audit_history, version_tags
    root, versions, base, log = canary
    v1, silent = versions["v1"], versions["silent"]
    params = load_params(root / "canary.yaml")
    vocals = hidden_vocals(4, 1.0, SR)
    answers: list = []
    stop = threading.Event()
    loop = threading.Thread(target=client_loop, args=(base, "127.0.0.2", vocals, answers, stop))
    loop.start()
    time.sleep(2)
    # what `v2m promote` does once its gates pass: the alias and the audit entry rollback reads
    set_champion(root, silent)
    audit(params, root, "musicgen", "promote", silent, v1, silent, {"reason": "test promotion"})
    until(lambda: metric(base, f'v2m_online_rollbacks_total{{model="{MODEL}/{silent}"}}') == 1, 240,
          "the automatic rollback")
    until(lambda: httpx.get(base + "/readyz").json()["model"] == f"{MODEL}/{v1}", 60, "v1 serving again")
    time.sleep(2)
    stop.set()
    loop.join(timeout=120)
    assert answers and all(a[0] == 200 for a in answers), answers  # no request failed during either swap
    models = [a[2] for a in answers]
    first, last = models.index(f"{MODEL}/{silent}"), len(models) - 1 - models[::-1].index(f"{MODEL}/{silent}")
    assert set(models[:first]) == set(models[last + 1:]) == {f"{MODEL}/{v1}"}  # v1, then the promoted one, then v1
    assert set(models[first:last + 1]) == {f"{MODEL}/{silent}"}
    assert WINDOW <= last + 1 - first <= WINDOW + 4  # rolled back within the window (+ what was in flight)
    entry = audit_history(params, root, "musicgen")[-1]
    assert (entry["action"], entry["champion_before"], entry["champion_after"]) == ("rollback", silent, v1)
    detail = mlflow.artifacts.load_text(f"runs:/{entry['run_id']}/decision.json")
    assert "auto_rollback by v2m serve: online sanity_pass" in detail
    assert version_tags("musicgen", silent).get("promotion.rolled_back")  # sticky: not promoted again by a retrain
    assert f"auto_rollback: champion {MODEL}/{silent} rolled back to v{v1}" in log.read_text()
