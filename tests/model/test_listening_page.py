"""The blind listening test end to end: `v2m listen` as a real server process, two listeners voting in
Debian's Chromium (one with clicks, one with the keyboard on a phone-sized screen and the team's auth
header), a restart in between, then the statistics, the registry record, the report and `v2m promote`."""

from __future__ import annotations

import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from playwright.sync_api import sync_playwright
from typer.testing import CliRunner

from tasks.evaluation.evaluate import evaluate
from tasks.registry.promotion import promote
from tasks.registry.registry import CHALLENGER, CHAMPION, alias_version, register, version_tags
from tasks.registry.report import compare
from tasks.training.finetune import finetune
from tests.conftest import ROOT
from tests.model.test_report import ARGS, CHROMIUM
from v2m.cli import app
from v2m.config import PromotionConfig, load_params
from v2m.tracking import setup_mlflow

NAME = "voice2music-musicgen"
MIN_VOTES = 6


class Server:
    """`v2m listen` in its own process, as a person would start it."""

    def __init__(self, root: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "v2m.cli", "listen", "--backend", "musicgen"], cwd=root,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log = []
        deadline = time.monotonic() + 240  # first start generates the clips the evaluation did not log
        for line in self.proc.stderr:
            self.log.append(line)
            if m := re.search(r"listening test: (http://\S+/listen)", line):
                self.url = m.group(1)
                # keep draining its log, or a full pipe would block the server
                threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
                return
            assert time.monotonic() < deadline, "".join(self.log[-20:])
        raise AssertionError("v2m listen exited: " + "".join(self.log[-30:]))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


@pytest.fixture
def pair(root: Path):
    """Two tiny fine-tunes, evaluated; the one with the higher FAD is champion, the other challenger.
    The metric gates other than FAD are relaxed: this test is about the listeners' gate."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["listening"] = {"max_chunks": 3}
    raw["evaluation"] = {**raw["evaluation"], "max_samples": 3}  # audio_samples 1: one clip reused, two generated
    relax = {"harmonic_fit_max_drop": 1.0, "breakdown_max_regression": 1.0, "rhythm_fit_max_drop": 1.0,
             "fad_max_increase": 1e9, "doubling_max_rise": 1.0, "repetition_max_rise": 1.0}
    known = {k: v for k, v in relax.items() if k in PromotionConfig.model_fields}  # the gates this version has
    raw["promotion"] = {**raw.get("promotion", {}), **known,
                        "human_preference": {"required": True, "min_votes": MIN_VOTES, "min_lower_bound": 0.5}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(root / "params.yaml")
    setup_mlflow(p, root)
    runs = [finetune(p, "musicgen", "voice", root).run_id,
            finetune(p, "musicgen", "voice", root, max_steps=3).run_id]
    evals = {r: evaluate(p, root, f"runs:/{r}") for r in runs}
    assert len(set(runs)) == 2 and all(e.metrics["eval/sanity_pass"] == 1.0 for e in evals.values())
    champ_run, chall_run = sorted(runs, key=lambda r: -evals[r].metrics["eval/fad"])
    champion = register(champ_run, "musicgen", evals[champ_run].run_id)
    assert promote(p, root, "musicgen").promoted  # the first champion: no listening comparison needed
    challenger = register(chall_run, "musicgen", evals[chall_run].run_id)
    assert alias_version("musicgen", CHALLENGER) == challenger and alias_version("musicgen", CHAMPION) == champion
    return p, f"{NAME}/{challenger}", f"{NAME}/{champion}"


def trial_row(root: Path, trial_id: str) -> dict:
    """What the store holds about a trial (never shown to the listener)."""
    with sqlite3.connect(root / ".v2m" / "listening.db") as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("SELECT * FROM trials WHERE trial_id = ?", (trial_id,)).fetchone())


def current_trial(page) -> str:
    src = page.get_attribute("#audioA", "src")
    return src.rsplit("/", 2)[-2]


def vote_through_page(page, root: Path, choose, act, clips: dict, chosen: list) -> None:
    """Answer every trial the page shows: `choose(trial) -> "challenger" | "champion" | "none"` is the
    listener's judgement, `act(page, answer)` gives it with clicks or keys. Checks what A and B play."""
    while page.is_visible("#trial"):
        n = page.evaluate("document.body.dataset.trial")
        trial_id = current_trial(page)
        t = trial_row(root, trial_id)
        for slot, model in (("A", t["model_a"]), ("B", t["model_b"])):  # A and B play the recorded order
            body = page.request.get(page.url.rstrip("/") + f"/audio/{trial_id}/{slot}").body()
            assert body == clips[(model, t["chunk_id"])].read_bytes()
        assert NAME not in page.content()  # nothing on the page says which model is which
        judgement = choose(t)
        answer = "none" if judgement == "none" else "A" if t["model_a"] == judgement else "B"
        act(page, answer)
        page.wait_for_function("n => document.body.dataset.trial !== n || "
                               "!document.getElementById('done').classList.contains('hidden')", arg=n)
        chosen.append({"listener": t["listener"], "chunk_id": t["chunk_id"], "answer": answer,
                       "winner": "" if judgement == "none" else judgement, "model_a": t["model_a"]})


def promote_cli(root: Path):
    return CliRunner().invoke(app, ["promote", "--backend", "musicgen", "--params", str(root / "params.yaml")])


def wilson_direct(score: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = score / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_two_listeners_vote_blind_and_the_votes_decide_the_promotion(root: Path, pair) -> None:
    assert CHROMIUM, "chromium is not installed: `make test` installs it (apt-get install chromium)"
    p, challenger, champion = pair
    server = Server(root)
    clips = {}
    for model in (challenger, champion):
        folder = next((root / ".v2m" / "listening" / "clips").glob(model.replace("/", "-") + "-*"))
        clips |= {(model, f.stem): f for f in folder.glob("*.wav")}
    assert len(clips) == 6
    chosen: list[dict] = []
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)

        # Ann types her name and clicks; she prefers the challenger, except on the last vocal, and rates one.
        ann = browser.new_context().new_page()
        ann.on("pageerror", lambda e: errors.append(str(e)))
        ann.goto(server.url)
        ann.fill("#name", "ann")
        ann.click("#start")
        ann.wait_for_selector("#trial:not(.hidden)")
        assert ann.text_content("#count") == "Vocal 1 of 3"

        def ann_clicks(page, answer):
            if page.evaluate("document.body.dataset.trial") == "0":
                page.check("input[data-rating=A4]")
                page.check("input[data-rating=B2]")
            page.click({"A": "#answerA", "B": "#answerB", "none": "#answerNone"}[answer])

        vote_through_page(ann, root, lambda t: "none" if t["position"] == 2 else challenger, ann_clicks, clips, chosen)
        ann.wait_for_function("document.body.dataset.results === 'ready'")
        assert ann.text_content("#overall").count("%") >= 3  # win rate and interval shown once she is done

        # Not enough votes yet: the promotion waits; it neither passes nor fails.
        res = promote_cli(root)
        assert res.exit_code == 1 and re.search(r"(?i)\bwait\w*\s+human_preference", res.output), res.output
        assert alias_version("musicgen", CHAMPION) == champion.rsplit("/", 1)[1]
        assert version_tags("musicgen", challenger.rsplit("/", 1)[1])["promotion.decision"] == "waiting"

        # A restart keeps every vote, and Ann's progress.
        server.stop()
        server = Server(root)
        ann.goto(server.url)
        ann.fill("#name", "ann")
        ann.click("#start")
        ann.wait_for_selector("#done:not(.hidden)")

        # Bob is signed in by the team's auth proxy, on a phone, and uses the keyboard only.
        bob_ctx = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True,
                                      extra_http_headers={"X-Forwarded-User": "bob"})
        bob = bob_ctx.new_page()
        bob.on("pageerror", lambda e: errors.append(str(e)))
        bob.goto(server.url)
        bob.wait_for_selector("#trial:not(.hidden)")
        assert bob.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        for sel in ("#answerA", "#answerNone", "#answerB", "#audioA", "#audioB"):
            box = bob.locator(sel).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, sel

        def bob_keys(page, answer):
            page.keyboard.press("1")  # play A
            page.keyboard.press("2")  # play B
            page.keyboard.press({"A": "a", "B": "b", "none": "n"}[answer])

        vote_through_page(bob, root, lambda t: challenger, bob_keys, clips, chosen)
        bob.wait_for_function("document.body.dataset.results === 'ready'")
        shown_rate = bob.text_content("#overall")
        shown_agreement = bob.text_content("#agreement")
        votes = bob.request.get(server.url + "/api/votes").json()
        resend = {k: votes[0][k] for k in ("vote_id", "trial_id", "listener", "answer", "rating_a", "rating_b")}
        again = ann.request.post(server.url + "/api/votes", data=resend).json()  # a retry stores nothing new
        assert again["stored"] is False and len(bob.request.get(server.url + "/api/votes").json()) == 6
        assert bob.request.post(server.url + "/api/votes", data=resend).status == 409  # the header says bob
        browser.close()
    server.stop()
    assert errors == []

    # The stored votes are what was clicked, and the order was randomised (counterbalanced per listener).
    assert [(v["listener"], v["chunk_id"], v["answer"], v["winner"], v["model_a"]) for v in votes] == \
        [(c["listener"], c["chunk_id"], c["answer"], c["winner"], c["model_a"]) for c in chosen]
    assert all(v["pair"] == "|".join(sorted((challenger, champion))) and v["created"] for v in votes)
    assert (votes[0]["rating_a"], votes[0]["rating_b"]) == (4, 2) and all(v["rating_a"] is None for v in votes[1:])
    for who in ("ann", "bob"):
        shown_first = [v["model_a"] == challenger for v in votes if v["listener"] == who]
        assert 0 < sum(shown_first) < len(shown_first), (who, shown_first)

    # The statistics match a direct computation: 5 wins, 1 no-preference (half a win), 0 losses.
    wins, ties = 5, 1
    low, high = wilson_direct(wins + ties / 2, 6)
    assert f"{100 * (wins + ties / 2) / 6:.1f} %" in shown_rate
    assert f"{100 * low:.1f} % – {100 * high:.1f} %" in shown_rate
    # Agreement: the listeners agree on 2 of the 3 vocals; Fleiss' kappa by hand = (2/3 - 26/36) / (10/36).
    assert "66.7 % of pairs agree" in shown_agreement and "κ -0.200" in shown_agreement
    tags = version_tags("musicgen", challenger.rsplit("/", 1)[1])
    assert (tags["listening.votes"], tags["listening.opponent"], tags["listening.listeners"]) == ("6", champion, "2")
    assert float(tags["listening.win_rate"]) == pytest.approx(5.5 / 6, abs=1e-4)
    assert float(tags["listening.ci_low"]) == pytest.approx(low, abs=1e-4)
    history = MlflowClient().get_metric_history(tags["listening.run_id"], f"v{challenger.rsplit('/', 1)[1]}/win_rate")
    assert [m.step for m in history] == list(range(1, 7))  # one point per vote

    # The comparison report shows the listening results beside the metrics.
    index, _, _ = compare(p, root, [challenger, champion])
    page = index.read_text()
    assert "Blind listening test" in page and f"{5.5 / 6:.4f}" in page and f"{low:.4f}" in page

    # Enough votes, lower bound 0.517 >= 0.5: the promotion passes.
    res = promote_cli(root)
    assert res.exit_code == 0 and re.search(r"(?i)\bpass\s+human_preference", res.output), res.output
    assert alias_version("musicgen", CHAMPION) == challenger.rsplit("/", 1)[1]
    assert mlflow.get_run(tags["listening.run_id"]).data.tags["pair"] == votes[0]["pair"]
