"""serve.rollout's parts that need no model: the settings, the canary's keyed hash, the online_evidence gate, the
bounds that pull a version, the generation gate, the CPU budget, the opt-in audio keeper and its retention."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from models.longform import Request
from tasks.evaluation.paired import paired_mean_ci
from tasks.registry.gates import FAIL, PASS, WAITING, online_evidence
from tasks.serving.access import AccessError, check_rollout_access, rollout_permissions
from tasks.serving.batcher import GenerationGate, Result
from tasks.serving.keep import Keeper
from tasks.serving.online import Bounds, CpuBudget, Ledger, Pair
from tasks.serving.rollout import RolloutKeyError, in_canary, rollout_key
from tests.conftest import ROOT
from v2m.config import ConfigError, PromotionConfig, load_params
from v2m.config_serve import OnlineEvidenceConfig, RolloutConfig


def params_with(tmp_path: Path, section: str, patch: dict) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = raw
    for key in section.split("."):
        node = node[key]
    node.update(patch)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


def test_the_project_params_say_off_and_a_bare_yaml_off_still_means_off(tmp_path: Path) -> None:
    assert load_params(ROOT / "params.yaml").serve.rollout.mode == "off"
    (tmp_path / "p.yaml").write_text((ROOT / "params.yaml").read_text().replace('mode: "off"', "mode: off"))
    assert "mode: off " in (tmp_path / "p.yaml").read_text()  # YAML 1.1 reads this as false
    assert load_params(tmp_path / "p.yaml").serve.rollout.mode == "off"


@pytest.mark.parametrize("section,patch,named", [
    ("serve.rollout", {"mode": "blue-green"}, "serve.rollout.mode"),
    ("serve.rollout", {"share": 1.5}, "serve.rollout.share"),
    ("serve.rollout", {"shadows": 2}, "serve.rollout.shadows"),
    ("serve.rollout", {"mode": "shadow", "score_cpu": 0}, "score_cpu must be above 0"),
    ("promotion.online_evidence", {"thresholds": {"fad": -1}}, "thresholds name online metrics"),
    ("promotion.online_evidence", {"min_pairs": 1}, "promotion.online_evidence.min_pairs"),
])
def test_bad_rollout_settings_name_the_key(tmp_path: Path, section: str, patch: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_params(params_with(tmp_path, section, patch))


def test_the_canary_is_a_keyed_hash_of_the_client_id_sticky_uniform_and_unguessable() -> None:
    key = b"k" * 32
    clients = [f"addr:10.0.{i // 250}.{i % 250}" for i in range(20000)]
    inside = [in_canary(key, c, 0.2) for c in clients]
    assert abs(np.mean(inside) - 0.2) < 0.015  # the share of clients, not of requests
    assert inside == [in_canary(key, c, 0.2) for c in clients]  # sticky: the same answer every time
    other = [in_canary(b"o" * 32, c, 0.2) for c in clients]
    agree = np.mean(np.array(inside) == np.array(other))
    assert 0.6 < agree < 0.75  # another key, another draw (independent: 0.8^2 + 0.2^2 = 0.68)
    assert not any(in_canary(key, c, 0.0) for c in clients[:500]) and all(in_canary(key, c, 1.0) for c in clients[:500])
    # a bigger share keeps everyone who was in: raising the share never moves a canary client back
    assert all(in_canary(key, c, 0.5) for c, i in zip(clients, inside) if i)


def test_the_rollout_key_comes_from_the_environment_or_is_drawn_and_must_be_long() -> None:
    assert rollout_key({"V2M_ROLLOUT_KEY": "x" * 20}) == b"x" * 20
    assert rollout_key({}) != rollout_key({})  # drawn at start: unknown to any client
    with pytest.raises(RolloutKeyError, match="V2M_ROLLOUT_KEY must have at least 16"):
        rollout_key({"V2M_ROLLOUT_KEY": "short"})


def intervals(n: int, shift: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    champ = rng.normal(0.3, 0.1, n)
    p = PromotionConfig()
    return {m: paired_mean_ci(champ + shift + rng.normal(0, 0.02, n), champ, p.bootstrap_resamples,
                              p.bootstrap_seed, p.confidence) for m in ("harmonic_fit", "rhythm_fit", "sanity_pass")}


def test_the_online_evidence_gate_waits_for_pairs_then_judges_the_lower_bound() -> None:
    cfg = OnlineEvidenceConfig(required=True, min_pairs=30)
    waiting = online_evidence(cfg, intervals(12, 0.0))
    assert waiting.status == WAITING and "12 of 30" in waiting.reason and waiting.n == 12
    same = online_evidence(cfg, intervals(60, 0.0))
    assert same.status == PASS and same.n == 60  # within noise: lower bounds above -0.02 / -0.05
    worse = online_evidence(cfg, intervals(60, -0.1))
    assert worse.status == FAIL and worse.low < -0.02 and "lower bound >= -0.02" in worse.reason
    better_only = OnlineEvidenceConfig(min_pairs=30, thresholds={"harmonic_fit": 0.05})  # must be better by 0.05
    slightly, clearly = online_evidence(better_only, intervals(60, 0.03)), online_evidence(better_only, intervals(60, 0.08))
    assert (slightly.status, clearly.status) == (FAIL, PASS)
    assert clearly.low == intervals(60, 0.08)["harmonic_fit"].low  # the interval of the gated metric itself


def test_bounds_fail_a_silent_window_and_leave_a_sane_one() -> None:
    bounds = Bounds(RolloutConfig(window=8, min_sanity_pass=0.9, min_harmonic_fit=0.0), PromotionConfig())
    sane = [{"sanity_pass": 1.0, "harmonic_fit": 0.3, "rhythm_fit": 0.1}] * 8
    assert bounds.judge(sane) is None
    silent = [{"sanity_pass": 0.0, "harmonic_fit": 0.0, "rhythm_fit": 0.0}] * 8
    assert "online sanity_pass 0.000 [0.000, 0.000] n=8" in bounds.judge(silent)
    one_bad = sane[:7] + silent[:1]  # a single odd output is noise, not a verdict
    assert bounds.judge(one_bad) is None
    dissonant = [{"sanity_pass": 1.0, "harmonic_fit": -0.2 + 0.01 * k, "rhythm_fit": 0.1} for k in range(8)]
    assert "online harmonic_fit" in bounds.judge(dissonant)
    text_only = [{"sanity_pass": 1.0, "harmonic_fit": float("nan"), "rhythm_fit": float("nan")}] * 8
    assert bounds.judge(text_only) is None  # no vocal, no fit to judge


def test_a_background_job_takes_the_generation_gate_only_when_no_client_waits() -> None:
    gate, order = GenerationGate(), []
    assert gate.try_background()  # free: taken
    entered = threading.Event()

    def client() -> None:
        with gate.serving():
            entered.set()
            order.append("client")

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.2)
    assert gate.wanted() and not entered.is_set()  # the client waits: a shadow's YieldToken reads cancelled
    gate.release()
    t.join(5)
    assert order == ["client"] and not gate.wanted()
    with gate.serving():
        assert not gate.try_background()  # held by a client: no background work


def test_the_cpu_budget_makes_a_worker_wait_for_what_it_spent() -> None:
    budget, stop = CpuBudget(cores=2.0, burst_s=0.1), threading.Event()
    t0 = time.monotonic()
    budget.wait(stop)
    assert time.monotonic() - t0 < 0.5  # in credit: no wait
    budget.spend(0.5)  # 0.4 s in debt at 2 cores: 0.2 s of wall time to pay back
    t0 = time.monotonic()
    budget.wait(stop)
    assert time.monotonic() - t0 >= 0.18


def test_the_ledger_keeps_metrics_and_model_versions_only() -> None:
    ledger = Ledger()
    ledger.served("voice2music-musicgen/3", "champion", 0.5, 0.25)
    ledger.scored("voice2music-musicgen/3", "champion", {"sanity_pass": 1.0, "harmonic_fit": 0.2,
                                                          "rhythm_fit": float("nan")})
    pair = Pair("voice2music-musicgen/3", "voice2music-musicgen/4", "2026-01-01",
                {"champion": {"sanity_pass": 1.0}, "challenger": {"sanity_pass": 0.0}})
    ledger.pair(pair)
    tallies, pairs = ledger.take()
    (key, t), = tallies.items()
    assert key[:2] == ("voice2music-musicgen/3", "champion") and pairs == [pair]
    assert t["metrics"]["online.harmonic_fit"] == 0.2 and "online.rhythm_fit" not in t["metrics"]  # NaN left out
    assert ledger.take()[1] == []  # taken once
    ledger.put_back(pairs)
    assert ledger.take()[1] == [pair]  # a failed write keeps them for the next one


def test_kept_audio_is_opt_in_bounded_per_day_and_deleted_after_its_retention(tmp_path: Path) -> None:
    cfg = RolloutConfig(keep_audio=True, keep_share=1.0, keep_per_day=2, retention_days=3, audio_dir="kept")
    keeper = Keeper(cfg, tmp_path)
    sr = 16000
    req = Request(np.full(sr, 0.1, np.float32), sr, "Pop music", 1.0, seed=5)
    out = Result(np.full(sr, 0.2, np.float32), sr, "voice2music-musicgen/1", 0.1)
    shadow = Result(np.full(sr, 0.3, np.float32), sr, "voice2music-musicgen/2", 0.1)
    pair = Pair("voice2music-musicgen/1", "voice2music-musicgen/2", "2026-01-01",
                {"champion": {"sanity_pass": 1.0}, "challenger": {"sanity_pass": 1.0}})
    kept = [keeper.offer(req, out, shadow, pair) for _ in range(3)]
    assert kept[2] is None and all(kept[:2])  # keep_per_day
    assert {p.name for p in kept[0].iterdir()} == {"vocal.flac", "champion.flac", "challenger.flac", "pair.json"}
    meta = json.loads((kept[0] / "pair.json").read_text())
    assert meta["champion"] == "voice2music-musicgen/1" and "addr" not in json.dumps(meta)
    old = tmp_path / "kept" / "2020-01-01"
    old.mkdir()
    (tmp_path / "kept" / "notes").mkdir()  # not a day folder: left alone
    assert keeper.sweep() == ["2020-01-01"] and not old.exists() and (tmp_path / "kept" / "notes").exists()
    assert kept[0].exists()  # today's stay ...
    assert keeper.sweep(now=time.time() + 5 * 86400) and not kept[0].exists()  # ... until their retention ends
    never = Keeper(RolloutConfig(keep_audio=True, keep_share=0.0), tmp_path / "none")
    assert never.offer(req, out, shadow, pair) is None and not (tmp_path / "none" / ".v2m").exists()


def test_rollout_access_on_a_local_store_and_the_roles_a_deployment_needs() -> None:
    assert rollout_permissions("sqlite:///x.db", "voice2music-musicgen") == {"record": True, "rollback": True}
    check_rollout_access("off", False, {"record": False, "rollback": False}, "voice2music-musicgen", "serve")
    with pytest.raises(AccessError, match="run serve as the `rollout` role"):
        check_rollout_access("shadow", False, {"record": False, "rollback": False}, "voice2music-musicgen", "serve")
    with pytest.raises(AccessError, match="run serve as the `rollback` role"):
        check_rollout_access("off", True, {"record": True, "rollback": False}, "voice2music-musicgen", "rollout")
    check_rollout_access("canary", True, {"record": True, "rollback": True}, "voice2music-musicgen", "rollback")
