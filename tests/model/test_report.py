"""`v2m compare`'s HTML report, opened in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import mlflow
import pytest
from playwright.sync_api import sync_playwright

from tasks.evaluation.evaluate import evaluate
from tasks.registry.registry import register
from tasks.registry.report import compare
from tasks.training.finetune import finetune
from v2m.config import load_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture
def served(tmp_path: Path):
    """Serve a folder on loopback; yields a function folder -> base URL."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()


def test_report_renders_in_chromium_with_working_audio_and_mlflow_numbers(root: Path, served) -> None:
    assert CHROMIUM, "chromium is not installed: `make test` installs it (apt-get install chromium)"
    p = load_params(root / "params.yaml")
    ft = finetune(p, "musicgen", "voice", root)
    version = register(ft.run_id, "musicgen")
    evaluate(p, root, f"voice2music-musicgen/{version}")
    index, evals, run_id = compare(p, root, [f"voice2music-musicgen/{version}", "base:musicgen"])
    assert index.is_file() and {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_id, "report")} >= {
        "report/index.html", "report/audio", "report/img"}

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
        page.goto(served(index.parent) + "/index.html", wait_until="networkidle")

        intro = page.locator("p").first.text_content()  # the practical threshold is stated, from params
        assert f"at least {p.report.min_difference:g}" in intro and "no practical difference" in intro
        sources = page.eval_on_selector_all("audio", "els => els.map(e => e.getAttribute('src'))")
        # per test vocal: the vocal, then ground truth and each model as (mixed with the vocal, alone)
        rows = page.locator("table[data-table='Per test vocal'] tr.sample")
        assert rows.count() >= 1
        assert rows.first.locator("audio").count() == 1 + 2 * (1 + len(evals))
        labels = rows.first.locator(".player label").all_text_contents()
        assert labels == ["with the vocal", "instrumental alone"] * (1 + len(evals))
        for src in sources:
            assert (index.parent / src).is_file(), src
            resp = page.request.get(served(index.parent) + "/" + src)
            assert resp.status == 200 and resp.body()[:4] == b"RIFF", src
        durations = page.evaluate("""() => Promise.all([...document.querySelectorAll('audio')].map(a =>
            a.readyState >= 1 ? a.duration : new Promise(r => { a.onloadedmetadata = () => r(a.duration);
                                                               a.onerror = () => r(-1); a.load(); })))""")
        assert all(d > 0 for d in durations), durations
        images = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert images and all(w > 0 for w in images)

        # The aggregate table shows the numbers MLflow holds for each evaluation run, and the second model's
        # paired difference from the first with its interval and n.
        header = page.eval_on_selector_all("table[data-table='Aggregate'] tr:first-child th",
                                           "els => els.map(e => e.textContent)")[1:]
        assert header == [e.ref for e in evals]
        for metric in ("eval/harmonic_fit", "eval/rhythm_fit", "eval/fad"):
            row = page.locator("table[data-table='Aggregate'] tr", has=page.locator(f"th:text-is('{metric}')"))
            values = row.locator("td .value").all_text_contents()
            for cell, e in zip(values, evals):
                assert cell == f"{mlflow.get_run(e.eval_run_id).data.metrics[metric]:.4f}", (metric, e.ref)
            delta = row.locator("td .delta").first
            n = len(evals[0].result.rows)
            assert f"n={n}" in delta.text_content() and delta.get_attribute("data-verdict") in (
                "better", "worse", "tie", "negligible")
            diff = float(delta.text_content().split()[1])
            if metric != "eval/fad":  # a mean of paired differences is the difference of the means
                want = mlflow.get_run(evals[1].eval_run_id).data.metrics[metric] - mlflow.get_run(
                    evals[0].eval_run_id).data.metrics[metric]
                assert diff == pytest.approx(want, abs=2e-4), metric
        assert page.locator("table[data-table^='Per genre'] td .delta").count() > 0
        assert page.locator("table[data-table^='Per language'] td .delta").count() > 0
        browser.close()
    assert errors == []
